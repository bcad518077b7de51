"""Segmentation metrics: IoU, pixel accuracy, boundary IoU, and a per-object accumulator.

Conventions (all functions):

* masks are ``[H, W]`` numpy arrays or torch tensors (any device), ``bool`` or numeric with values in
  ``{0, 1}`` only; ``pred`` and ``gt`` must have the same shape;
* ``pred=None`` means "no prediction" (the method produced nothing for this view): IoU and boundary IoU are
  ``0.0`` (even when ``gt`` is empty: a missing answer is never counted as right) and pixel accuracy is that
  of an all-background prediction, ``1 - mean(gt)``;
* both masks empty (empty union): IoU and boundary IoU are ``1.0`` (the prediction is exactly right); no
  metric ever returns NaN.

Boundary IoU follows the LERF-Mask evaluation (Gaussian Grouping's script, after Cheng et al. 2021): the
boundary of a mask ``M`` is ``M & ~erode(M, b)``, where ``erode`` uses a ``(2b+1) x (2b+1)`` square (a
pixel stays iff every pixel within Chebyshev distance ``b`` is in ``M``; pixels outside the image count as
background, so a mask touching the image border has a boundary there), and
``b = max(1, round(0.02 * sqrt(H^2 + W^2)))`` with Python's ``round`` (half to even). Boundary IoU is the IoU
of the two boundary masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Union

import numpy as np

try:  # torch is optional for these pure functions
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = [
    "BOUNDARY_RATIO",
    "SegmentationScores",
    "boundary_band",
    "boundary_iou",
    "erode",
    "iou",
    "mask_boundary",
    "pixel_accuracy",
]

BOUNDARY_RATIO = 0.02
"""Boundary band width as a fraction of the image diagonal (LERF-Mask evaluation)."""

MaskLike = Union[np.ndarray, "torch.Tensor"]


def _as_mask(m: MaskLike, name: str) -> np.ndarray:
    """``bool [H, W]`` numpy copy of a mask (bool, or numeric holding only 0 and 1)."""
    if torch is not None and isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    if not isinstance(m, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor [H, W], got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask [H, W], got shape {tuple(m.shape)}")
    if m.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(m.shape)})")
    if m.dtype == np.bool_:
        return m
    if not (np.issubdtype(m.dtype, np.number)) or not np.isin(m, (0, 1)).all():
        raise ValueError(
            f"{name} must be bool or hold only 0/1 (dtype {m.dtype}); threshold it first, e.g. `mask > 0.5`"
        )
    return m.astype(bool)


def _pair(pred: Optional[MaskLike], gt: MaskLike) -> tuple:
    g = _as_mask(gt, "gt")
    if pred is None:
        return None, g
    p = _as_mask(pred, "pred")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    return p, g


def _iou_np(p: np.ndarray, g: np.ndarray) -> float:
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def iou(pred: Optional[MaskLike], gt: MaskLike) -> float:
    """Intersection over union ``|P & G| / |P | G|`` of two masks ``[H, W]``.

    Returns 1.0 when both are empty, 0.0 for ``pred=None``.
    """
    p, g = _pair(pred, gt)
    if p is None:
        return 0.0
    return _iou_np(p, g)


def pixel_accuracy(pred: Optional[MaskLike], gt: MaskLike) -> float:
    """Fraction of the ``H * W`` pixels whose label (foreground or background) is right.

    ``pred=None`` scores as an all-background prediction: ``1 - |G| / (H * W)``.
    """
    p, g = _pair(pred, gt)
    if p is None:
        return 1.0 - float(np.count_nonzero(g)) / g.size
    return float(np.count_nonzero(p == g)) / g.size


def boundary_band(height: int, width: int, ratio: float = BOUNDARY_RATIO) -> int:
    """Band width ``b = max(1, round(ratio * sqrt(H^2 + W^2)))`` in pixels."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return max(1, int(round(ratio * math.sqrt(height * height + width * width))))


def erode(mask: MaskLike, band: int) -> np.ndarray:
    """``bool [H, W]`` erosion of ``mask`` by a ``(2 band + 1)``-wide square; outside the image = background.

    Pixel ``(i, j)`` survives iff all pixels ``(i', j')`` with ``|i - i'| <= band`` and ``|j - j'| <= band`` are
    inside the image and in the mask. Computed with a summed-area table (O(H W)).
    """
    m = _as_mask(mask, "mask")
    band = int(band)
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    if band == 0:
        return m.copy()
    h, w = m.shape
    k = 2 * band + 1
    padded = np.zeros((h + 2 * band + 1, w + 2 * band + 1), dtype=np.int64)
    padded[band + 1: band + 1 + h, band + 1: band + 1 + w] = m
    sat = padded.cumsum(0).cumsum(1)  # sat[r, c] = sum of padded[:r+1, :c+1]; row/col 0 are zeros
    window = sat[k:, k:] - sat[:-k, k:] - sat[k:, :-k] + sat[:-k, :-k]  # [H, W] sums of k x k windows
    return window == k * k


