"""Per-pixel mask sets: the SAM masks of one image stored as, for every pixel, the id of the set of masks it lies in.

``M`` overlapping masks split the ``H x W`` pixels of an image into ``C`` classes of pixels that lie in exactly the
same masks (the cells of the masks' arrangement; one of them may be the empty set, the pixels in no mask). A
:class:`PixelMasks` keeps, as torch tensors on one device:

* ``pixel_set``      int32 [H*W]    id in ``[0, C)`` of each pixel's set (flat index ``y * W + x``)
* ``set_masks``      int32 [C, L]   the masks of each set in ascending order, padded with -1 (``L = max(1, largest set)``)
* ``set_area``       int64 [C]      pixels per set (every set has at least one)
* ``mask_area``      int64 [M]      pixels per mask (0 for an empty mask)
* ``set_bits``       int32 [C, ceil(M / 32)]  the same sets as bit sets: bit ``m % 32`` of word ``m // 32`` of row ``c``
  is set when mask ``m`` is in set ``c`` (constant-time "is mask m in this pixel's set")
* ``set_pixels``     int32 [H*W]    the pixels ordered by set (ascending inside a set); set ``c``'s pixels are
  ``set_pixels[set_start[c]:set_start[c + 1]]``, ``set_start`` int64 [C + 1]
* ``mask_set_start`` int64 [M + 1], ``mask_sets`` int32 [E]: the sets inside each mask (mask ``m``'s are
  ``mask_sets[mask_set_start[m]:mask_set_start[m + 1]]``); ``mask_set_cum`` int64 [E] the running pixel count over
  that concatenated list and ``mask_pixel_start`` int64 [M + 1] where each mask's pixels start in it (for a uniform
  pixel inside a mask, :meth:`PixelMasks.sample_in_masks`).

Sets are numbered by their first pixel in row-major order, so the representation of a mask stack is unique. It is
lossless (:meth:`to_dense` rebuilds the bool ``[M, H, W]`` stack) and small: ``pixel_set`` is 4 bytes a pixel
(3 MB at 1008x756), the tables grow with ``C x L``, not with ``H x W x M``. A training step gathers only what its
sampled pixels need (``pixel_set[pix]`` then rows of the tables), ``O(P L)``.

On disk (the priors cache) it is the four arrays of :meth:`to_arrays`; everything else is derived by
:meth:`from_arrays` in ``O(H W log(H W))`` on the host.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["PixelMasks"]

_ARRAY_KEYS = ("shape", "pixel_set", "set_masks", "mask_area")
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


def _pixel_keys(bits: np.ndarray, m: int, n: int) -> np.ndarray:
    """uint8 ``[ceil(M / 8), n]``: byte ``b`` of pixel ``p`` holds masks ``8b .. 8b + 7`` (mask ``8b`` in the most
    significant bit), from the bit-packed rows ``bits [M, ceil(n / 8)]`` of a
    :class:`~pepeseg3d_ns.priors.masks.MaskSet` (``np.packbits`` layout: pixel ``8j`` in the top bit of byte ``j``).

    Every group of 8 masks x 8 pixels is an 8x8 bit matrix (byte ``j`` of the 8 masks' rows); transposing it (three
    masked shift-and-swap steps on one 64-bit word) gives the 8 pixels' bytes, without unpacking to one byte a bit.
    """
    nb, nbytes = (m + 7) // 8, bits.shape[1]
    keys = np.empty((nb, nbytes * 8), dtype=np.uint8)
    rows = np.zeros((8, nbytes), dtype=np.uint8)
    for b in range(nb):
        chunk = bits[8 * b : 8 * b + 8]
        rows[:] = 0
        rows[: chunk.shape[0]] = chunk
        x = np.ascontiguousarray(rows[::-1].T).view(np.uint64)[:, 0]  # mask 8b in the most significant byte
        for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
            sh = np.uint64(shift)
            t = (x ^ (x >> sh)) & np.uint64(mask)
            x = x ^ t ^ (t << sh)
        keys[b] = x.byteswap().view(np.uint8)  # byte c of word j = pixel 8j + c
    return keys[:, :n]


def _distinct_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: the first pixel of every distinct column of ``keys [B, n]`` (ascending) and each pixel's
    index into ``first``. Exact: a 64-bit hash groups the columns, and every pixel is then checked against its group's
    first pixel (a collision, never seen in practice, falls back to an exact row sort)."""
    nb, n = keys.shape
    if nb <= 8:
        word = np.zeros((n, 8), dtype=np.uint8)
        word[:, :nb] = keys.T
        h = word.view(np.uint64)[:, 0]
        exact = True
    else:
        h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for b in range(nb):
                h ^= keys[b]
                h *= _FNV_PRIME
        exact = False
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    if not exact and any(not np.array_equal(keys[b], keys[b][first[inverse]]) for b in range(nb)):
        _, first, inverse = np.unique(np.ascontiguousarray(keys.T).view(np.dtype((np.void, nb))).reshape(-1),
                                      return_index=True, return_inverse=True)
    # number the sets by their first pixel (row-major), independent of the hash
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return first[order], rank[inverse.reshape(-1)]


