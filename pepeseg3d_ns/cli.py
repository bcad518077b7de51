"""The ``pepeseg3d`` command: ``synth``, ``priors``, ``scales``, ``demo``, ``bench-render``, ``bench-contrast``,
``bench-step``, ``bench-priors``.

Each subcommand is a small dataclass parsed by tyro (``pepeseg3d SUBCOMMAND --help`` lists its options).
Heavy imports happen inside the subcommands so ``pepeseg3d --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple

from typing_extensions import Annotated

import tyro

from pepeseg3d_ns.contrast.data_bench import BenchStep
from pepeseg3d_ns.contrast.step_bench import BenchContrast
from pepeseg3d_ns.priors.cli import Priors


@dataclass
class Synth:
    """Generate a synthetic multi-scale scene (images, poses, GT depth, parts/objects/groups instance maps)."""

    scene: str = "tabletop"
    """Layout name (see `pepeseg3d synth --help` for the list in the error message of an unknown name)."""
    output_dir: Path = Path("scenes/tabletop")
    """Folder to write the nerfstudio dataset into."""
    n_views: int = 40
    resolution: int = 128
    """Image width = height in pixels."""
    seed: int = 0
    overwrite: bool = False
    preview: bool = True
    """Also write preview.png: a few views with GT depth and parts / objects / groups maps."""

    def main(self) -> None:
        from pepeseg3d_ns.data.preview import scene_preview
        from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene

        out = generate_scene(
            SynthConfig(
                scene=self.scene, output_dir=self.output_dir, n_views=self.n_views, resolution=self.resolution,
                seed=self.seed, overwrite=self.overwrite,
            )
        )
        if self.preview:
            print(f"preview: {scene_preview(out, out / 'preview.png')}")
        print(f"wrote {out}  (train with: ns-train pepe-recon --data {out})")


@dataclass
class Demo:
    """Synthesise the default scene, train pepe-recon then pepe-contrast on it, report held-out PSNR and
    segmentation mIoU per hierarchy level, and write pictures."""

    output_dir: Path = Path("demo_out")
    """Everything goes here: the scene, the nerfstudio run, the comparison image."""
    scene: str = "tabletop"
    resolution: int = 128
    n_views: int = 40
    seed: int = 0
    steps: int = 2000
    """Training iterations of pepe-recon."""
    device: Optional[Literal["cpu", "cuda"]] = None
    """Default: cuda when available, else cpu."""
    contrast_steps: int = 1000
    """Training iterations of pepe-contrast (0: stop after pepe-recon)."""

    def main(self) -> None:
        from pepeseg3d_ns.demo import run_demo

        run_demo(**dataclasses.asdict(self))


@dataclass
class ReconAblation:
    """Four pepe-recon runs on one synthetic scene (depth loss on/off x boundary refinement on/off), each evaluated
    on held-out views against ground-truth depth: PSNR, depth abs-rel, inverse-depth Pearson r, and both near
    object edges. Writes OUTPUT_DIR/recon_ablation.md and .json; finished rows are reused on a re-run."""

    output_dir: Path = Path("ablation_out")
    scene: str = "tabletop"
    resolution: int = 128
    n_views: int = 40
    steps: int = 2000
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    band: int = 1
    """Edge band half-width in pixels around ground-truth object boundaries."""

    def main(self) -> None:
        from pepeseg3d_ns.recon.ablation import format_ablation, run_recon_ablation

        print(format_ablation(run_recon_ablation(**dataclasses.asdict(self))))


@dataclass
class Segment:
    """Click-to-segment without the viewer: query a pepe-contrast run at pixels of a training view, write the
    selected Gaussians (3DGS .ply + indices) and the 2D masks of every training view."""

    load_config: Path
    """config.yml of a pepe-contrast run."""
    click: Annotated[List[Tuple[float, float]], tyro.conf.UseAppendAction]
    """Pixel X Y (column, row of the full-resolution training view); repeat --click for a union of queries."""
    view: int = 0
    """Index of the training view the clicks are on."""
    scale: float = 0.5
    """Segmentation scale s in [0, 1]: 0 = finest parts, 1 = whole groups."""
    threshold: float = 0.7
    """Cosine similarity to a query from which a pixel / Gaussian is selected."""
    output_dir: Path = Path("segment_out")
    all_views: bool = True
    """Write masks for every training view (False: only the clicked one)."""

    def main(self) -> None:
        import json

        from pepeseg3d_ns.segment import run_segment

        summary = run_segment(self.load_config, [tuple(c) for c in self.click], self.view, self.scale, self.threshold,
                              self.output_dir, self.all_views)
        print(json.dumps(summary, indent=2))


@dataclass
class Decompose:
    """Automatic decomposition of a pepe-contrast scene: HDBSCAN clusters of the rendered features at each scale,
    in colours consistent across views; per-view images and a contact sheet."""

    load_config: Path
    """config.yml of a pepe-contrast run."""
    scales: Tuple[float, ...] = (0.1, 0.5, 0.9)
    output_dir: Path = Path("decompose_out")
    split: Literal["train", "eval"] = "train"
    max_views: int = 6
    """Evenly spaced views of the split to render."""

    def main(self) -> None:
        import json

        from pepeseg3d_ns.decompose import run_decompose

        print(json.dumps(run_decompose(self.load_config, self.scales, self.output_dir, self.split, self.max_views), indent=2))


@dataclass
class Benchmark:
    """Segmentation benchmark (paper Table 3 rows: contrastive only / + PePE reconstruction / + perception loss /
    + consistency) by label propagation: the synthetic suite, or one SPIn-NeRF / LERF-Mask scene with --data.
    Writes OUTPUT_DIR/benchmark.md (mIoU / mAcc / mBIoU / cross-view consistency per level) and consistency.png;
    finished runs are reused."""

    output_dir: Path = Path("benchmark_out")
    scenes: Tuple[str, ...] = ("tabletop", "shelf", "garden")
    rows: Tuple[str, ...] = ()
    """Only these rows (names as in the table); default all four."""
    data: Optional[Path] = None
    """An existing scene folder (with its priors cache) instead of the synthetic suite."""
    dataparser: Literal["synthetic", "spinnerf", "lerf-mask"] = "synthetic"
    resolution: int = 128
    n_views: int = 40
    recon_steps: int = 2000
    contrast_steps: int = 1000
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    threshold: float = 0.7

    def main(self) -> None:
        from pepeseg3d_ns.eval.benchmark import BenchmarkSettings, format_table, run_benchmark

        settings = BenchmarkSettings(self.resolution, self.n_views, self.recon_steps, self.contrast_steps, self.device,
                                     self.seed, self.threshold)
        results = run_benchmark(self.output_dir, self.scenes, settings, self.rows, self.data, self.dataparser)
        print(format_table(results))
        print(f"written to {self.output_dir / 'benchmark.md'} and {self.output_dir / 'consistency.png'}")


@dataclass
class BenchRender:
    """Time the rasterizer's forward and forward+backward and record peak memory, for several scene sizes."""

    gaussians: tuple[int, ...] = (10_000, 50_000, 200_000)
    resolutions: tuple[int, ...] = (128, 256)
    channels: tuple[int, ...] = (3, 32)
    repeats: int = 5
    """Timed repetitions per configuration; the median is reported."""
    device: Literal["cpu", "cuda"] = "cpu"
    backend: Literal["auto", "cpp", "torch"] = "auto"
    """CPU compositing backend (ignored on CUDA)."""
    output: Optional[Path] = None
    """Also write the table as markdown here."""

    def main(self) -> None:
        from pepeseg3d_ns.render.bench import run_render_benchmark

        run_render_benchmark(**dataclasses.asdict(self))


