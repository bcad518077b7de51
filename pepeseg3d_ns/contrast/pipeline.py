"""The pepe-contrast pipeline: nerfstudio's VanillaPipeline that, before training, measures every SAM mask's scale
on the frozen pepe-recon geometry (:mod:`pepeseg3d_ns.priors.scales`), keeps the result in the model (so it is
saved in the run's checkpoint, never in a file shared with other runs) and hands the per-mask scales to the
datamanager (``batch["mask_scales"]``)."""

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
    scales_drop_depth_outliers: bool = True
    """Leave out each mask's pixels whose rendered depth is over 3 robust std devs from the mask's median before
    measuring its size (False: all its pixels, the paper's)."""
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
            self.model.mask_scales = self.measure_mask_scales()
            self.datamanager.mask_scales = self.model.mask_scales.per_image()

    def measure_mask_scales(self):
        """:class:`~pepeseg3d_ns.priors.scales.SceneScales` of the training views' masks: rendered depth of the
        frozen geometry at each training view, masks from the datamanager's priors."""
        from pepeseg3d_ns.priors.scales import compute_scene_scales, rendered_depth_fn

        dm = self.datamanager
        if getattr(dm, "prior_keys", None) is None:
            raise RuntimeError(
                "pepe-contrast needs the perception priors of the training images, and the datamanager attached none "
                "(--pipeline.datamanager.priors off?): use the cache pepe-recon used, or compute it with "
                "`pepeseg3d priors --data SCENE`"
            )
        source = dict(self.model.recon_source)
        CONSOLE.log(f"Measuring mask scales on the frozen geometry of {source['checkpoint']}")
        was_training = self.model.training
        self.model.eval()
        try:
            masks = [d["prior_masks"] for d in dm.cached_train]
            scales = compute_scene_scales(masks, dm.prior_keys, rendered_depth_fn(self, self.config.scales_min_alpha),
                                          source=source,
                                          outlier_k=3.0 if self.config.scales_drop_depth_outliers else None)
        finally:
            self.model.train(was_training)
        return scales

    def load_pipeline(self, loaded_state, step: int) -> None:
        """nerfstudio's, then the datamanager's mask scales follow the loaded model's (a resumed run)."""
        super().load_pipeline(loaded_state, step)
        if self.test_mode == "val" and getattr(self.model, "mask_scales", None) is not None:
            if list(self.model.mask_scales.keys) != list(self.datamanager.prior_keys or []):
                CONSOLE.log("The checkpoint's mask scales belong to other priors than the cache holds now: re-measured")
                self.model.mask_scales = self.measure_mask_scales()
            self.datamanager.mask_scales = self.model.mask_scales.per_image()

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
