"""Recipes: the short-run ``pepe-recon`` / ``pepe-contrast`` configs and the evaluation helpers that the demo, the
benchmark (:mod:`pepeseg3d_ns.eval.benchmark`), the ablation (:mod:`pepeseg3d_ns.recon.ablation`) and the tests
share.

A low module: it imports only the method configs and stage modules (``methods``, ``schedule``, ``runs``,
``trainer``, ``eval.propagation``, ``data.preview``), never ``demo``, ``cli`` or ``eval.benchmark``
(``tests/test_layout.py`` checks this).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


def short_schedule(config, steps: int):
    """Set ``config`` up for a ``steps``-iteration run (in place; returns ``config``): the schedule of
    :func:`pepeseg3d_ns.schedule.scale_schedule` (what ``ns-train`` applies for ``--max-num-iterations``), plus
    twice splatfacto's densification gradient threshold."""
    from pepeseg3d_ns.schedule import scale_schedule

    config.max_num_iterations = steps
    scale_schedule(config, steps)
    # at ~128 px the default threshold (tuned for 30k steps at ~1k px) grows >130k Gaussians in 3k steps;
    # doubling it halves the count for a fraction of a dB (docs/benchmarks.md)
    model = config.pipeline.model
    if model.densify_grad_thresh == type(model)().densify_grad_thresh:
        model.densify_grad_thresh = 2 * model.densify_grad_thresh
    return config


def make_config(data: Path, output_dir: Path, steps: int, device: str, seed: int = 0):
    """A ``pepe-recon`` TrainerConfig for a short run on ``data`` (see :func:`short_schedule`)."""
    from pepeseg3d_ns.methods import pepe_recon

    config = copy.deepcopy(pepe_recon.config)
    config.data = data
    config.pipeline.datamanager.data = data
    config.output_dir = output_dir
    config.experiment_name = data.name
    config.timestamp = "demo"
    config.machine.device_type = device
    config.machine.seed = seed
    config.vis = "tensorboard"
    config.steps_per_save = steps
    config.save_only_latest_checkpoint = True
    config.steps_per_eval_image = 500
    config.steps_per_eval_all_images = 10 * steps  # never during training: PepeTrainer evaluates all after the last step
    config.pipeline.model.compute_lpips = False
    config.logging.local_writer.enable = True
    return short_schedule(config, steps)


def finished_run(config, steps: int) -> bool:
    """Whether the run of ``config`` already saved its final checkpoint (step ``steps - 1``)."""
    return (config.get_base_dir() / "nerfstudio_models" / f"step-{steps - 1:09d}.ckpt").is_file()


def make_contrast_config(recon_config: Path, output_dir: Path, steps: int, device: str, seed: int = 0,
                         timestamp: str = "demo"):
    """A ``pepe-contrast`` TrainerConfig for a ``steps``-iteration run on the geometry (and scene) of the pepe-recon
    run ``recon_config``; the schedule (centroid loss from 0.7 x steps) follows ``steps``."""
    from pepeseg3d_ns.methods import pepe_contrast
    from pepeseg3d_ns.runs import load_run_config
    from pepeseg3d_ns.schedule import scale_schedule
    from pepeseg3d_ns.trainer import inherit_image_settings

    recon = load_run_config(Path(recon_config))
    data = Path(recon.pipeline.datamanager.data or recon.data)
    config = copy.deepcopy(pepe_contrast.config)
    config.pipeline.model.recon_checkpoint = Path(recon_config)
    config.data = data
    config.pipeline.datamanager.data = data
    inherit_image_settings(config.pipeline.datamanager, recon.pipeline.datamanager)
    config.output_dir = output_dir
    config.experiment_name = data.name
    config.timestamp = timestamp
    config.machine.device_type = device
    config.machine.seed = seed
    config.vis = "tensorboard"
    config.max_num_iterations = steps
    config.steps_per_save = steps
    config.save_only_latest_checkpoint = True
    config.steps_per_eval_image = 10 * steps
    config.steps_per_eval_all_images = 10 * steps
    config.eval_at_end = "images"  # PSNR only after the last step: the callers run label propagation themselves
    config.logging.steps_per_log = max(1, min(50, steps // 40))
    config.logging.local_writer.enable = True
    config.pipeline.model.compute_lpips = False
    scale_schedule(config, steps)
    return config


def evaluate_segmentation(config_path: Path, threshold: float = 0.7, max_objects_per_level: Optional[int] = None,
                          progress: bool = True) -> Dict:
    """Label propagation (:mod:`pepeseg3d_ns.eval.propagation`) on a finished pepe-contrast run: the summary
    (``overall`` / ``per_level`` mIoU, mAcc, mBIoU) and the per-object choices."""
    from pepeseg3d_ns.runs import eval_setup

    from pepeseg3d_ns.eval.propagation import PropagationConfig, propagate_labels

    _, pipeline, _, _ = eval_setup(Path(config_path), test_mode="test")
    pipeline.eval()
    return propagate_labels(pipeline, PropagationConfig(threshold=threshold, max_objects_per_level=max_objects_per_level),
                            progress=progress)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def evaluate_run(config_path: Path, picture: Optional[Path] = None, n_views: int = 3) -> Dict[str, float]:
    """Load a finished run like ``ns-eval`` does, average PSNR/SSIM over every held-out view, and optionally save
    a labelled picture: one row per held-out view with ground truth | render | rendered depth."""
    from pepeseg3d_ns.runs import eval_setup

    from pepeseg3d_ns.data.preview import colorize_depth, save_grid

    _, pipeline, _, step = eval_setup(config_path, test_mode="test")
    pipeline.eval()
    dm = pipeline.datamanager
    psnrs, ssims, rows = [], [], []
    with torch.no_grad():
        for i, (camera, batch) in enumerate(dm.fixed_indices_eval_dataloader):
            outputs = pipeline.model.get_outputs_for_camera(camera)
            metrics, _ = pipeline.model.get_image_metrics_and_images(outputs, batch)
            psnrs.append(metrics["psnr"])
            ssims.append(metrics["ssim"])
            if picture is not None and i < n_views:
                gt = batch["image"]
                gt = gt.float() / 255.0 if gt.dtype == torch.uint8 else gt
                rows.append(np.concatenate([_to_uint8(gt[..., :3]), _to_uint8(outputs["rgb"]), colorize_depth(outputs["depth"][..., 0].cpu().numpy())], axis=1))
    if picture is not None and rows:
        save_grid(rows, picture, title=f"pepe-recon at step {int(step)}, held-out views (one per row)",
                  columns=["ground truth", "render", "rendered depth (yellow = near)"])
    return {
        "psnr": float(np.mean(psnrs)),
        "ssim": float(np.mean(ssims)),
        "n_eval_views": len(psnrs),
        "step": int(step),
        "num_gaussians": int(pipeline.model.num_points),
    }
