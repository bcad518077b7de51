"""Index of the ground-truth segmentation masks of one dataparser split.

Every dataparser of this package puts a :class:`GtMasks` into ``DataparserOutputs.metadata["gt_masks"]``
(see :mod:`pepeseg3d_ns.data.benchmarks` and :mod:`pepeseg3d_ns.data.dataparser`). It only holds file paths;
masks are read on demand by :meth:`GtMasks.load`.

Two kinds of ground truth are described, possibly both in one index:

* **binary masks** (SPIn-NeRF, LERF-Mask): one image file per (view, object). The objects are names (a
  scene's object name, or a LERF-Mask text prompt). They live at the pseudo-level :data:`BINARY_LEVEL`
  (``"mask"``).
* **instance-id maps** (our synthetic scenes): one integer image per (hierarchy level, view); pixel value =
  instance id, ``0`` = background. The "objects" of a level are the ids present in at least one view of the
  split (background excluded), named by their decimal string (``"3"``).

Views are addressed by their index in the split's ``DataparserOutputs.image_filenames`` (``image_names``
holds those file names, so a view can also be looked up by name with :meth:`GtMasks.index_of`).

Binarisation (documented once, used by :meth:`GtMasks.load`):

* binary mask files: colour images are reduced to the per-pixel maximum over their colour channels (an alpha
  channel is ignored); 16-bit / integer images and 8-bit images whose maximum value is ``<= 1`` (0/1 label
  images such as SPIn-NeRF's ``label/``) are foreground where ``> 0``; other 8-bit images (0/255 PNG/JPG) are
  foreground where ``> 127``;
* instance-id maps: ``map == id`` (so foreground needs ``id > 0``).

Masks are resized to the requested ``(H, W)`` with nearest-neighbour sampling at pixel centres (source pixel
``floor((i + 0.5) * H_src / H)``), so an integer-factor downscale picks the same pixels as striding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

BINARY_LEVEL = "mask"
"""Level name of binary-mask ground truth (SPIn-NeRF, LERF-Mask)."""

__all__ = ["BINARY_LEVEL", "GtMasks", "index_id_maps", "read_binary_mask", "read_id_map", "resize_nearest"]


def resize_nearest(arr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``arr [H0, W0]`` (any dtype) to ``size = (H, W)``, sampling pixel centres.

    Output pixel ``(i, j)`` takes source pixel ``(floor((i + 0.5) * H0 / H), floor((j + 0.5) * W0 / W))``.
    """
    if arr.ndim != 2:
        raise ValueError(f"resize_nearest expects a 2-D [H, W] array, got shape {arr.shape}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be two positive integers (H, W), got {size}")
    h0, w0 = arr.shape
    if (h0, w0) == (h, w):
        return arr
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    return arr[rows[:, None], cols[None, :]]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Ground-truth mask {path} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Ground-truth mask {path} is not a readable image: {err}") from err


def read_binary_mask(path: Union[str, Path]) -> np.ndarray:
    """``bool [H, W]`` foreground of a binary mask image file (binarisation rules in the module docstring)."""
    arr = _read_image(Path(path))
    if arr.ndim == 3:
        arr = arr[..., : min(3, arr.shape[-1])].max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"Ground-truth mask {path} has unsupported shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype == np.uint8 and arr.max(initial=0) > 1:
        return arr > 127
    return arr > 0


def read_id_map(path: Union[str, Path]) -> np.ndarray:
    """``int64 [H, W]`` instance ids of an id-map image (16-bit or 8-bit single-channel PNG; 0 = background)."""
    arr = _read_image(Path(path))
    if arr.ndim != 2:
        raise ValueError(f"Instance-id map {path} must be a single-channel image, got shape {arr.shape}")
    return arr.astype(np.int64)


