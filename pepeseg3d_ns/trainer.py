"""The trainer of the PePESeg3D methods: nerfstudio's, with schedules that follow ``--max-num-iterations``
(:mod:`pepeseg3d_ns.schedule`), checkpoints that are complete or absent, and resuming that trains the loaded
parameters.

Resuming (``--load-dir RUN/nerfstudio_models`` or ``--load-checkpoint RUN/nerfstudio_models/step-N.ckpt``):

* the run continues from step ``N + 1`` to the end of the *original* run: ``--max-num-iterations`` is the run's
  total length (default: the original run's, read from ``RUN/config.yml``), not a count of further steps;
* every model field and learning-rate schedule length you do not set on the resume command takes the original
  run's value (so a resumed 2000-step run densifies and decays as the uninterrupted run would), and the schedule
  is not re-scaled;
* the optimizers are rebuilt on the loaded parameters, then get their saved state (Adam moments and step
  counts) and the schedulers theirs. nerfstudio builds the optimizers before loading the checkpoint, and
  splatfacto's ``load_state_dict`` replaces the Gaussian parameters with new tensors, so without this the
  optimizers step tensors the model no longer uses and the saved parameters never change.

The checkpoint and the original ``config.yml`` are read with :mod:`pepeseg3d_ns.runs` (``weights_only=True``, the
restricted YAML loader).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Type

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.misc import step_check
from nerfstudio.utils.rich_utils import CONSOLE

from pepeseg3d_ns.errors import UserError, UserFileNotFoundError

FINAL_EVAL_FILE = "final_eval.json"
"""Written into the run folder by the evaluation after the last step (step + metrics)."""


@dataclass
class PepeTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig plus :attr:`scale_schedule`."""

    _target: Type = field(default_factory=lambda: PepeTrainer)
    scale_schedule: bool = True
    """Rescale the step-valued schedule (warm-up, densification, opacity reset, SH degree, refinement start,
    learning-rate decay) to --max-num-iterations; fields you set yourself are kept. False: splatfacto's 30k-step
    numbers as they are. A resumed run (--load-dir) keeps the original run's schedule instead."""
    eval_at_end: Literal["all", "images", "off"] = "all"
    """Evaluate every held-out view after the last step, log it and write final_eval.json: all = the pipeline's
    full evaluation (pepe-contrast: with segmentation mIoU), images = PSNR / SSIM only, off = none."""

    def get_checkpoint_dir(self) -> Path:
        """The run's ``nerfstudio_models/``. A run folder that was moved or copied (its config.yml names the old
        place) is found beside the config.yml being loaded: the one :func:`load_run` was given, or the
        ``--load-config`` of ns-viewer / ns-eval / ns-render."""
        default = super().get_checkpoint_dir()
        if default.is_dir():
            return default
        for cfg in (_LOADING.get("config"), _load_config_arg()):
            if cfg is not None and (Path(cfg).parent / self.relative_model_dir).is_dir():
                return Path(cfg).parent / self.relative_model_dir
        return default

    def __post_init__(self) -> None:
        # ns-train pepe-contrast without --data: the scene of the pepe-recon run (before the output folder, which
        # is named after the scene, is decided)
        try:
            data_from_recon_run(self)
        except UserError:  # a missing or refused recon run: PepeTrainer.setup() calls this again and reports it
            pass


