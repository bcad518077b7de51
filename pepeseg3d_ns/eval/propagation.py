"""Label propagation: the segmentation protocol of ns-eval and of the benchmarks (paper section 3.1.2).

For every ground-truth object (every instance of every hierarchy level on the synthetic scenes; every annotated
object or prompt on SPIn-NeRF / LERF-Mask):

1. **Reference view** (the only place ground truth is used to choose anything): the *training* view in which the
   object's ground-truth mask is largest. Data sets without training-view masks (LERF-Mask) take it from the
   evaluation views, as Gaussian Grouping's LERF-Mask evaluation prompts on its first test view: the reference is
   the first evaluation view (sorted) with a non-empty mask of the object, and that view itself is scored with
   the query of the next such view, so every evaluation view is scored and none with a query taken from its own
   mask. An object with a mask in one evaluation view only cannot be scored that way and is listed under
   ``"unscored"``.
2. **Query and scale**: for each scale ``s`` of :attr:`PropagationConfig.scales`, the query is the centroid of
   the dominant HDBSCAN cluster of the gated features inside the reference mask
   (:func:`pepeseg3d_ns.contrast.query.query_from_mask`); the reference view is segmented with it (cosine
   ``>= threshold``) and the ``s`` with the best IoU *on the reference view* is kept, with its query.
3. **Propagation**: every evaluation view in which the object has a ground-truth mask is segmented with that
   query at that scale (cosine ``>= threshold``, default 0.7, over pixels with accumulated opacity ``>= 0.5``)
   and scored against the mask (IoU, pixel accuracy, boundary IoU:
   :class:`pepeseg3d_ns.eval.metrics.SegmentationScores`).

Averages: per object over its evaluation views, then over objects (overall and per level).

:func:`trivial_baseline` scores two predictors that need no model on exactly the same (object, view) pairs: the
reference mask's bounding box, and all foreground. Thresholds of tests and benchmark tables are set against them.
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


Reference = Tuple[str, int, np.ndarray]
"""(split, view index, ``bool [H, W]`` mask) of a reference view."""


def _plan(train_gt, eval_gt, obj: str, level: str, size_of) -> List[Tuple[Reference, List[int]]]:
    """Which reference scores which evaluation views of ``obj`` (see the module docstring): a list of
    ``(reference, [eval view indices])``; empty when the object cannot be scored."""
    targets = eval_gt.views_of(obj, level)
    if train_gt is not None and level in train_gt.levels:
        best: Optional[Reference] = None
        for v in train_gt.views_of(obj, level):
            m = train_gt.load(v, obj, size=size_of("train", v), level=level)
            if m.any() and (best is None or m.sum() > best[2].sum()):
                best = ("train", v, m)
        if best is not None:
            return [(best, targets)]
    refs: List[Reference] = []
    for v in targets:
        m = eval_gt.load(v, obj, size=size_of("eval", v), level=level)
        if m.any():
            refs.append(("eval", v, m))
            if len(refs) == 2:
                break
    if len(refs) < 2:
        return []
    first, second = refs
    return [(first, [v for v in targets if v != first[1]]), (second, [first[1]])]


def _objects(eval_gt, config: PropagationConfig) -> List[Tuple[str, str]]:
    """(level, object) pairs to evaluate, in level order."""
    levels = [l for l in eval_gt.levels if config.levels is None or l in config.levels]
    todo = []
    for level in levels:
        objs = eval_gt.objects_at(level)
        if config.max_objects_per_level is not None:
            # the largest objects (by total eval-view area) first
            area = {o: sum(int(eval_gt.load(v, o, level=level).sum()) for v in eval_gt.views_of(o, level)) for o in objs}
            objs = sorted(objs, key=lambda o: -area[o])[: config.max_objects_per_level]
        todo += [(level, o) for o in objs]
    return todo


def _splits(pipeline):
    dm = pipeline.datamanager
    # both splits as trained / evaluated on: nerfstudio undistorts and crops each split's images (and replaces the
    # cameras' intrinsics) when it first caches them; the datamanager warps the ground-truth masks alike
    for split in ("cached_train", "cached_eval"):
        getattr(dm, split, None)
    eval_ds, train_ds = dm.eval_dataset, dm.train_dataset
    eval_gt, train_gt = _gt(eval_ds), _gt(train_ds)
    if eval_gt is None:
        raise ValueError(
            "the evaluation split has no ground-truth masks: use a data set whose parser provides them "
            "(synthetic scenes, --data with the spinnerf or lerf-mask dataparser)"
        )
    datasets = {"train": train_ds, "eval": eval_ds}

    def size_of(split: str, idx: int) -> Tuple[int, int]:
        cam = datasets[split].cameras[idx]
        return int(cam.height.item()), int(cam.width.item())

    return datasets, train_gt, eval_gt, size_of


@torch.no_grad()
def propagate_labels(pipeline, config: PropagationConfig = PropagationConfig(), progress: bool = True) -> Dict:
    """Run the protocol on a loaded pepe-contrast pipeline (``eval_setup(..., test_mode="test")``).

    Returns ``{"summary": SegmentationScores.summary(), "objects": [per-object choices: level, object,
    reference split/view, scale, reference IoU; on data without training-view masks also the reference that
    scored the first view], "records": per-view scores, "unscored": [level/object that no reference could
    score]}``. Raises ``ValueError`` when the evaluation split has no ground-truth masks
    (``metadata["gt_masks"]``)."""
    from tqdm import tqdm

    from pepeseg3d_ns.contrast.query import query_from_mask, segment_view
    from pepeseg3d_ns.eval.metrics import SegmentationScores, iou

    model = pipeline.model
    datasets, train_gt, eval_gt, size_of = _splits(pipeline)
    views = {split: _ViewCache(model, ds) for split, ds in datasets.items()}
    scores = SegmentationScores()
    chosen: List[Dict] = []
    unscored: List[str] = []
    for level, obj in tqdm(_objects(eval_gt, config), desc="label propagation", unit="object", disable=not progress):
        plan = _plan(train_gt, eval_gt, obj, level, size_of)
        if not plan:
            unscored.append(f"{level}/{obj}")
            continue
        choice: Dict = {"level": level, "object": obj}
        for k, ((ref_split, ref_idx, ref_mask), targets) in enumerate(plan):
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
            for v in targets:
                gt = eval_gt.load(v, obj, size=size_of("eval", v), level=level)
                pred = None if query is None else segment_view(views["eval"](v), scale, query, config.threshold,
                                                               config.min_alpha).cpu().numpy()
                scores.add(obj, level, v, pred, gt)
            info = {"reference": f"{ref_split}:{ref_idx}", "scale": scale, "reference_iou": ref_iou}
            if k == 0:
                choice.update(info)
            else:  # the query that scored the first reference view itself
                choice["own_view_reference"] = info
        chosen.append(choice)
    if len(scores) == 0:
        raise ValueError("no object could be evaluated (no evaluation view has a ground-truth mask)")
    return {"summary": scores.summary(), "objects": chosen, "records": scores.records(), "unscored": unscored}


def _bbox(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``bool [H, W]`` (``size``) box covering the bounding box of ``mask`` in relative image coordinates."""
    rows, cols = np.nonzero(mask)
    h0, w0 = mask.shape
    h, w = size
    out = np.zeros((h, w), dtype=bool)
    r0, r1 = int(np.floor(rows.min() * h / h0)), int(np.ceil((rows.max() + 1) * h / h0))
    c0, c1 = int(np.floor(cols.min() * w / w0)), int(np.ceil((cols.max() + 1) * w / w0))
    out[r0:r1, c0:c1] = True
    return out