def _bit_words(set_masks: np.ndarray, m: int) -> np.ndarray:
    """int32 ``[C, ceil(M / 32)]`` bit sets of the rows of ``set_masks [C, L]`` (-1 = padding)."""
    c = set_masks.shape[0]
    nw = max(1, (m + 31) // 32)
    words = np.zeros((c, nw), dtype=np.uint32)
    rows, cols = np.nonzero(set_masks >= 0)
    ids = set_masks[rows, cols].astype(np.int64)
    np.bitwise_or.at(words, (rows, ids // 32), (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return words.view(np.int32)


class PixelMasks:
    """The masks of one ``height x width`` image as per-pixel mask sets (see the module docstring).

    Build with :meth:`from_maskset`, :meth:`from_dense` or :meth:`from_arrays`; move with :meth:`to`.
    """

    _TENSORS = ("pixel_set", "set_masks", "set_area", "mask_area", "set_bits", "set_pixels", "set_start",
                "mask_set_start", "mask_sets", "mask_set_cum", "mask_pixel_start")

    def __init__(self, height: int, width: int, tensors: Dict[str, Tensor]) -> None:
        self.height, self.width = int(height), int(width)
        for k in self._TENSORS:
            setattr(self, k, tensors[k])
        self.num_masks = int(self.mask_area.shape[0])
        self.num_sets = int(self.set_masks.shape[0])
        self.max_masks_per_pixel = int(self.set_masks.shape[1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_tables(cls, height: int, width: int, pixel_set: np.ndarray, set_masks: np.ndarray,
                     num_masks: int) -> "PixelMasks":
        """Derive every table from ``pixel_set [H*W]`` and ``set_masks [C, L]`` (ascending rows, -1 padded)."""
        n, m = height * width, int(num_masks)
        pixel_set = np.ascontiguousarray(pixel_set, dtype=np.int32).reshape(-1)
        set_masks = np.ascontiguousarray(set_masks, dtype=np.int32)
        c = set_masks.shape[0]
        set_area = np.bincount(pixel_set, minlength=c).astype(np.int64)
        set_pixels = np.argsort(pixel_set, kind="stable").astype(np.int32)
        set_start = np.zeros(c + 1, dtype=np.int64)
        np.cumsum(set_area, out=set_start[1:])
        rows, cols = np.nonzero(set_masks >= 0)
        ids = set_masks[rows, cols].astype(np.int64)
        order = np.lexsort((rows, ids))  # by mask, then set
        mask_of, set_of = ids[order], rows[order]
        mask_area = np.bincount(mask_of, weights=set_area[set_of], minlength=m).astype(np.int64) if m else \
            np.zeros(0, np.int64)
        mask_set_start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(mask_of, minlength=m), out=mask_set_start[1:])
        mask_set_cum = np.cumsum(set_area[set_of])  # running pixel count over all masks' sets
        mask_pixel_start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(mask_area, out=mask_pixel_start[1:])
        arrays = {
            "pixel_set": pixel_set, "set_masks": set_masks, "set_area": set_area, "mask_area": mask_area,
            "set_bits": _bit_words(set_masks, m), "set_pixels": set_pixels, "set_start": set_start,
            "mask_set_start": mask_set_start, "mask_sets": set_of.astype(np.int32),
            "mask_set_cum": mask_set_cum.astype(np.int64), "mask_pixel_start": mask_pixel_start,
        }
        assert pixel_set.shape[0] == n
        return cls(height, width, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})

    @classmethod
    def from_maskset(cls, masks) -> "PixelMasks":
        """From a :class:`~pepeseg3d_ns.priors.masks.MaskSet` (bit-packed), without expanding it to ``[M, H, W]``:
        memory ``O(H W M / 8)`` bytes, time ``O(H W M)`` bit operations once per image."""
        h, w, m = masks.height, masks.width, len(masks)
        n = h * w
        if m == 0:
            return cls._from_tables(h, w, np.zeros(n, np.int32), np.full((1, 1), -1, np.int32), 0)
        keys = _pixel_keys(masks.bits, m, n)
        first, pixel_set = _distinct_keys(keys)
        member = np.unpackbits(keys[:, first].T, axis=1, count=m).astype(bool)  # [C, M]
        count = member.sum(1)
        L = max(1, int(count.max()))
        set_masks = np.full((first.shape[0], L), -1, dtype=np.int32)
        rows, cols = np.nonzero(member)  # row-major: ascending masks within each set
        pos = np.arange(rows.shape[0]) - np.concatenate([[0], np.cumsum(count)])[rows]
        set_masks[rows, pos] = cols
        return cls._from_tables(h, w, pixel_set, set_masks, m)

    @classmethod
    def from_dense(cls, masks: Union[np.ndarray, Tensor]) -> "PixelMasks":
        """From bool masks ``[M, H, W]`` (numpy or torch; anything castable to bool)."""
        from pepeseg3d_ns.priors.masks import MaskSet

        return cls.from_maskset(MaskSet.from_dense(masks))

    # ------------------------------------------------------------------ serialisation
    def to_arrays(self) -> Dict[str, np.ndarray]:
        """The minimal lossless form, four numpy arrays: ``shape`` int64 [2] (H, W), ``pixel_set`` int32 [H*W],
        ``set_masks`` int32 [C, L], ``mask_area`` int64 [M]."""
        return {
            "shape": np.array([self.height, self.width], np.int64),
            "pixel_set": self.pixel_set.cpu().numpy().astype(np.int32, copy=False),
            "set_masks": self.set_masks.cpu().numpy().astype(np.int32, copy=False),
            "mask_area": self.mask_area.cpu().numpy().astype(np.int64, copy=False),
        }

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], source: str = "pixel masks") -> "PixelMasks":
        """Inverse of :meth:`to_arrays`; ``ValueError`` naming ``source`` (e.g. the file) when the arrays disagree."""
        missing = [k for k in _ARRAY_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"{source}: missing arrays {missing}")
        shape = np.asarray(arrays["shape"]).reshape(-1)
        pixel_set = np.asarray(arrays["pixel_set"]).reshape(-1)
        set_masks = np.asarray(arrays["set_masks"])
        mask_area = np.asarray(arrays["mask_area"]).reshape(-1)
        if shape.shape != (2,) or shape.min() < 1:
            raise ValueError(f"{source}: 'shape' must hold a positive (height, width), got {shape.tolist()}")
        h, w = int(shape[0]), int(shape[1])
        m = mask_area.shape[0]
        problem = None
        if pixel_set.shape[0] != h * w:
            problem = f"pixel_set has {pixel_set.shape[0]} entries for a {h}x{w} image"
        elif set_masks.ndim != 2 or set_masks.shape[0] < 1 or set_masks.shape[1] < 1:
            problem = f"set_masks must be [C, L] with C, L >= 1, got shape {tuple(set_masks.shape)}"
        elif pixel_set.min() < 0 or pixel_set.max() >= set_masks.shape[0]:
            problem = f"pixel_set holds ids outside [0, {set_masks.shape[0]})"
        elif set_masks.min() < -1 or set_masks.max() >= m:
            problem = f"set_masks holds mask ids outside [-1, {m})"
        else:
            key = np.where(set_masks < 0, m, set_masks)
            pad_pad = (key[:, 1:] == m) & (key[:, :-1] == m)
            if np.any((key[:, 1:] <= key[:, :-1]) & ~pad_pad):
                problem = "set_masks rows must be ascending mask ids followed by -1 padding"
            elif np.unique(set_masks, axis=0).shape[0] != set_masks.shape[0]:
                problem = "set_masks holds the same set twice"
        if problem is None:
            pm = cls._from_tables(h, w, pixel_set, set_masks, m)
            if np.any(pm.set_area.numpy() == 0):
                problem = "a set holds no pixel"
            elif not np.array_equal(pm.mask_area.numpy(), mask_area.astype(np.int64)):
                problem = "mask_area disagrees with the pixel sets"
            else:
                return pm
        raise ValueError(f"{source} is not a valid per-pixel mask table: {problem}; rebuild the priors")

    # ------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        return self.pixel_set.device

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "PixelMasks":
        """A copy on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return PixelMasks(self.height, self.width,
                          {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in self._TENSORS})

    def pin_memory(self) -> "PixelMasks":
        """A copy in pinned host memory (needs CUDA), for ``to(cuda, non_blocking=True)``."""
        return PixelMasks(self.height, self.width, {k: getattr(self, k).pin_memory() for k in self._TENSORS})

    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._TENSORS)

    # ------------------------------------------------------------------ lookups
    def membership_table(self) -> Tensor:
        """bool ``[C, M]``: which masks each set holds (``O(C M)``; for tests and small images)."""
        table = torch.zeros(self.num_sets, self.num_masks + 1, dtype=torch.bool, device=self.device)
        ids = torch.where(self.set_masks >= 0, self.set_masks.long(), self.num_masks)
        table.scatter_(1, ids, True)
        return table[:, : self.num_masks]

    def to_dense(self) -> Tensor:
        """bool ``[M, H, W]`` on this object's device (``O(H W M)``; for tests)."""
        dense = self.membership_table()[self.pixel_set.long()]  # [H*W, M]
        return dense.t().reshape(self.num_masks, self.height, self.width)

    def sets_of(self, pix: Tensor) -> Tensor:
        """long ``[P]`` set ids of flat pixel indices ``pix [P]`` (``y * W + x``)."""
        return self.pixel_set.index_select(0, pix.reshape(-1)).long()

    def contains(self, sets: Tensor, masks: Tensor) -> Tensor:
        """bool of ``masks``' broadcast shape: whether mask ``masks[...]`` (a long tensor, -1 = none, which is never
        contained) lies in set ``sets[...]``. Constant time per entry (one bit-set word read)."""
        m = masks.long()
        nw = self.set_bits.shape[1]
        idx = sets.long() * nw + torch.div(m.clamp(min=0), 32, rounding_mode="floor")
        word = self.set_bits.reshape(-1).index_select(0, idx.reshape(-1)).reshape(idx.shape)
        bit = (word >> (m.clamp(min=0) % 32).to(word.dtype)) & 1
        return (bit != 0) & (m >= 0)

    # ------------------------------------------------------------------ draws (with replacement)
    def sample_in_sets(self, sets: Tensor, u: Tensor) -> Tensor:
        """long ``[K]``: for each set ``sets[k]``, the pixel of rank ``floor(u[k] * area)`` among its pixels, i.e. a
        uniform pixel of the set for ``u [K]`` uniform in ``[0, 1)``."""
        sets = sets.long()
        area = self.set_area.index_select(0, sets)
        r = torch.minimum((u.double() * area.double()).long(), area - 1)
        return self.set_pixels.index_select(0, self.set_start.index_select(0, sets) + r).long()

    def sample_in_masks(self, masks: Tensor, u: Tensor) -> Tensor:
        """long ``[K]``: a uniform pixel inside each mask ``masks[k]`` (which must be non-empty) for ``u [K]`` uniform
        in ``[0, 1)``: the pixel of rank ``floor(u * area)`` when the mask's pixels are listed set by set."""
        masks = masks.long()
        area = self.mask_area.index_select(0, masks)
        r = torch.minimum((u.double() * area.double()).long(), area - 1)  # rank inside the mask
        g = self.mask_pixel_start.index_select(0, masks) + r  # rank in the concatenation of all masks' pixels
        k = torch.searchsorted(self.mask_set_cum, g.contiguous(), right=True)  # first entry whose count exceeds g
        s = self.mask_sets.index_select(0, k).long()
        before = self.mask_set_cum.index_select(0, k) - self.set_area.index_select(0, s)
        return self.set_pixels.index_select(0, self.set_start.index_select(0, s) + (g - before)).long()

    def __repr__(self) -> str:
        return (f"PixelMasks({self.height}x{self.width}, masks={self.num_masks}, sets={self.num_sets}, "
                f"max masks per pixel={self.max_masks_per_pixel}, {self.nbytes() / 2**20:.1f} MiB, {self.device})")
