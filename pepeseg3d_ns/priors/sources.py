"""Which models make the priors: one config shared by ``pepeseg3d priors`` and the datamanager.

:class:`PriorSourcesConfig` names the mask source (SAM, imported masks, or masks simulated from the ground truth
of a synthetic scene) and the depth source (Depth-Anything-V2, imported depth, or simulated). ``pepeseg3d priors``
takes its fields as ``--sam-checkpoint`` etc.; ``ns-train`` as ``--pipeline.datamanager.prior-sources.*``, so
the datamanager can compute missing priors itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Tuple

from pepeseg3d_ns.priors.cache import PriorCacheError

__all__ = ["PriorSourcesConfig", "SAM_DOWNLOAD"]

SAM_DOWNLOAD = ("download sam_vit_h_4b8939.pth (or sam_vit_b_01ec64.pth) from "
                "https://github.com/facebookresearch/segment-anything#model-checkpoints")


@dataclass
class PriorSourcesConfig:
    """The models (or files) that give each training image its SAM masks and relative depth."""

    sam_checkpoint: Optional[Path] = None
    """SAM checkpoint file, e.g. sam_vit_h_4b8939.pth (segment-anything release)."""
    sam_model_type: str = "auto"
    """SAM variant: auto (read from the checkpoint), vit_h, vit_l or vit_b."""
    points_per_side: int = 32
    """SAM: prompt grid of points_per_side x points_per_side points."""
    pred_iou_thresh: float = 0.88
    """SAM: drop masks whose predicted IoU is below this."""
    stability_score_thresh: float = 0.95
    """SAM: drop masks whose stability score is below this."""
    min_mask_region_area: int = 100
    """SAM: remove disconnected regions and holes smaller than this many pixels (0 disables)."""
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Depth-Anything-V2 model: a Hugging Face id (from the HF cache, or downloaded) or a local folder."""
    masks_from: Optional[Path] = None
    """Import masks instead of running SAM: a folder with, per training image stem, <stem>.npz / <stem>.npy (bool
    [M, H, W]), a folder <stem>/ of binary PNG masks, or <stem>.png (instance ids, 0 = none)."""
    depth_from: Optional[Path] = None
    """Import depth instead of running Depth-Anything: a folder with <stem>.npy (float [H, W]) or <stem>.png (16-bit)."""
    depth_from_kind: Literal["disparity", "depth"] = "disparity"
    """What the imported depth files hold: relative inverse depth (larger = nearer) or depth (converted to 1/depth)."""
    simulated: Optional[bool] = None
    """Simulate SAM / Depth-Anything from a synthetic scene's ground truth (entries labelled "simulated"). Default:
    yes for a scene made by `pepeseg3d synth` when no SAM checkpoint or imported masks are given."""
    severity: float = 1.0
    """Simulated priors: 0 = perfect ground truth, 1 = typical SAM / Depth-Anything imperfections."""
    seed: int = 0
    """Simulated priors: random seed."""
    device: Optional[Literal["cpu", "cuda"]] = None
    """Device for SAM and Depth-Anything; default: cuda when available, else cpu."""

    # ------------------------------------------------------------------
    def use_simulated(self, data_dir: Path) -> bool:
        """Whether masks and depth are simulated for the scene at ``data_dir``."""
        from pepeseg3d_ns.priors.simulated import is_synthetic_scene

        if self.simulated is not None:
            return bool(self.simulated)
        return self.sam_checkpoint is None and self.masks_from is None and is_synthetic_scene(data_dir)

    def available(self, data_dir: Path) -> bool:
        """Whether :meth:`build` can make sources without more flags (a checkpoint or imported masks are given, or
        the scene is synthetic)."""
        return self.use_simulated(data_dir) or self.sam_checkpoint is not None or self.masks_from is not None

    def build(self, data_dir: Path, flag_prefix: str = "--") -> Tuple[Any, Any]:
        """``(mask_source, depth_source)`` for the scene at ``data_dir``; heavy modules are imported only here.

        Raises :class:`PriorCacheError` with one message naming the flag (``flag_prefix`` + field name) and the fix
        when a checkpoint, model or folder is missing; nothing is computed here except the sources' signatures
        (which hash the checkpoint, so a missing file fails now, not after the first image)."""
        data_dir = Path(data_dir)
        if data_dir.suffix == ".json":
            data_dir = data_dir.parent
        flag = lambda name: f"{flag_prefix}{name.replace('_', '-')}"  # noqa: E731
        if self.severity < 0:
            raise PriorCacheError(f"{flag('severity')} {self.severity}: must be >= 0")
        if self.use_simulated(data_dir):
            from pepeseg3d_ns.priors.simulated import SimulatedDepthSource, SimulatedSamSource, is_synthetic_scene

            if not is_synthetic_scene(data_dir):
                raise PriorCacheError(
                    f"{flag('simulated')} True needs a synthetic scene made by `pepeseg3d synth` "
                    f"({data_dir / 'transforms.json'} has no pepe_synthetic block); for real data pass {flag('sam_checkpoint')} PATH"
                )
            try:
                masks = SimulatedSamSource(data_dir, severity=self.severity, seed=self.seed)
                depth = SimulatedDepthSource(data_dir, severity=self.severity, seed=self.seed)
            except (FileNotFoundError, ValueError) as err:
                raise PriorCacheError(str(err)) from None
            return masks, depth

        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.masks_from is not None:
            from pepeseg3d_ns.priors.imported import ImportedMasks

            mask_source = ImportedMasks(self.masks_from, flag=flag("masks_from"))
        else:
            if self.sam_checkpoint is None:
                raise PriorCacheError(f"no SAM checkpoint given: {SAM_DOWNLOAD} and pass {flag('sam_checkpoint')} PATH "
                                      f"(or import masks with {flag('masks_from')} DIR)")
            try:
                from pepeseg3d_ns.priors.sam import SamConfig, SamMaskSource

                mask_source = SamMaskSource(SamConfig(
                    checkpoint=self.sam_checkpoint, model_type=self.sam_model_type,
                    points_per_side=self.points_per_side, pred_iou_thresh=self.pred_iou_thresh,
                    stability_score_thresh=self.stability_score_thresh,
                    min_mask_region_area=self.min_mask_region_area), device)
                mask_source.signature()
            except (FileNotFoundError, ValueError, ImportError, OSError) as err:
                raise PriorCacheError(f"{flag('sam_checkpoint')} {self.sam_checkpoint}: {err}") from None
        if self.depth_from is not None:
            from pepeseg3d_ns.priors.imported import ImportedDepth

            depth_source = ImportedDepth(self.depth_from, kind=self.depth_from_kind, flag=flag("depth_from"))
        else:
            try:
                from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig

                depth_source = DepthAnythingSource(DepthConfig(model=self.depth_model), device)
                depth_source.signature()
            except (FileNotFoundError, ValueError, ImportError, OSError) as err:
                raise PriorCacheError(f"{flag('depth_model')} {self.depth_model}: {err}") from None
        return mask_source, depth_source