def mask_boundary(mask: MaskLike, band: Optional[int] = None) -> np.ndarray:
    """``bool [H, W]`` inner boundary ``M & ~erode(M, band)``; ``band=None`` -> :func:`boundary_band`."""
    m = _as_mask(mask, "mask")
    b = boundary_band(*m.shape) if band is None else int(band)
    if b < 1:
        raise ValueError(f"band must be >= 1, got {b}")
    return m & ~erode(m, b)


def boundary_iou(pred: Optional[MaskLike], gt: MaskLike, band: Optional[int] = None) -> float:
    """IoU of the boundaries of ``pred`` and ``gt`` (see the module docstring), each ``[H, W]``.

    ``band=None``: ``max(1, round(0.02 * image diagonal))``. Both boundaries empty (both masks empty) -> 1.0;
    ``pred=None`` -> 0.0.
    """
    p, g = _pair(pred, gt)
    if p is None:
        return 0.0
    b = boundary_band(*g.shape) if band is None else int(band)
    return _iou_np(mask_boundary(p, b), mask_boundary(g, b))


@dataclass(frozen=True)
class _Record:
    obj: str
    level: str
    view: Hashable
    iou: float
    acc: float
    biou: float


class SegmentationScores:
    """Accumulates per-view scores and averages them per object, then over objects.

    ``summary()`` returns::

        {"overall":   {"miou", "macc", "mbiou", "n_objects", "n_views"},
         "per_level": {level: {"miou", "macc", "mbiou", "n_objects", "n_views"}},
         "per_object": {level: {object: {"iou", "acc", "biou", "n_views"}}}}

    where an object's ``iou`` is the mean over its views, and ``miou`` the mean of those over the objects
    (overall: all (level, object) pairs; per level: that level's objects). The same object name at two levels
    counts as two objects. Values are plain floats, so the dict is JSON-serialisable.
    """

    def __init__(self, band: Optional[int] = None):
        """``band``: boundary band for every view (None = per-image default of :func:`boundary_band`)."""
        self.band = band
        self._records: List[_Record] = []
        self._keys: set = set()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, obj: str, level: str, view: Hashable, pred: Optional[MaskLike], gt: MaskLike) -> Dict[str, float]:
        """Score one view of one object; returns ``{"iou", "acc", "biou"}`` of that view.

        Raises ``ValueError`` when (obj, level, view) was already added or the masks are malformed.
        """
        key = (str(obj), str(level), view)
        if key in self._keys:
            raise ValueError(f"scores for object {obj!r}, level {level!r}, view {view!r} were already added")
        p, g = _pair(pred, gt)
        rec = _Record(
            obj=str(obj),
            level=str(level),
            view=view,
            iou=iou(p, g),
            acc=pixel_accuracy(p, g),
            biou=boundary_iou(p, g, self.band),
        )
        self._records.append(rec)
        self._keys.add(key)
        return {"iou": rec.iou, "acc": rec.acc, "biou": rec.biou}

    def records(self) -> List[Dict[str, object]]:
        """Every added view as ``{"object", "level", "view", "iou", "acc", "biou"}``, in insertion order."""
        return [dict(object=r.obj, level=r.level, view=r.view, iou=r.iou, acc=r.acc, biou=r.biou)
                for r in self._records]

    def summary(self) -> Dict[str, dict]:
        """Per-object means, then means over objects, overall and per level (see the class docstring)."""
        if not self._records:
            raise ValueError("SegmentationScores.summary(): no scores were added")
        per_object: Dict[str, Dict[str, dict]] = {}
        groups: Dict[tuple, List[_Record]] = {}
        for r in self._records:
            groups.setdefault((r.level, r.obj), []).append(r)
        for (lvl, obj), recs in groups.items():
            per_object.setdefault(lvl, {})[obj] = {
                "iou": float(np.mean([r.iou for r in recs])),
                "acc": float(np.mean([r.acc for r in recs])),
                "biou": float(np.mean([r.biou for r in recs])),
                "n_views": len(recs),
            }

        def agg(objs: List[dict]) -> dict:
            return {
                "miou": float(np.mean([o["iou"] for o in objs])),
                "macc": float(np.mean([o["acc"] for o in objs])),
                "mbiou": float(np.mean([o["biou"] for o in objs])),
                "n_objects": len(objs),
                "n_views": int(sum(o["n_views"] for o in objs)),
            }

        per_level = {lvl: agg(list(objs.values())) for lvl, objs in per_object.items()}
        overall = agg([o for objs in per_object.values() for o in objs.values()])
        return {"overall": overall, "per_level": per_level, "per_object": per_object}
