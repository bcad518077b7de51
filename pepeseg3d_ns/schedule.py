"""Training schedules that follow ``--max-num-iterations``.

splatfacto's (and the paper's) schedule is written for 30k steps: warm-up 500, densify until 15k, opacity reset
every 3k, SH degree raised every 1k, refinement from 4k, learning rates decaying over 30k. A 2000-step CPU run
with those numbers would never densify past its warm-up, never refine, never reach SH degree 3. So
:class:`PepeTrainer` rewrites the step-valued fields for the run's length before the model is built.

Rules (``N = max_num_iterations``, ``r = N / 30000``):

* ``N >= 30000``: every step-valued field below is multiplied by ``r`` (``r = 1`` changes nothing).
* ``N < 30000`` (short runs; tuned on the synthetic scenes at ~128 px, see docs/benchmarks.md): full resolution
  from the start (``num_downscales 0``), warm-up ``max(100, N/10)``, densification until ``0.6 N``, opacity
  reset every ``max(10, N/300)`` refinement intervals (so at most ~3 resets, none in the last 40 %), SH degree
  raised every ``max(100, N/8)`` steps, screen-size culling until ``N``.
* pepe-contrast has its own reference (10k steps): the centroid loss starts at ``0.7 N`` and refreshes every
  ``max(10, N / 50)`` steps.
* Always: refinement starts at ``r * 4000`` but not before the warm-up ends; the means' and the camera
  optimiser's learning-rate decays run over ``N`` steps.

A field you set yourself on the command line (any value other than the method's default) is left as you set
it. ``--scale-schedule False`` turns all of this off (splatfacto's numbers exactly). The saved ``config.yml`` of
a run holds the values actually used.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

REFERENCE_STEPS = 30000


def _scaled_values(model_cfg, steps: int) -> Dict[str, object]:
    """The step-valued model fields for a run of ``steps`` iterations (see the module docstring)."""
    if hasattr(model_cfg, "schedule_for"):  # a method with its own reference schedule (pepe-contrast)
        return model_cfg.schedule_for(steps)
    r = steps / REFERENCE_STEPS
    d = type(model_cfg)()  # the method's defaults
    if steps >= REFERENCE_STEPS:
        values = {
            "warmup_length": round(d.warmup_length * r),
            "stop_split_at": round(d.stop_split_at * r),
            "stop_screen_size_at": round(d.stop_screen_size_at * r),
            "sh_degree_interval": round(d.sh_degree_interval * r),
            "resolution_schedule": round(d.resolution_schedule * r),
            "reset_alpha_every": max(1, round(d.reset_alpha_every * r)),
        }
    else:
        values = {
            "num_downscales": 0,
            "warmup_length": max(100, steps // 10),
            "stop_split_at": int(0.6 * steps),
            "stop_screen_size_at": steps,
            "sh_degree_interval": max(100, steps // 8),
            "reset_alpha_every": max(10, steps // 300),
        }
    if hasattr(d, "refine_start"):
        warmup = values.get("warmup_length", d.warmup_length)
        values["refine_start"] = max(round(d.refine_start * r), warmup)
    return values


def scale_schedule(config, steps: int | None = None) -> List[Tuple[str, object, object]]:
    """Rewrite the step-valued fields of ``config`` (a nerfstudio ``TrainerConfig`` of a pepe method) for a
    run of ``steps`` iterations (default ``config.max_num_iterations``), in place.

    Fields whose value differs from the method's default are treated as set by the user and kept. Idempotent:
    applying it twice changes nothing the second time. Returns ``[(field, old, new), ...]`` of what changed.
    """
    steps = int(steps if steps is not None else config.max_num_iterations)
    if steps <= 0:
        raise ValueError(f"max_num_iterations must be positive, got {steps}")
    model = config.pipeline.model
    defaults = type(model)()
    changes: List[Tuple[str, object, object]] = []
    for name, new in _scaled_values(model, steps).items():
        old = getattr(model, name)
        if old == getattr(defaults, name) and old != new:
            setattr(model, name, new)
            changes.append((f"pipeline.model.{name}", old, new))
    for group, entry in (config.optimizers or {}).items():
        sched = entry.get("scheduler") if isinstance(entry, dict) else None
        if sched is None or not hasattr(sched, "max_steps"):
            continue
        default_max = getattr(type(sched)(), "max_steps", None)
        if sched.max_steps in (default_max, REFERENCE_STEPS) and sched.max_steps != steps:
            changes.append((f"optimizers.{group}.scheduler.max_steps", sched.max_steps, steps))
            sched.max_steps = steps
    return changes


__all__ = ["REFERENCE_STEPS", "scale_schedule"]
