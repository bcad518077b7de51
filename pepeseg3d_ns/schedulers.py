"""Learning-rate schedulers whose state holds plain Python floats.

nerfstudio's ``ExponentialDecayScheduler`` computes the multiplier with numpy, so optimizer and scheduler
state dicts (saved in every checkpoint) contain ``numpy.float64`` scalars. ``torch.load`` refuses those under
its ``weights_only=True`` default (torch >= 2.6), which breaks ``ns-eval`` / ``ns-viewer`` / ``ns-render`` on
the checkpoint. These schedulers return ``float`` so checkpoints load with the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    """nerfstudio's exponential decay with warm-up, whose state a weights-only checkpoint can hold."""

    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    """Same schedule as nerfstudio's; the multiplier (and so every stored learning rate) is a Python float."""

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> LRScheduler:
        scheduler = super().get_scheduler(optimizer, lr_init)
        inner = scheduler.lr_lambdas[0]
        scheduler.lr_lambdas = [lambda step: float(inner(step)) for _ in scheduler.lr_lambdas]
        # the constructor already stepped once with the numpy multiplier
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])
        scheduler._last_lr = [float(lr) for lr in scheduler._last_lr]  # type: ignore[attr-defined]
        return scheduler
