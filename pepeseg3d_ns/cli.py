"""The ``pepeseg3d`` command: ``synth``, ``priors``, ``demo``, ``segment``, ``decompose``, ``benchmark``,
``check-run``, ``bench-*``.

Each subcommand is a small dataclass parsed by tyro (``pepeseg3d SUBCOMMAND --help`` lists its options).
Heavy imports happen inside the subcommands so ``pepeseg3d --help`` stays fast. Each checks its arguments
before any work; bad input (a :class:`~pepeseg3d_ns.errors.UserError`) is printed as one line
``pepeseg3d SUBCOMMAND: error: ...`` with exit status 2, anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple

from typing_extensions import Annotated

import tyro

from pepeseg3d_ns.benchmarks.contrast_data import BenchStep
from pepeseg3d_ns.benchmarks.contrast_step import BenchContrast
from pepeseg3d_ns.errors import UserError, check_all, check_count, check_file, check_number, check_threshold
from pepeseg3d_ns.eval.benchmark import ROWS, SUITE_SCENES, BenchmarkSettings
from pepeseg3d_ns.priors.cli import Priors

BenchmarkRow = Literal[tuple(ROWS)]  # type: ignore[valid-type]  # the row ids of eval/benchmark.py


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
    eval_interval: Optional[int] = None
    """Hold out every N-th view (views 0, N, 2N, ...) for evaluation, written into transforms.json (SPIn-NeRF's
    protocol: 8); default: the dataparser's own split."""
    overwrite: bool = False
    preview: bool = True
    """Also write preview.png: a few views with GT depth and parts / objects / groups maps."""
    detail: float = 0.0
    """Contrast of a fine (~1.5 cm) grain on every surface, 0 = none: texture for SfM (ns-process-data / COLMAP)."""

    def main(self) -> None:
        from pepeseg3d_ns.data.preview import scene_preview
        from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene

        check_count("--n-views", self.n_views)
        check_count("--resolution", self.resolution, minimum=4)
        out = generate_scene(
            SynthConfig(
                scene=self.scene, output_dir=self.output_dir, n_views=self.n_views, resolution=self.resolution,
                seed=self.seed, overwrite=self.overwrite, detail=self.detail, eval_interval=self.eval_interval,
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

        check_count("--resolution", self.resolution, minimum=4)
        check_count("--n-views", self.n_views, minimum=2)
        check_count("--steps", self.steps)
        check_count("--contrast-steps", self.contrast_steps, minimum=0)

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

        check_count("--resolution", self.resolution, minimum=4)
        check_count("--n-views", self.n_views, minimum=2)
        check_count("--steps", self.steps)
        check_count("--band", self.band, minimum=0)

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
    """Segmentation benchmark (paper Table 3 rows, or any row of eval/benchmark.py's ROWS) by label propagation:
    the synthetic suite, or one SPIn-NeRF / LERF-Mask scene with --data; every row trained for each seed. Writes
    OUTPUT_DIR/benchmark.md (mean and 95 % interval per level, paired differences to the --reference row,
    per-scene table), benchmark.json (every per-object score) and consistency.png; finished runs are reused."""

    output_dir: Path = Path("benchmark_out")
    scenes: Tuple[str, ...] = SUITE_SCENES
    rows: Tuple[BenchmarkRow, ...] = ()
    """Rows to train and evaluate (default: baseline recon perception full, the paper's Table 3)."""
    data: Optional[Path] = None
    """An existing scene folder (with its priors cache) instead of the synthetic suite."""
    dataparser: Literal["synthetic", "spinnerf", "lerf-mask"] = "synthetic"
    resolution: int = BenchmarkSettings.resolution
    """Synthetic scenes: image width = height in pixels."""
    n_views: int = BenchmarkSettings.n_views
    """Synthetic scenes: views per scene."""
    eval_interval: Optional[int] = BenchmarkSettings.eval_interval
    """Synthetic scenes: hold out every N-th view (SPIn-NeRF's protocol); None: nerfstudio's 90 % split."""
    recon_steps: int = BenchmarkSettings.recon_steps
    contrast_steps: int = BenchmarkSettings.contrast_steps
    device: Literal["cpu", "cuda"] = "cpu"
    seeds: Tuple[int, ...] = BenchmarkSettings.seeds
    """Training seeds (synthetic scenes: also the seed of the simulated priors)."""
    threshold: float = 0.7
    """Cosine similarity to the query from which a pixel is in the segment."""
    merge: Tuple[Path, ...] = ()
    """Instead of training: combine these benchmark.json files (other scenes, seeds or rows of the same settings)
    into one report in OUTPUT_DIR."""
    reference: BenchmarkRow = "baseline"
    """Row the report's paired differences are taken to (e.g. full, to compare each with-paper row with ours)."""

    def main(self) -> None:
        from pepeseg3d_ns.eval.benchmark import merge_reports, run_benchmark

        if self.merge:
            merge_reports(self.merge, self.output_dir, self.reference)
        else:
            check_count("--resolution", self.resolution, minimum=4)
            check_count("--n-views", self.n_views, minimum=2)
            check_count("--recon-steps", self.recon_steps)
            check_count("--contrast-steps", self.contrast_steps)
            check_threshold("--threshold", self.threshold)
            if self.data is not None and not self.data.is_dir():
                raise UserError(f"--data {self.data}: not a folder (expected a scene folder with its priors cache)")
            for seed in self.seeds:
                check_count("--seeds", seed, minimum=0)
            settings = BenchmarkSettings(self.resolution, self.n_views, self.eval_interval, self.recon_steps,
                                         self.contrast_steps, self.device, tuple(self.seeds), self.threshold)
            run_benchmark(self.output_dir, self.scenes, settings, self.rows, self.data, self.dataparser,
                          reference=self.reference)
        print((self.output_dir / "benchmark.md").read_text())
        print(f"written to {self.output_dir / 'benchmark.md'}, benchmark.json and consistency.png")


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
        from pepeseg3d_ns.benchmarks.render import run_render_benchmark

        check_all("--gaussians", self.gaussians, check_count)
        check_all("--resolutions", self.resolutions, check_count)
        check_all("--channels", self.channels, check_count)
        check_count("--repeats", self.repeats)

        run_render_benchmark(**dataclasses.asdict(self))


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
        from pepeseg3d_ns.benchmarks.priors import run_priors_benchmark

        check_count("--repeats", self.repeats)
        check_count("--points-per-side", self.points_per_side)

        run_priors_benchmark(**dataclasses.asdict(self))


@dataclass
class CheckRun:
    """Check a run folder from someone else before opening it: its config.yml loads with the restricted loader
    (no Python object outside nerfstudio / pepeseg3d_ns configs) and its latest checkpoint with weights_only=True.
    ns-viewer / ns-eval use nerfstudio's own, unrestricted loader: check a shared run here first."""

    load_config: Path
    """config.yml of the run."""

    def main(self) -> None:
        from pepeseg3d_ns.runs import latest_checkpoint, load_checkpoint, load_run_config

        config = load_run_config(self.load_config)
        beside = Path(self.load_config).parent / config.relative_model_dir
        ckpt = latest_checkpoint(beside if beside.is_dir() else config.get_checkpoint_dir())
        state = load_checkpoint(ckpt, what=f"{config.method_name} checkpoint")
        print(f"{self.load_config}: {config.method_name} run; config.yml builds only config classes; {ckpt} holds "
              f"tensors only (step {state.get('step')})")


COMMANDS = {"synth": Synth, "priors": Priors, "demo": Demo, "recon-ablation": ReconAblation,
            "segment": Segment, "decompose": Decompose, "benchmark": Benchmark, "check-run": CheckRun,
            "bench-render": BenchRender, "bench-contrast": BenchContrast, "bench-step": BenchStep,
            "bench-priors": BenchPriors}


def entrypoint(args: Optional[List[str]] = None) -> None:
    """Console script ``pepeseg3d``: a :class:`~pepeseg3d_ns.errors.UserError` (or a checkpoint that could not be
    written, e.g. a full disk) is one line on stderr and exit status 2; other exceptions keep their traceback."""
    import sys

    cmd = tyro.extras.subcommand_cli_from_dict(
        COMMANDS, args=args, description="PePESeg3D for nerfstudio: tools around ns-train pepe-recon / pepe-contrast.",
    )
    from pepeseg3d_ns.runs import CheckpointWriteError

    name = next((k for k, v in COMMANDS.items() if isinstance(cmd, v)), "")
    try:
        cmd.main()
    except (UserError, CheckpointWriteError) as err:  # bad input; a full disk while the demo saves a checkpoint
        print(f"pepeseg3d {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
