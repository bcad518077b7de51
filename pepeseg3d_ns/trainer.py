"""The trainer of the PePESeg3D methods: nerfstudio's, with schedules that follow ``--max-num-iterations``
(:mod:`pepeseg3d_ns.schedule`) and an evaluation of every held-out view after the last step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, Optional, Type

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.misc import step_check
from nerfstudio.utils.rich_utils import CONSOLE

FINAL_EVAL_FILE = "final_eval.json"
"""Written into the run folder by the evaluation after the last step (step + metrics)."""


@dataclass
class PepeTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig plus :attr:`scale_schedule` and :attr:`eval_at_end`."""

    _target: Type = field(default_factory=lambda: PepeTrainer)
    scale_schedule: bool = True
    """Rescale the step-valued schedule (warm-up, densification, opacity reset, SH degree, refinement start,
    learning-rate decay) to --max-num-iterations; fields you set yourself are kept. False: splatfacto's 30k-step
    numbers as they are."""
    eval_at_end: Literal["all", "images", "off"] = "all"
    """Evaluate every held-out view after the last step, log it and write final_eval.json: all = the pipeline's
    full evaluation (pepe-contrast: with segmentation mIoU), images = PSNR / SSIM only, off = none."""

    def __post_init__(self) -> None:
        # ns-train pepe-contrast without --data: the scene of the pepe-recon run (before the output folder, which
        # is named after the scene, is decided)
        try:
            data_from_recon_run(self)
        except Exception:  # a missing recon run is reported clearly when the model is built
            pass


class PepeTrainer(Trainer):
    """Applies :func:`pepeseg3d_ns.schedule.scale_schedule` before the pipeline is built and re-saves
    ``config.yml`` so it holds the values the run used."""

    config: PepeTrainerConfig

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        changed = data_from_recon_run(self.config)
        if getattr(self.config, "scale_schedule", False):
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


def data_from_recon_run(config) -> bool:
    """pepe-contrast without --data: set ``config.data`` (and the datamanager's) to the scene the pepe-recon run
    named by ``--pipeline.model.recon-checkpoint`` was trained on. Returns whether it changed anything (no-op for
    other configs or when data is set)."""
    model = config.pipeline.model
    dm = config.pipeline.datamanager
    if getattr(model, "recon_checkpoint", None) is None or (dm.data is not None or config.data is not None):
        return False
    import yaml

    from pepeseg3d_ns.contrast.model import recon_config_path

    cfg_path = recon_config_path(model.recon_checkpoint)
    if cfg_path is None:
        return False
    recon = yaml.load(cfg_path.read_text(), Loader=yaml.Loader)
    data = recon.pipeline.datamanager.data or recon.data
    if data is not None:
        CONSOLE.log(f"--data not given: using the pepe-recon run's scene {data}")
        dm.data = config.data = Path(data)
        return True
    return False
