"""``pepeseg3d priors``: compute SAM masks and Depth-Anything-V2 depth for every training image, cached on disk.

Re-running is cheap: images whose bytes and source configuration are unchanged are skipped, and an interrupted
run resumes where it stopped.  Synthetic scenes (``pepeseg3d synth``) get simulated priors by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

__all__ = ["Priors"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GiB"


@dataclass
class Priors:
    """Compute the perception priors (SAM masks at every granularity + relative depth) of a dataset, cached in
    <data>/pepe_priors/ (skips images already done; resumes an interrupted run)."""

    data: Path
    """Nerfstudio dataset folder (holding transforms.json); the images are its frames[*].file_path."""
    sam_checkpoint: Optional[Path] = None
    """SAM checkpoint file, e.g. sam_vit_h_4b8939.pth (from the segment-anything release)."""
    sam_model_type: str = "auto"
    """SAM variant: auto (read from the checkpoint), vit_h, vit_l or vit_b."""
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Depth-Anything-V2 model: a Hugging Face id (read from / downloaded to the HF cache) or a local folder."""
    device: Optional[Literal["cpu", "cuda"]] = None
    """Device for SAM and Depth-Anything; default: cuda when available, else cpu."""
    simulated: Optional[bool] = None
    """Use simulated priors derived from the ground truth of a synthetic scene (labelled 'simulated' in the cache).
    Default: yes when transforms.json has a pepe_synthetic block and no --sam-checkpoint is given."""
    severity: float = 1.0
    """Simulated priors only: 0 = perfect ground truth, 1 = typical SAM / Depth-Anything imperfections."""
    seed: int = 0
    """Simulated priors only: random seed."""
    force: bool = False
    """Recompute every image even when the cache is up to date."""
    cache_dir: Optional[Path] = None
    """Where to write the cache; default: <data>/pepe_priors."""
    points_per_side: int = 32
    """SAM: prompt grid of points_per_side x points_per_side points."""
    pred_iou_thresh: float = 0.88
    """SAM: drop masks whose predicted IoU is below this."""
    stability_score_thresh: float = 0.95
    """SAM: drop masks whose stability score is below this."""
    min_mask_region_area: int = 100
    """SAM: remove disconnected regions and holes smaller than this many pixels (0 disables)."""
    progress: bool = True
    """Show a progress bar."""
    preview: bool = True
    """Also write preview.png into the cache: three views, their mask layers in colour and the depth prior."""

    # ------------------------------------------------------------------
    def use_simulated(self) -> bool:
        """Resolve ``simulated=None`` (auto) for this dataset."""
        from pepeseg3d_ns.priors.simulated import is_synthetic_scene

        if self.simulated is not None:
            return bool(self.simulated)
        return self.sam_checkpoint is None and is_synthetic_scene(self.data)

    def build_sources(self):
        """``(mask_source, depth_source, simulated)``; real sources are imported lazily."""
        if self.use_simulated():
            from pepeseg3d_ns.priors.simulated import SimulatedDepthSource, SimulatedSamSource, is_synthetic_scene

            if not is_synthetic_scene(self.data):
                raise SystemExit(
                    f"--simulated needs a synthetic scene made by `pepeseg3d synth` ({self.data / 'transforms.json'} "
                    f"has no pepe_synthetic block); for real data pass --sam-checkpoint PATH instead"
                )
            try:
                return (SimulatedSamSource(self.data, severity=self.severity, seed=self.seed),
                        SimulatedDepthSource(self.data, severity=self.severity, seed=self.seed), True)
            except (FileNotFoundError, ValueError) as err:
                raise SystemExit(str(err)) from None

        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        # SAM first: a missing checkpoint is the most likely problem and its message says what to download.
        try:
            from pepeseg3d_ns.priors.sam import SamConfig, SamMaskSource

            sam_cfg = SamConfig(
                checkpoint=self.sam_checkpoint,
                model_type=self.sam_model_type,
                points_per_side=self.points_per_side,
                pred_iou_thresh=self.pred_iou_thresh,
                stability_score_thresh=self.stability_score_thresh,
                min_mask_region_area=self.min_mask_region_area,
            )
            mask_source = SamMaskSource(sam_cfg, device)
            # Fail now (before any image) on missing weights: the signature hashes the checkpoint file.
            mask_source.signature()
        except (FileNotFoundError, ValueError, ImportError, OSError) as err:
            raise SystemExit(self._weights_message(err)) from None
        try:
            from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig

            depth_source = DepthAnythingSource(DepthConfig(model=self.depth_model), device)
            depth_source.signature()
        except (FileNotFoundError, ValueError, ImportError, OSError) as err:
            raise SystemExit(str(err)) from None
        return mask_source, depth_source, False

    def _weights_message(self, err: BaseException) -> str:
        msg = str(err)
        if self.sam_checkpoint is None and "--sam-checkpoint" not in msg:
            msg = (f"no SAM checkpoint given: download sam_vit_h_4b8939.pth (or sam_vit_b_01ec64.pth) from "
                   f"https://github.com/facebookresearch/segment-anything#model-checkpoints and pass "
                   f"--sam-checkpoint PATH ({msg})")
        return msg

    def main(self) -> None:
        from pepeseg3d_ns.priors.cache import PriorCacheError, build_cache, image_paths_for

        if not self.data.is_dir():
            raise SystemExit(f"--data {self.data} is not a folder")
        try:
            image_paths = image_paths_for(self.data)
        except (FileNotFoundError, PriorCacheError) as err:
            raise SystemExit(str(err)) from None
        mask_source, depth_source, simulated = self.build_sources()
        try:
            cache = build_cache(self.data, image_paths, mask_source, depth_source, cache_dir=self.cache_dir,
                                progress=self.progress, force=self.force)
        except (FileNotFoundError, ImportError, ValueError) as err:  # PriorCacheError is a ValueError
            raise SystemExit(f"pepeseg3d priors: {err}") from None
        st = cache.last_build
        if self.preview and cache.stems:
            from pepeseg3d_ns.data.preview import priors_preview

            stems = cache.stems
            picks = [stems[i * (len(stems) - 1) // 2] for i in range(3)] if len(stems) >= 3 else stems
            print(f"preview: {priors_preview(cache, picks, cache.cache_dir / 'preview.png')}")
        kind = "simulated from ground truth" if simulated else "computed"
        print(
            f"priors ({kind}): {st.n_images} images, {st.computed} computed, {st.skipped} skipped "
            f"in {st.seconds:.1f} s; {cache.mean_masks():.1f} masks/image; "
            f"{_human_bytes(cache.size_bytes())} on disk in {cache.cache_dir}"
        )
