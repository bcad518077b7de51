"""Evaluation: segmentation metrics (IoU, pixel accuracy, boundary IoU) and their per-object accumulator.

The label-propagation protocol builds on :mod:`pepeseg3d_ns.eval.metrics` and the ground-truth index
:class:`pepeseg3d_ns.data.gt_masks.GtMasks` that the dataparsers attach.
"""

from pepeseg3d_ns.eval.metrics import (
    BOUNDARY_RATIO,
    SegmentationScores,
    boundary_band,
    boundary_iou,
    erode,
    iou,
    mask_boundary,
    pixel_accuracy,
)

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
