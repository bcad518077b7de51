"""Evaluation: segmentation metrics (IoU, pixel accuracy, boundary IoU) and their per-object accumulator.

The label-propagation protocol builds on :mod:`pepeseg3d_ns.eval.metrics` and the ground-truth index
:class:`pepeseg3d_ns.data.gt_masks.GtMasks` that the dataparsers attach.
"""

from pepeseg3d_ns.eval.metrics import *  # noqa: F401,F403  (the names listed in metrics.__all__)
from pepeseg3d_ns.eval.metrics import __all__  # noqa: F401