@dataclass
class GtMasks:
    """Where the ground-truth masks of one split are (paths only; plain Python types, picklable).

    Attributes:
        dataset: which annotation set, e.g. ``"spinnerf-mvseg"``, ``"spinnerf-inpainting"``, ``"lerf-mask"``,
            ``"synthetic"``.
        split: the dataparser split (``"train"``, ``"val"``, ``"test"``).
        image_names: ``[N]`` file names of the split's images, in ``image_filenames`` order.
        objects: names of the binary-mask objects (level :data:`BINARY_LEVEL`), sorted.
        files: image index -> object name -> binary mask path.
        id_maps: level -> image index -> instance-id map path (synthetic scenes).
        level_ids: level -> image index -> sorted instance ids (> 0) present in that view's map.
        notes: human-readable facts about the set (what was ignored, which views have no mask, ...).
    """

    dataset: str
    split: str
    image_names: List[str]
    objects: List[str] = field(default_factory=list)
    files: Dict[int, Dict[str, Path]] = field(default_factory=dict)
    id_maps: Dict[str, Dict[int, Path]] = field(default_factory=dict)
    level_ids: Dict[str, Dict[int, List[int]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    warps: Dict[int, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    """Per image index, the undistortion its image went through (:class:`~pepeseg3d_ns.data.undistort.MaskWarp`,
    set by the datamanager), mapping a ``bool [h, w]`` mask to ``bool [H', W']``; applied before any resize."""

    def __post_init__(self) -> None:
        n = len(self.image_names)
        for idx in list(self.files) + [i for m in self.id_maps.values() for i in m]:
            if not 0 <= int(idx) < n:
                raise ValueError(f"GtMasks: image index {idx} out of range for {n} images of split {self.split!r}")
        unknown = sorted({o for per in self.files.values() for o in per} - set(self.objects))
        if unknown:
            raise ValueError(f"GtMasks: mask files name objects {unknown} missing from objects={self.objects}")
        if BINARY_LEVEL in self.id_maps:
            raise ValueError(f"GtMasks: level name {BINARY_LEVEL!r} is reserved for binary masks")

    # ------------------------------------------------------------------ queries
    @property
    def levels(self) -> List[str]:
        """Levels with ground truth: ``["mask"]`` when there are binary masks, then the id-map levels in order."""
        out = [BINARY_LEVEL] if self.objects else []
        return out + list(self.id_maps)

    def objects_at(self, level: str = BINARY_LEVEL) -> List[str]:
        """Object names of ``level``: the binary objects, or the decimal ids present in some view of the split."""
        if level == BINARY_LEVEL:
            return list(self.objects)
        self._check_level(level)
        ids = sorted({i for per in self.level_ids.get(level, {}).values() for i in per})
        return [str(i) for i in ids]

    def views_of(self, obj: str, level: str = BINARY_LEVEL) -> List[int]:
        """Sorted image indices in which ``obj`` has a ground-truth mask.

        Binary masks: the views with a mask file for ``obj`` (the mask may be empty). Id maps: the views whose
        map contains the id (non-empty masks only; in the other views the object's true mask is empty).
        """
        if level == BINARY_LEVEL:
            if obj not in self.objects:
                raise KeyError(f"unknown object {obj!r}; objects with masks: {self.objects}")
            return sorted(i for i, per in self.files.items() if obj in per)
        self._check_level(level)
        oid = self._parse_id(obj)
        return sorted(i for i, ids in self.level_ids.get(level, {}).items() if oid in ids)

    def has_mask(self, image_idx: int, obj: str, level: str = BINARY_LEVEL) -> bool:
        """Whether ``load(image_idx, obj, level=level)`` would find a file (an id map counts for every id)."""
        if level == BINARY_LEVEL:
            return obj in self.files.get(int(image_idx), {})
        self._check_level(level)
        return int(image_idx) in self.id_maps[level]

    def index_of(self, name: str) -> int:
        """Image index of the file name ``name`` (a full path or just its name / stem)."""
        key = Path(name).name
        for i, n in enumerate(self.image_names):
            if Path(n).name == key:
                return i
        stem = Path(name).stem
        hits = [i for i, n in enumerate(self.image_names) if Path(n).stem == stem]
        if len(hits) == 1:
            return hits[0]
        raise KeyError(f"no image named {name!r} in split {self.split!r}")

    def load(
        self,
        image_idx: int,
        obj: Union[str, int],
        size: Optional[Tuple[int, int]] = None,
        level: str = BINARY_LEVEL,
    ) -> np.ndarray:
        """``bool [H, W]`` ground-truth mask of ``obj`` in view ``image_idx``.

        Args:
            image_idx: index into the split's ``image_filenames``.
            obj: binary-mask object name, or (id-map levels) an instance id as int or decimal string.
            size: ``(H, W)`` to resize to (nearest, pixel centres; e.g. the rendered size); None = file size.
            level: :data:`BINARY_LEVEL` for binary masks, else an id-map level such as ``"objects"``.

        Raises:
            KeyError: no mask for this (view, object, level).
        """
        image_idx = int(image_idx)
        if level == BINARY_LEVEL:
            path = self.files.get(image_idx, {}).get(str(obj))
            if path is None:
                raise KeyError(
                    f"no ground-truth mask of {obj!r} for image {image_idx} "
                    f"({self._name(image_idx)}) in split {self.split!r}"
                )
            mask = read_binary_mask(path)
        else:
            self._check_level(level)
            oid = self._parse_id(obj)
            path = self.id_maps[level].get(image_idx)
            if path is None:
                raise KeyError(f"no {level} id map for image {image_idx} ({self._name(image_idx)})")
            mask = read_id_map(path) == oid
        warp = self.warps.get(image_idx)
        if warp is not None:
            mask = warp(mask)
        if size is not None:
            mask = resize_nearest(mask, size)
        return mask

    def describe(self) -> str:
        """A few human-readable lines: data set, split, views with masks, objects per level, notes."""
        n = len(self.image_names)
        lines = [f"{self.dataset} ground truth, split {self.split!r}: {n} images"]
        if self.objects:
            views = sorted(self.files)
            lines.append(
                f"  binary masks: {len(self.objects)} object(s) in {len(views)}/{n} views: "
                + ", ".join(f"{o} ({len(self.views_of(o))} views)" for o in self.objects)
            )
        for lvl, maps in self.id_maps.items():
            lines.append(f"  level {lvl}: id maps for {len(maps)}/{n} views, ids {self.objects_at(lvl)}")
        lines.extend(f"  note: {s}" for s in self.notes)
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers
    def _name(self, idx: int) -> str:
        return self.image_names[idx] if 0 <= idx < len(self.image_names) else "out of range"

    def _check_level(self, level: str) -> None:
        if level not in self.id_maps:
            raise KeyError(f"unknown level {level!r}; levels with ground truth: {self.levels}")

    @staticmethod
    def _parse_id(obj: Union[str, int]) -> int:
        try:
            return int(obj)
        except (TypeError, ValueError) as err:
            raise KeyError(f"id-map objects are integer ids, got {obj!r}") from err


def index_id_maps(maps: Dict[str, Dict[int, Path]]) -> Dict[str, Dict[int, List[int]]]:
    """Read every id map of ``maps`` (level -> image index -> path) and list the ids ``> 0`` present in each."""
    out: Dict[str, Dict[int, List[int]]] = {}
    for lvl, per in maps.items():
        out[lvl] = {}
        for idx, path in per.items():
            ids = np.unique(read_id_map(path))
            out[lvl][idx] = [int(i) for i in ids if i > 0]
    return out
