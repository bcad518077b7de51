"""The trainer of the PePESeg3D methods: nerfstudio's, with schedules that follow ``--max-num-iterations``
(:mod:`pepeseg3d_ns.schedule`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Type

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE


@dataclass
class PepeTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig plus :attr:`scale_schedule`."""

    _target: Type = field(default_factory=lambda: PepeTrainer)
    scale_schedule: bool = True
    """Rescale the step-valued schedule (warm-up, densification, opacity reset, SH degree, refinement start,
    learning-rate decay) to --max-num-iterations; fields you set yourself are kept. False: splatfacto's 30k-step
    numbers as they are."""

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
    """``(config, pipeline, checkpoint_path, step)`` of a trained run, as nerfstudio's ``eval_setup``, also when the
    run folder was moved or copied (the checkpoint is looked for beside ``config_path``)."""
    from nerfstudio.utils.eval_utils import eval_setup

    _LOADING["config"] = Path(config_path)
    try:
        return eval_setup(Path(config_path), test_mode=test_mode)
    finally:
        _LOADING.pop("config", None)


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
