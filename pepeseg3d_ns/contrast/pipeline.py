"""The pepe-contrast pipeline: nerfstudio's VanillaPipeline that, before training, makes sure every SAM mask has a
scale measured on the frozen pepe-recon geometry (``<cache>/scales.json``, :mod:`pepeseg3d_ns.priors.scales`)
and hands the scales to the datamanager (``batch["mask_scales"]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from pepeseg3d_ns.eval.propagation import PropagationConfig


@dataclass
class PepeContrastPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: PepeContrastPipeline)
    scales_min_alpha: float = 0.5
    """Pixels whose rendered opacity is below this have no depth when measuring mask sizes."""
    segmentation: PropagationConfig = field(default_factory=PropagationConfig)
    """Label-propagation protocol run by ns-eval (threshold, scales tried on the reference view, levels)."""
    eval_segmentation: bool = True
    """ns-eval adds miou / macc / mbiou when the evaluation split has ground-truth masks."""


class PepeContrastPipeline(VanillaPipeline):
    config: PepeContrastPipelineConfig

    def __init__(self, config: PepeContrastPipelineConfig, device, test_mode: Literal["test", "val", "inference"] = "val",
                 world_size: int = 1, local_rank: int = 0, grad_scaler=None):
        super().__init__(config, device, test_mode=test_mode, world_size=world_size, local_rank=local_rank,
                         grad_scaler=grad_scaler)
        if test_mode == "val":  # training: the losses need every mask's scale
            self.datamanager.scene_scales = self.ensure_scene_scales()

    def ensure_scene_scales(self):
        """The scene's mask scales for the frozen geometry: loaded from ``scales.json`` when it was measured on
        the same pepe-recon checkpoint, else measured now (rendered depth of every training view) and saved."""
        from pepeseg3d_ns.priors.scales import (SIZE_ESTIMATOR, compute_scene_scales, load_scene_scales, rendered_depth_fn,
                                                save_scene_scales)

        dm = self.datamanager
        cache = dm.train_dataset.prior_cache
        if cache is None:
            raise RuntimeError(
                f"pepe-contrast needs the perception priors of the scene, and {dm.prior_cache_location()} holds none: "
                "run `pepeseg3d priors --data SCENE` (the same cache pepe-recon used)"
            )
        source = self.model.recon_source
        try:
            scales = load_scene_scales(cache)
            same = (Path(scales.source.get("checkpoint", "")).resolve() == Path(source["checkpoint"]).resolve()
                    and scales.source.get("size_estimator") == SIZE_ESTIMATOR)
        except (FileNotFoundError, ValueError):
            scales, same = None, False
        stems = [Path(p).stem for p in dm.train_dataset.image_filenames]
        if scales is not None and same and all(s in scales.sizes for s in stems):
            CONSOLE.log(f"Mask scales from {Path(cache.cache_dir) / 'scales.json'}")
            return scales
        CONSOLE.log(f"Measuring mask scales on the frozen geometry of {source['checkpoint']}")
        was_training = self.model.training
        self.model.eval()
        try:
            scales = compute_scene_scales(cache, stems, rendered_depth_fn(self, self.config.scales_min_alpha),
                                          source=dict(source))
        finally:
            self.model.train(was_training)
        path = save_scene_scales(cache, scales)
        CONSOLE.log(f"Mask scales saved to {path}")
        return scales

    def get_average_eval_image_metrics(self, step: Optional[int] = None, output_path: Optional[Path] = None,
                                       get_std: bool = False):
        """nerfstudio's image metrics of the evaluation views, plus the segmentation metrics of the label
        propagation protocol (:mod:`pepeseg3d_ns.eval.propagation`): ``miou``, ``macc``, ``mbiou`` (mean over
        objects of each object's mean over its evaluation views), ``miou_<level>`` etc. per hierarchy level, and
        ``segmentation`` (per-object scores and the reference view / scale chosen for each)."""
        from pepeseg3d_ns.eval.propagation import propagate_labels

        metrics = super().get_average_eval_image_metrics(step=step, output_path=output_path, get_std=get_std)
        gt = self.datamanager.eval_dataset._dataparser_outputs.metadata.get("gt_masks")
        if not self.config.eval_segmentation or gt is None:
            if gt is None:
                CONSOLE.log("No ground-truth masks in the evaluation split: segmentation metrics skipped")
            return metrics
        result = propagate_labels(self, self.config.segmentation)
        summary = result["summary"]
        metrics.update({k: summary["overall"][k] for k in ("miou", "macc", "mbiou")})
        for level, s in summary["per_level"].items():
            for k in ("miou", "macc", "mbiou"):
                metrics[f"{k}_{level}"] = s[k]
        if step is None:  # ns-eval (the trainer logs only scalars)
            metrics["segmentation"] = {"per_object": summary["per_object"], "choices": result["objects"],
                                       "threshold": self.config.segmentation.threshold}
        return metrics
