"""Compact storage of a set of overlapping binary masks for one image (SAM-style output).

A :class:`MaskSet` keeps ``M`` masks of one ``H x W`` image bit-packed (one bit per pixel, row-major, the
layout of ``np.packbits(mask.reshape(-1))``), together with per-mask metadata:

* ``areas``     int64   [M]     number of pixels in each mask
* ``scores``    float32 [M]     predicted quality (SAM's ``predicted_iou``; 1.0 for ground truth)
* ``stability`` float32 [M]     SAM's stability score (1.0 for ground truth)
* ``bboxes``    int32   [M, 4]  ``(x0, y0, w, h)`` in pixels, ``(0, 0, 0, 0)`` for an empty mask
* ``meta``      dict            free-form JSON-serialisable information (source name, per-mask labels, ...)

On disk a mask set is one ``.npz`` file (compressed), written atomically.  ``MaskSet.load`` checks that every
array has the shape the header promises and raises ``ValueError`` naming the file otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = ["MaskSet", "atomic_tmp_path"]

_FORMAT = "pepeseg3d-maskset-v1"
_KEYS = ("format", "shape", "bits", "areas", "scores", "stability", "bboxes", "meta")


def atomic_tmp_path(path: Path) -> Path:
    """Temporary sibling ``<path>.tmp-<pid>`` used for atomic writes (``os.replace`` onto ``path``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _row_bytes(height: int, width: int) -> int:
    return (int(height) * int(width) + 7) // 8


def _bboxes_from_dense(masks: np.ndarray) -> np.ndarray:
    """[M, 4] int32 (x0, y0, w, h) of bool masks [M, H, W]; zeros for empty masks."""
    m = masks.shape[0]
    out = np.zeros((m, 4), dtype=np.int32)
    if m == 0:
        return out
    rows = masks.any(axis=2)  # [M, H]
    cols = masks.any(axis=1)  # [M, W]
    nonempty = rows.any(axis=1)
    if not nonempty.any():
        return out
    h, w = masks.shape[1], masks.shape[2]
    y0 = rows.argmax(axis=1)
    y1 = h - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - 1 - cols[:, ::-1].argmax(axis=1)
    box = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1).astype(np.int32)
    out[nonempty] = box[nonempty]
    return out


