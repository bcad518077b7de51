"""nerfstudio method registrations (entry points ``nerfstudio.method_configs``).

Kept light on purpose: importing this module imports nerfstudio's config classes and torch, never SAM,
transformers or anything that touches CUDA.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig
from pepeseg3d_ns.data.dataparser import PepeDataParserConfig
from pepeseg3d_ns.contrast.model import PepeContrastModelConfig
from pepeseg3d_ns.contrast.pipeline import PepeContrastPipelineConfig
from pepeseg3d_ns.paper import DEFAULT_GATE_LR
from pepeseg3d_ns.recon.model import PepeReconModelConfig
from pepeseg3d_ns.schedulers import FloatExponentialDecaySchedulerConfig as ExponentialDecaySchedulerConfig
from pepeseg3d_ns.trainer import PepeTrainerConfig, register_method_default


def gaussian_optimizers(max_steps: int) -> dict:
    """Splatfacto's per-parameter Adam settings; the means' learning rate decays over ``max_steps``."""
    return {
        "means": {
            "optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps),
        },
        "features_dc": {"optimizer": AdamOptimizerConfig(lr=0.0025, eps=1e-15), "scheduler": None},
        "features_rest": {"optimizer": AdamOptimizerConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
        "opacities": {"optimizer": AdamOptimizerConfig(lr=0.05, eps=1e-15), "scheduler": None},
        "scales": {"optimizer": AdamOptimizerConfig(lr=0.005, eps=1e-15), "scheduler": None},
        "quats": {"optimizer": AdamOptimizerConfig(lr=0.001, eps=1e-15), "scheduler": None},
        "camera_opt": {
            "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0
            ),
        },
    }


pepe_recon = MethodSpecification(
    config=register_method_default(PepeTrainerConfig(
        method_name="pepe-recon",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=30000,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=PepeDatamanagerConfig(dataparser=PepeDataParserConfig(), priors="auto"),
            model=PepeReconModelConfig(),
        ),
        optimizers=gaussian_optimizers(30000),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )),
    description="PePESeg3D stage 1: Gaussian Splatting with the monocular depth constraint (CPU or CUDA). "
    "Computes the SAM / Depth-Anything priors of its training images when they are not cached "
    "(--pipeline.datamanager.prior-sources.sam-checkpoint PATH; simulated for synthetic scenes), or run "
    "`pepeseg3d priors --data SCENE` first.",
)


pepe_contrast = MethodSpecification(
    config=register_method_default(PepeTrainerConfig(
        method_name="pepe-contrast",
        steps_per_eval_image=500,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=100000,
        max_num_iterations=10000,
        mixed_precision=False,
        pipeline=PepeContrastPipelineConfig(
            datamanager=PepeDatamanagerConfig(dataparser=PepeDataParserConfig(load_3D_points=False), priors="auto"),
            model=PepeContrastModelConfig(),
        ),
        optimizers={
            "gauss_features": {"optimizer": AdamOptimizerConfig(lr=0.0025, eps=1e-15), "scheduler": None},
            # paper.py's DEFAULT_GATE_LR: ours is 10x below the features' (the paper: 0.0025 for both); at 0.0025
            # the gate re-shapes its bands within a few hundred steps, before the features carry the hierarchy
            # (docs/contrast.md)
            "scale_gate": {"optimizer": AdamOptimizerConfig(lr=DEFAULT_GATE_LR, eps=1e-15), "scheduler": None},
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )),
    description="PePESeg3D stage 2: multi-scale contrastive Gaussian features on frozen pepe-recon geometry. "
    "Needs --pipeline.model.recon-checkpoint RECON_RUN/config.yml and the priors pepe-recon used.",
)