def _foreground(eval_gt, level: str, view: int, size: Tuple[int, int]) -> np.ndarray:
    """Union of every ground-truth object of ``level`` in ``view`` (id maps: every id > 0)."""
    from pepeseg3d_ns.data.gt_masks import BINARY_LEVEL, read_id_map, resize_nearest

    if level == BINARY_LEVEL:
        out = np.zeros(size, dtype=bool)
        for o in eval_gt.files.get(view, {}):
            out |= eval_gt.load(view, o, size=size)
        return out
    return resize_nearest(read_id_map(eval_gt.id_maps[level][view]) > 0, size)


def trivial_baseline(pipeline, kind: str, config: PropagationConfig = PropagationConfig()) -> Dict:
    """Scores of a predictor that needs no model, on the (object, view) pairs that :func:`propagate_labels`
    scores with the same references (only the datamanager's ground truth and image sizes are read).

    ``kind``: ``"bbox"``, the bounding box of the reference mask (in relative image coordinates) in every view it
    scores; ``"foreground"``, every ground-truth foreground pixel of the view at the object's level (on binary
    masks: the union of the view's annotated objects, which is the object itself when there is only one).
    Returns ``{"summary": SegmentationScores.summary(), "records": per-view scores}``."""
    from pepeseg3d_ns.eval.metrics import SegmentationScores

    if kind not in ("bbox", "foreground"):
        raise ValueError(f"unknown trivial baseline {kind!r}; choices: bbox, foreground")
    _, train_gt, eval_gt, size_of = _splits(pipeline)
    scores = SegmentationScores()
    for level, obj in _objects(eval_gt, config):
        for (_, _, ref_mask), targets in _plan(train_gt, eval_gt, obj, level, size_of):
            for v in targets:
                size = size_of("eval", v)
                gt = eval_gt.load(v, obj, size=size, level=level)
                pred = _bbox(ref_mask, size) if kind == "bbox" else _foreground(eval_gt, level, v, size)
                scores.add(obj, level, v, pred, gt)
    if len(scores) == 0:
        raise ValueError("no object could be evaluated (no evaluation view has a ground-truth mask)")
    return {"summary": scores.summary(), "records": scores.records()}


def format_summary(summary: Dict, title: str = "") -> str:
    """Markdown table (mIoU / mAcc / mBIoU per level and overall) of a :func:`propagate_labels` summary."""
    lines = ([f"**{title}**", ""] if title else []) + ["| level | objects | mIoU | mAcc | mBIoU |", "|---|---|---|---|---|"]
    for lvl, s in summary["per_level"].items():
        lines.append(f"| {lvl} | {s['n_objects']} | {s['miou']:.3f} | {s['macc']:.3f} | {s['mbiou']:.3f} |")
    o = summary["overall"]
    lines.append(f"| all | {o['n_objects']} | {o['miou']:.3f} | {o['macc']:.3f} | {o['mbiou']:.3f} |")
    return "\n".join(lines) + "\n"


__all__ = ["PropagationConfig", "propagate_labels", "trivial_baseline", "format_summary"]