@dataclass(eq=False)
class MaskSet:
    """``M`` binary masks of one ``height x width`` image, bit-packed.  See the module docstring."""

    height: int
    width: int
    bits: np.ndarray  # uint8 [M, ceil(H*W/8)]
    areas: np.ndarray  # int64 [M]
    scores: np.ndarray  # float32 [M]
    stability: np.ndarray  # float32 [M]
    bboxes: np.ndarray  # int32 [M, 4] (x0, y0, w, h)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.height, self.width = int(self.height), int(self.width)
        self.bits = np.ascontiguousarray(self.bits, dtype=np.uint8)
        self.areas = np.asarray(self.areas, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.stability = np.asarray(self.stability, dtype=np.float32)
        self.bboxes = np.asarray(self.bboxes, dtype=np.int32)
        if self.meta is None:
            self.meta = {}
        problem = self._shape_problem()
        if problem:
            raise ValueError(f"inconsistent MaskSet: {problem}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        masks: np.ndarray,
        scores: Optional[Sequence[float]] = None,
        stability: Optional[Sequence[float]] = None,
        meta: Optional[dict] = None,
    ) -> "MaskSet":
        """Pack bool masks ``[M, H, W]`` (anything castable to bool; a torch tensor works too).

        ``scores`` / ``stability`` default to 1.0 for every mask.
        """
        if hasattr(masks, "detach"):  # torch tensor
            masks = masks.detach().cpu().numpy()
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be [M, H, W], got shape {masks.shape}")
        masks = masks.astype(bool, copy=False)
        m, h, w = masks.shape
        flat = masks.reshape(m, h * w)
        bits = np.packbits(flat, axis=1) if m else np.zeros((0, _row_bytes(h, w)), np.uint8)
        areas = flat.sum(axis=1, dtype=np.int64)
        scores = np.ones(m, np.float32) if scores is None else np.asarray(scores, np.float32).reshape(-1)
        stability = np.ones(m, np.float32) if stability is None else np.asarray(stability, np.float32).reshape(-1)
        return cls(h, w, bits, areas, scores, stability, _bboxes_from_dense(masks), dict(meta or {}))

    @classmethod
    def empty(cls, height: int, width: int, meta: Optional[dict] = None) -> "MaskSet":
        return cls.from_dense(np.zeros((0, height, width), bool), meta=meta)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.bits.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the image the masks belong to."""
        return self.height, self.width

    def to_dense(self) -> np.ndarray:
        """bool [M, H, W]."""
        n = self.height * self.width
        if len(self) == 0:
            return np.zeros((0, self.height, self.width), dtype=bool)
        flat = np.unpackbits(self.bits, axis=1, count=n)
        return flat.reshape(len(self), self.height, self.width).view(bool)

    def to_torch(self, device: Any = "cpu"):
        """bool ``torch.Tensor`` [M, H, W] on ``device``."""
        import torch

        return torch.from_numpy(self.to_dense()).to(device)

    def mask(self, i: int) -> np.ndarray:
        """bool [H, W] of mask ``i``."""
        row = self.bits[i]
        return np.unpackbits(row, count=self.height * self.width).reshape(self.height, self.width).view(bool)

    def subset(self, index: Union[Sequence[int], np.ndarray]) -> "MaskSet":
        """Masks selected by an integer index array or a bool [M] array (order as given)."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        idx = idx.astype(np.int64).reshape(-1)
        meta = dict(self.meta)
        labels = meta.get("labels")
        if isinstance(labels, list) and len(labels) == len(self):
            meta["labels"] = [labels[int(i)] for i in idx]
        return MaskSet(self.height, self.width, self.bits[idx], self.areas[idx], self.scores[idx],
                       self.stability[idx], self.bboxes[idx], meta)

    def sorted_by_area(self) -> "MaskSet":
        """Same masks ordered by ascending area (stable: equal areas keep their order)."""
        return self.subset(np.argsort(self.areas, kind="stable"))

    def resized(self, height: int, width: int, chunk: int = 64) -> "MaskSet":
        """Nearest-neighbour resample to ``height x width`` (pixel-centre sampling); areas/bboxes recomputed.

        Use this when splatfacto trains on a downscaled copy of the images the priors were computed on.
        """
        height, width = int(height), int(width)
        if height < 1 or width < 1:
            raise ValueError(f"resized: target size must be positive, got {height}x{width}")
        if (height, width) == (self.height, self.width):
            return self.subset(np.arange(len(self)))
        rows = np.minimum(((np.arange(height) + 0.5) * self.height / height).astype(np.int64), self.height - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * self.width / width).astype(np.int64), self.width - 1)
        pieces = []
        for start in range(0, len(self), chunk):
            dense = self.subset(np.arange(start, min(start + chunk, len(self)))).to_dense()
            pieces.append(dense[:, rows][:, :, cols])
        dense = np.concatenate(pieces) if pieces else np.zeros((0, height, width), bool)
        return MaskSet.from_dense(dense, self.scores.copy(), self.stability.copy(), meta=dict(self.meta))

    # ------------------------------------------------------------------ checks
    def _shape_problem(self) -> Optional[str]:
        if self.height < 1 or self.width < 1:
            return f"image size {self.height}x{self.width} is not positive"
        if self.bits.ndim != 2 or self.bits.shape[1] != _row_bytes(self.height, self.width):
            return (f"bits has shape {tuple(self.bits.shape)}, expected [M, {_row_bytes(self.height, self.width)}] "
                    f"for a {self.height}x{self.width} image")
        m = self.bits.shape[0]
        for name in ("areas", "scores", "stability"):
            arr = getattr(self, name)
            if arr.shape != (m,):
                return f"{name} has shape {tuple(arr.shape)}, expected ({m},)"
        if self.bboxes.shape != (m, 4):
            return f"bboxes has shape {tuple(self.bboxes.shape)}, expected ({m}, 4)"
        return None

    # ------------------------------------------------------------------ disk
    def to_bytes(self) -> bytes:
        """The compressed ``.npz`` file :meth:`save` writes, as bytes."""
        import io

        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            format=np.array(_FORMAT),
            shape=np.array([self.height, self.width], np.int64),
            bits=self.bits,
            areas=self.areas,
            scores=self.scores,
            stability=self.stability,
            bboxes=self.bboxes,
            meta=np.array(json.dumps(self.meta)),
        )
        return buf.getvalue()

    def save(self, path: Union[str, Path]) -> Path:
        """Write a compressed ``.npz`` atomically (``<path>.tmp-<pid>`` then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_tmp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(self.to_bytes())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: Union[str, Path, Any], expected_shape: Optional[tuple[int, int]] = None,
             name: Optional[str] = None) -> "MaskSet":
        """Read a file written by :meth:`save` (a path, or a binary file object such as ``io.BytesIO`` of its
        bytes; ``name`` is then the file named in errors).

        Raises ``ValueError`` naming the file when it is unreadable, its arrays disagree with each other, or
        (if ``expected_shape=(H, W)`` is given) its image size differs from ``expected_shape``.
        """
        if isinstance(path, (str, Path)):
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"mask file {path} does not exist")
            source = path
        else:
            source, path = path, (name or "<bytes>")
        try:
            with np.load(source, allow_pickle=False) as z:
                missing = [k for k in _KEYS if k not in z.files]
                if missing:
                    raise ValueError(f"missing arrays {missing}")
                arrays = {k: z[k] for k in _KEYS}
        except ValueError as err:
            raise ValueError(f"mask file {path} is not a valid pepeseg3d mask set: {err}") from None
        except Exception as err:  # zipfile.BadZipFile, EOFError, OSError ...
            raise ValueError(f"mask file {path} could not be read ({type(err).__name__}: {err}); "
                             f"delete it and rebuild the priors") from None
        if str(arrays["format"]) != _FORMAT:
            raise ValueError(f"mask file {path} has format {str(arrays['format'])!r}, expected {_FORMAT!r}")
        shape = arrays["shape"].reshape(-1)
        if shape.shape != (2,):
            raise ValueError(f"mask file {path}: 'shape' must hold (height, width), got {shape.tolist()}")
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as err:
            raise ValueError(f"mask file {path}: unreadable meta ({err})") from None
        try:
            ms = cls(int(shape[0]), int(shape[1]), arrays["bits"], arrays["areas"], arrays["scores"],
                     arrays["stability"], arrays["bboxes"], meta)
        except ValueError as err:
            raise ValueError(f"mask file {path}: {err}") from None
        if ms.bits.dtype != np.uint8 or arrays["bits"].dtype != np.uint8:
            raise ValueError(f"mask file {path}: bits must be uint8, got {arrays['bits'].dtype}")
        if expected_shape is not None and tuple(int(x) for x in expected_shape) != ms.shape:
            raise ValueError(
                f"mask file {path} holds masks of size {ms.height}x{ms.width} (HxW) but the image is "
                f"{int(expected_shape[0])}x{int(expected_shape[1])}; the cache is stale or was built from other images"
            )
        return ms

    @staticmethod
    def read_shape(path: Union[str, Path]) -> tuple[int, int]:
        """``(height, width)`` stored in a mask file, without decompressing the masks (``ValueError`` naming the
        file when it cannot be read)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                shape = z["shape"].reshape(-1)
            return int(shape[0]), int(shape[1])
        except FileNotFoundError:
            raise FileNotFoundError(f"mask file {path} does not exist") from None
        except Exception as err:
            raise ValueError(f"mask file {path} could not be read ({type(err).__name__}: {err})") from None

    def __repr__(self) -> str:
        return f"MaskSet(n={len(self)}, height={self.height}, width={self.width})"