class PepeTrainer(Trainer):
    """Applies :func:`pepeseg3d_ns.schedule.scale_schedule` before the pipeline is built (or, when resuming, the
    original run's schedule) and re-saves ``config.yml`` so it holds the values the run used; saves checkpoints
    atomically; resumes training the loaded parameters (see the module docstring)."""

    config: PepeTrainerConfig

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        changed = False
        resume = self._checkpoint_to_resume()
        original = None
        if resume is not None:
            original = _original_config(resume)
            if original is not None:
                changes = adopt_original_schedule(self.config, original)
                changed = bool(changes)
                CONSOLE.log(f"Resuming from {resume}: the run's schedule is the original's "
                            f"({original_config_path(resume)}), {self.config.max_num_iterations} steps in all"
                            + (": " + ", ".join(changes) if changes else ""))
            else:
                CONSOLE.log(f"Resuming from {resume}: no config.yml beside its folder, so the schedule follows "
                            f"--max-num-iterations {self.config.max_num_iterations} (the run's total length)")
        changed = data_from_recon_run(self.config) or changed
        from pepeseg3d_ns.paper import apply_paper_settings

        paper = apply_paper_settings(self.config)
        if paper:
            changed = True
            CONSOLE.log("--pipeline.model.paper-exact: the paper's settings: " + ", ".join(paper))
        if getattr(self.config, "scale_schedule", False) and original is None:
            from pepeseg3d_ns.schedule import scale_schedule

            changes = scale_schedule(self.config)
            if changes:
                changed = True
                CONSOLE.log(
                    f"Schedule scaled to {self.config.max_num_iterations} steps (--scale-schedule False keeps "
                    "splatfacto's): " + ", ".join(f"{k.split('.')[-1] if 'model' in k else k}={new}" for k, _, new in changes)
                )
        if changed and self.local_rank == 0 and test_mode == "val":
            self.config.save_config()  # config.yml holds what the run used (ns-eval / ns-viewer read it)
        super().setup(test_mode=test_mode)

    def _after_train(self) -> None:
        self.evaluate_all_views()
        super()._after_train()

    @check_main_thread
    def evaluate_all_views(self) -> Optional[Dict[str, float]]:
        """Evaluate every held-out view at the current step (see :attr:`PepeTrainerConfig.eval_at_end`), log
        the metrics and write them to ``final_eval.json``; None when off, without held-out views, or when this
        step already had nerfstudio's all-views evaluation."""
        mode = getattr(self.config, "eval_at_end", "off")
        if mode == "off" or not self.pipeline.datamanager.eval_dataset:
            return None
        if step_check(self.step, self.config.steps_per_eval_all_images):
            return None  # nerfstudio evaluated this step already
        from nerfstudio.pipelines.base_pipeline import VanillaPipeline

        with self.train_lock:
            if mode == "images":
                metrics = VanillaPipeline.get_average_eval_image_metrics(self.pipeline, step=self.step)
            else:
                metrics = self.pipeline.get_average_eval_image_metrics(step=self.step)
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0}  # not the per-object dicts
        writer.put_dict(name="Eval Images Metrics Dict (all images)", scalar_dict=scalars, step=self.step)
        (self.base_dir / FINAL_EVAL_FILE).write_text(json.dumps({"step": self.step, "metrics": scalars}, indent=2))
        shown = ", ".join(f"{k} {scalars[k]:.4g}" for k in ("psnr", "ssim", "miou") if k in scalars)
        CONSOLE.log(f"All {len(self.pipeline.datamanager.eval_dataset)} held-out views at step {self.step}: {shown}")
        return scalars

    # ------------------------------------------------------------------ resume
    def _checkpoint_to_resume(self) -> Optional[Path]:
        """The checkpoint ``--load-dir`` (latest, or ``--load-step``) / ``--load-checkpoint`` names, or None."""
        from pepeseg3d_ns.runs import latest_checkpoint

        if self.config.load_dir is not None:
            try:
                return latest_checkpoint(self.config.load_dir, self.config.load_step)
            except UserFileNotFoundError as err:
                raise UserFileNotFoundError(f"--load-dir {self.config.load_dir}: {err}") from None
        if self.config.load_checkpoint is not None:
            p = Path(self.config.load_checkpoint)
            if not p.is_file():
                raise UserFileNotFoundError(f"--load-checkpoint {p} does not exist")
            return p
        return None

    def _load_checkpoint(self) -> None:
        """Load the pipeline, then rebuild the optimizers on its (new) parameters and load their state."""
        from pepeseg3d_ns.runs import load_checkpoint

        path = self._checkpoint_to_resume()
        if path is None:
            CONSOLE.print("No checkpoint to load: training from scratch.")
            return
        state = load_checkpoint(path, what=f"{self.config.method_name} checkpoint")
        missing = [k for k in ("step", "optimizers", "scalers") if k not in state]
        if missing:
            raise UserError(f"{path} cannot be resumed from: it has no {', '.join(missing)} (not written by ns-train?)")
        step = int(state["step"])
        total = self.config.max_num_iterations
        if step + 1 >= total:
            raise UserError(f"{path} is step {step} of a {total}-step run: nothing is left to train; pass "
                            f"--max-num-iterations above {step + 1} (the run's total length) to train longer")
        self.pipeline.load_pipeline(state["pipeline"], step)
        # the load replaced the model's Parameters: optimizers built before it would step the discarded ones
        self.optimizers = self.setup_optimizers()
        unknown = sorted(set(state["optimizers"]) - set(self.optimizers.optimizers))
        if unknown:
            raise UserError(f"{path} has optimizer state for {unknown}, which this run does not optimise: resume "
                            "with the same method and settings as the original run")
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        self._start_step = step + 1
        CONSOLE.print(f"Resumed from {path}: steps {step + 1}..{total - 1} of {total}")

    def train(self) -> None:
        """nerfstudio's training loop over the steps left: ``max_num_iterations`` is the run's total length."""
        total = self.config.max_num_iterations
        self.config.max_num_iterations = total - self._start_step
        try:
            super().train()
        finally:
            self.config.max_num_iterations = total

    # ------------------------------------------------------------------ save
    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """Write ``step-<step>.ckpt`` (pipeline, optimizer, scheduler and grad-scaler state) through a temporary
        file (:func:`pepeseg3d_ns.runs.save_checkpoint_atomic`); with ``save_only_latest_checkpoint`` the older
        ones are deleted only once it is in place."""
        from pepeseg3d_ns.runs import save_checkpoint_atomic

        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.optimizers.items()},
            "schedulers": {name: sch.state_dict() for name, sch in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        path = save_checkpoint_atomic(state, self.checkpoint_dir / f"step-{step:09d}.ckpt")
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != path:
                    old.unlink()


def original_config_path(checkpoint: Path) -> Path:
    """``RUN/config.yml`` of ``RUN/nerfstudio_models/step-N.ckpt``."""
    return Path(checkpoint).parent.parent / "config.yml"


def _original_config(checkpoint: Path):
    from pepeseg3d_ns.runs import load_run_config

    p = original_config_path(checkpoint)
    return load_run_config(p, flag="the resumed run's") if p.is_file() else None


# method name -> its default TrainerConfig; filled by pepeseg3d_ns.methods (which imports this module, not back)
_METHOD_DEFAULTS: Dict[str, TrainerConfig] = {}


def register_method_default(config: TrainerConfig) -> TrainerConfig:
    """Record ``config`` as the default config of the method ``config.method_name`` (what a resumed run compares
    its command against, :func:`adopt_original_schedule`); returns ``config``."""
    _METHOD_DEFAULTS[config.method_name] = config
    return config


def _method_default(config) -> Optional[TrainerConfig]:
    return _METHOD_DEFAULTS.get(config.method_name)


def adopt_original_schedule(config, original) -> List[str]:
    """For a resumed run: take from ``original`` (the run's saved config) the total length, every model field and
    every learning-rate schedule length that ``config`` leaves at the method's default, and the scene when
    ``config`` has none. In place; returns ``["field=value", ...]`` of what changed."""
    changes: List[str] = []
    default = _method_default(config)
    if default is not None and config.max_num_iterations == default.max_num_iterations:
        if original.max_num_iterations != config.max_num_iterations:
            config.max_num_iterations = original.max_num_iterations
            changes.append(f"max_num_iterations={config.max_num_iterations}")
    model, orig_model = config.pipeline.model, original.pipeline.model
    if type(model) is type(orig_model):
        defaults = type(model)()
        for f in dataclasses.fields(model):
            if f.name.startswith("_"):
                continue
            cur, old = getattr(model, f.name), getattr(orig_model, f.name)
            if cur == getattr(defaults, f.name) and cur != old:
                setattr(model, f.name, old)
                changes.append(f"{f.name}={old}")
    default_opt = default.optimizers if default is not None else {}
    for group, entry in (config.optimizers or {}).items():
        sched = entry.get("scheduler") if isinstance(entry, dict) else None
        orig = (original.optimizers or {}).get(group)
        orig_sched = orig.get("scheduler") if isinstance(orig, dict) else None
        base = (default_opt.get(group) or {}).get("scheduler") if isinstance(default_opt.get(group), dict) else None
        if sched is None or orig_sched is None or not hasattr(sched, "max_steps"):
            continue
        if base is not None and sched.max_steps != base.max_steps:
            continue  # set on this command
        if sched.max_steps != orig_sched.max_steps:
            sched.max_steps = orig_sched.max_steps
            changes.append(f"{group}.max_steps={sched.max_steps}")
    dm = config.pipeline.datamanager
    if config.data is None and dm.data is None:
        data = original.pipeline.datamanager.data or original.data
        if data is not None:
            config.data = dm.data = Path(data)
            changes.append(f"data={data}")
    return changes


_LOADING: dict = {}


def _load_config_arg():
    """The value of ``--load-config`` on this process's command line, if any."""
    import sys

    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--load-config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--load-config="):
            return a.split("=", 1)[1]
    return None


def load_run(config_path: Path, test_mode: str = "test"):
    """``(config, pipeline, checkpoint_path, step)`` of a trained run (:func:`pepeseg3d_ns.runs.eval_setup`: the
    restricted config loader, ``weights_only`` checkpoints, the checkpoint found beside ``config_path``)."""
    from pepeseg3d_ns.runs import eval_setup

    _LOADING["config"] = Path(config_path)
    try:
        return eval_setup(Path(config_path), test_mode=test_mode)
    finally:
        _LOADING.pop("config", None)


def data_from_recon_run(config) -> bool:
    """pepe-contrast without --data: set ``config.data`` (and the datamanager's) to the scene the pepe-recon run
    named by ``--pipeline.model.recon-checkpoint`` was trained on. Returns whether it changed anything (no-op for
    other configs or when data is set). The recon run's config.yml is read with the restricted loader."""
    model = config.pipeline.model
    dm = config.pipeline.datamanager
    if getattr(model, "recon_checkpoint", None) is None or (dm.data is not None or config.data is not None):
        return False
    from pepeseg3d_ns.contrast.model import recon_config_path
    from pepeseg3d_ns.runs import load_run_config

    cfg_path = recon_config_path(model.recon_checkpoint)
    if cfg_path is None:
        return False
    recon = load_run_config(cfg_path, flag="--pipeline.model.recon-checkpoint")
    data = recon.pipeline.datamanager.data or recon.data
    if data is None:
        return False
    CONSOLE.log(f"--data not given: using the pepe-recon run's scene {data} and its image settings")
    dm.data = config.data = Path(data)
    inherit_image_settings(dm, recon.pipeline.datamanager)
    return True


def inherit_image_settings(dm, recon_dm) -> None:
    """Give the pepe-contrast datamanager ``dm`` the pepe-recon run's dataparser (type and options: the same images,
    hence the same priors) and image settings, where ``dm`` still has the method's defaults."""
    import copy
    import dataclasses

    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

    rdp = getattr(recon_dm, "dataparser", None)
    if rdp is not None and dm.dataparser == PepeDataParserConfig(load_3D_points=False):
        dp = copy.deepcopy(rdp)
        if any(f.name == "load_3D_points" for f in dataclasses.fields(dp)):
            dp.load_3D_points = False  # the geometry comes from the recon checkpoint
        dm.dataparser = dp
    for name in ("camera_res_scale_factor", "priors_dir"):
        default = getattr(type(dm)(), name)
        if getattr(dm, name) == default and hasattr(recon_dm, name):
            setattr(dm, name, getattr(recon_dm, name))