@dataclass
class Scales:
    """Measure every mask's 3D size with the rendered depth of a trained pepe-recon run; store the scene's
    size-to-scale map in <data>/pepe_priors/scales.json (read by pepe-contrast)."""

    load_config: Path
    """config.yml of a finished pepe-recon run."""
    min_alpha: float = 0.5
    """Pixels whose rendered opacity is below this have no depth and are ignored."""

    def main(self) -> None:
        import numpy as np
        from nerfstudio.utils.eval_utils import eval_setup

        from pepeseg3d_ns.priors.cache import PriorCache
        from pepeseg3d_ns.priors.scales import compute_scene_scales, rendered_depth_fn, save_scene_scales

        _, pipeline, ckpt, step = eval_setup(self.load_config, test_mode="val")
        dm = pipeline.datamanager
        # the datamanager opened and validated the cache already, unless the run had priors="off"
        cache = dm.train_dataset.prior_cache or PriorCache.open(dm.prior_cache_location())
        stems = [Path(p).stem for p in dm.train_dataset.image_filenames]
        scene = compute_scene_scales(
            cache, stems, rendered_depth_fn(pipeline, self.min_alpha),
            source={"recon_config": str(self.load_config), "checkpoint": str(ckpt), "step": int(step)},
        )
        path = save_scene_scales(cache, scene)
        sizes = np.concatenate(list(scene.sizes.values()))
        finite = sizes[np.isfinite(sizes)]
        q = np.quantile(finite, [0.05, 0.5, 0.95]) if finite.size else [float("nan")] * 3
        print(f"{len(stems)} views, {sizes.size} masks ({sizes.size - finite.size} without valid depth); "
              f"sizes 5/50/95 %: {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} (scene units) -> {path}")


@dataclass
class BenchPriors:
    """Seconds per image and peak memory of SAM masks and Depth-Anything depth (tiny random models, loaded
    through the real loading code), and the prior cache size per image."""

    sizes: tuple[str, ...] = ("128x128", "1008x756")
    device: Literal["cpu", "cuda"] = "cpu"
    repeats: int = 3
    points_per_side: int = 8
    """SAM prompt grid. A random SAM keeps almost every prompt's masks (its scores mean nothing), so 32 (the
    real default) spends minutes post-processing thousands of masks; 8 keeps the benchmark short."""
    real_size: bool = False
    """Use a ViT-B-sized random SAM instead of the tiny one (for a GPU)."""
    output: Optional[Path] = None
    """Also write the table as markdown here."""

    def main(self) -> None:
        from pepeseg3d_ns.priors.bench import run_priors_benchmark

        run_priors_benchmark(**dataclasses.asdict(self))


def entrypoint() -> None:
    """Console script ``pepeseg3d``."""
    cmd = tyro.extras.subcommand_cli_from_dict(
        {"synth": Synth, "priors": Priors, "scales": Scales, "demo": Demo, "recon-ablation": ReconAblation, "segment": Segment, "decompose": Decompose,
         "benchmark": Benchmark,
         "bench-render": BenchRender, "bench-contrast": BenchContrast, "bench-step": BenchStep,
         "bench-priors": BenchPriors},
        description="PePESeg3D for nerfstudio: tools around ns-train pepe-recon / pepe-contrast.",
    )
    cmd.main()


if __name__ == "__main__":
    entrypoint()
