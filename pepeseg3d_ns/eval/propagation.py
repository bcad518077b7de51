"""Label propagation: the segmentation protocol of ns-eval and of the benchmarks (paper section 3.1.2).

For every ground-truth object (every instance of every hierarchy level on the synthetic scenes; every annotated
object or prompt on SPIn-NeRF / LERF-Mask):

1. **Reference view** (the only place ground truth is used to choose anything): the *training* view in which the
   object's ground-truth mask is largest. Data sets without training-view masks (LERF-Mask) use the first
   evaluation view, in sorted order, that has a mask of the object; that view is then left out of the scores.
2. **Query and scale**: for each scale ``s`` of :attr:`PropagationConfig.scales`, the query is the centroid of
   the dominant HDBSCAN cluster of the gated features inside the reference mask
   (:func:`pepeseg3d_ns.contrast.query.query_from_mask`); the reference view is segmented with it (cosine
   ``>= threshold``) and the ``s`` with the best IoU *on the reference view* is kept, with its query.
3. **Propagation**: every evaluation view in which the object has a ground-truth mask is segmented with that
   query at that scale (cosine ``>= threshold``, default 0.7, over pixels with accumulated opacity ``>= 0.5``)
   and scored against the mask (IoU, pixel accuracy, boundary IoU:
   :class:`pepeseg3d_ns.eval.metrics.SegmentationScores`).

Averages: per object over its evaluation views, then over objects (overall and per level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


@dataclass
class PropagationConfig:
    threshold: float = 0.7
    """Cosine similarity to the query from which a pixel belongs to the segment."""
    scales: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    """Scales tried on the reference view."""
    levels: Optional[Tuple[str, ...]] = None
    """Ground-truth levels to evaluate (None = all the data set has)."""
    min_alpha: float = 0.5
    """Pixels less opaque than this are never part of a segment."""
    max_objects_per_level: Optional[int] = None
    """Evaluate at most this many objects per level (the largest ones; None = all)."""


def _gt(dataset):
    return dataset._dataparser_outputs.metadata.get("gt_masks")


class _ViewCache:
    def __init__(self, model, dataset):
        self.model, self.dataset, self.views = model, dataset, {}

    def __call__(self, idx: int):
        from pepeseg3d_ns.contrast.query import render_view

        if idx not in self.views:
            self.views[idx] = render_view(self.model, self.dataset.cameras[idx : idx + 1])
        return self.views[idx]


def _reference(train_gt, eval_gt, obj: str, level: str, size_of) -> Tuple[str, int, np.ndarray]:
    """(split, view index, mask) of the reference view of ``obj`` (see the module docstring)."""
    if train_gt is not None and level in train_gt.levels:
        views = train_gt.views_of(obj, level)
        best, best_area, best_mask = None, -1, None
        for v in views:
            m = train_gt.load(v, obj, size=size_of("train", v), level=level)
            if m.sum() > best_area:
                best, best_area, best_mask = v, int(m.sum()), m
        if best is not None and best_area > 0:
            return "train", best, best_mask
    for v in eval_gt.views_of(obj, level):
        m = eval_gt.load(v, obj, size=size_of("eval", v), level=level)
        if m.any():
            return "eval", v, m
    raise LookupError(f"object {obj!r} ({level}) has no non-empty ground-truth mask")


@torch.no_grad()
def propagate_labels(pipeline, config: PropagationConfig = PropagationConfig(), progress: bool = True) -> Dict:
    """Run the protocol on a loaded pepe-contrast pipeline (``eval_setup(..., test_mode="test")``).

    Returns ``{"summary": SegmentationScores.summary(), "objects": [per-object choices: level, object,
    reference split/view, scale, reference IoU], "records": per-view scores}``. Raises ``ValueError`` when the
    evaluation split has no ground-truth masks (``metadata["gt_masks"]``)."""
    from tqdm import tqdm

    from pepeseg3d_ns.contrast.query import query_from_mask, segment_view
    from pepeseg3d_ns.eval.metrics import SegmentationScores, iou

    model = pipeline.model
    dm = pipeline.datamanager
    eval_ds, train_ds = dm.eval_dataset, dm.train_dataset
    eval_gt, train_gt = _gt(eval_ds), _gt(train_ds)
    if eval_gt is None:
        raise ValueError(
            "the evaluation split has no ground-truth masks: use a data set whose parser provides them "
            "(synthetic scenes, --data with the spinnerf or lerf-mask dataparser)"
        )
    views = {"train": _ViewCache(model, train_ds), "eval": _ViewCache(model, eval_ds)}
    datasets = {"train": train_ds, "eval": eval_ds}

    def size_of(split: str, idx: int) -> Tuple[int, int]:
        cam = datasets[split].cameras[idx]
        return int(cam.height.item()), int(cam.width.item())

    levels = [l for l in eval_gt.levels if config.levels is None or l in config.levels]
    scores = SegmentationScores()
    chosen: List[Dict] = []
    todo = []
    for level in levels:
        objs = eval_gt.objects_at(level)
        if config.max_objects_per_level is not None:
            # the largest objects (by total eval-view area) first
            area = {o: sum(int(eval_gt.load(v, o, level=level).sum()) for v in eval_gt.views_of(o, level)) for o in objs}
            objs = sorted(objs, key=lambda o: -area[o])[: config.max_objects_per_level]
        todo += [(level, o) for o in objs]
    for level, obj in tqdm(todo, desc="label propagation", unit="object", disable=not progress):
        try:
            ref_split, ref_idx, ref_mask = _reference(train_gt, eval_gt, obj, level, size_of)
        except LookupError:
            continue
        ref_view = views[ref_split](ref_idx)
        ref_mask_t = torch.from_numpy(ref_mask).to(ref_view.features.device)
        best = (-1.0, None, None)
        for s in config.scales:
            q = query_from_mask(ref_view, s, ref_mask_t)
            if q is None:
                continue
            pred = segment_view(ref_view, s, q, config.threshold, config.min_alpha).cpu().numpy()
            score = iou(pred, ref_mask)
            if score > best[0]:
                best = (score, s, q)
        ref_iou, scale, query = best
        for v in eval_gt.views_of(obj, level):
            if ref_split == "eval" and v == ref_idx:
                continue
            gt = eval_gt.load(v, obj, size=size_of("eval", v), level=level)
            pred = None if query is None else segment_view(views["eval"](v), scale, query, config.threshold,
                                                           config.min_alpha).cpu().numpy()
            scores.add(obj, level, v, pred, gt)
        chosen.append({"level": level, "object": obj, "reference": f"{ref_split}:{ref_idx}", "scale": scale,
                       "reference_iou": ref_iou})
    if len(scores) == 0:
        raise ValueError("no object could be evaluated (no evaluation view has a ground-truth mask)")
    return {"summary": scores.summary(), "objects": chosen, "records": scores.records()}


def format_summary(summary: Dict, title: str = "") -> str:
    """Markdown table (mIoU / mAcc / mBIoU per level and overall) of a :func:`propagate_labels` summary."""
    lines = ([f"**{title}**", ""] if title else []) + ["| level | objects | mIoU | mAcc | mBIoU |", "|---|---|---|---|---|"]
    for lvl, s in summary["per_level"].items():
        lines.append(f"| {lvl} | {s['n_objects']} | {s['miou']:.3f} | {s['macc']:.3f} | {s['mbiou']:.3f} |")
    o = summary["overall"]
    lines.append(f"| all | {o['n_objects']} | {o['miou']:.3f} | {o['macc']:.3f} | {o['mbiou']:.3f} |")
    return "\n".join(lines) + "\n"


__all__ = ["PropagationConfig", "propagate_labels", "format_summary"]
