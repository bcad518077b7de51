"""Reading a nerfstudio run's tensorboard scalars in tests."""

from __future__ import annotations

from pathlib import Path


def scalars(run_dir: Path, tag: str):
    """``[(step, value), ...]`` logged under ``tag`` in ``run_dir`` (empty when the tag was never logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
