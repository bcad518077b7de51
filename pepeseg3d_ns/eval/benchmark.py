"""``pepeseg3d benchmark``: the segmentation benchmark (paper Table 3 rows) on the synthetic suite, or on a
SPIn-NeRF / LERF-Mask scene folder.

Per scene, two pepe-recon runs (plain splatfacto: no depth loss, no refinement; and full PePE reconstruction),
then one pepe-contrast run per row:

| row | geometry | contrast terms |
|---|---|---|
| baseline (contrastive only) | plain | Lm + L2D |
| + PePE reconstruction | PePE | Lm + L2D |
| + perception loss | PePE | Lm + Lp + L2D |
| + consistency (full) | PePE | Lm + Lp + Lc + L2D |

Each contrast run is evaluated by label propagation on the held-out views (:mod:`pepeseg3d_ns.eval.propagation`):
mIoU / mAcc / mBIoU per hierarchy level, and the **cross-view consistency**: the fraction of (object, held-out
view) pairs whose propagated segment overlaps the object's ground truth with IoU >= 0.5 (how often a clicked
object keeps being the same segment in other views). Finished runs and evaluations are reused when the command
runs again (delete ``<output_dir>/<scene>/`` to redo a scene).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROWS: List[Tuple[str, str, Dict[str, float]]] = [
    ("baseline (contrastive only)", "plain", {"lambda_p": 0.0, "lambda_c_upper": 0.0, "lambda_c_lower": 0.0}),
    ("+ PePE reconstruction", "pepe", {"lambda_p": 0.0, "lambda_c_upper": 0.0, "lambda_c_lower": 0.0}),
    ("+ perception loss", "pepe", {"lambda_c_upper": 0.0, "lambda_c_lower": 0.0}),
    ("+ consistency (full)", "pepe", {}),
]
RECON = {"plain": {"depth_loss_weight": 0.0, "refine_boundaries": False}, "pepe": {}}
CONSISTENT_IOU = 0.5


@dataclass
class BenchmarkSettings:
    resolution: int = 128
    n_views: int = 40
    recon_steps: int = 2000
    contrast_steps: int = 1000
    device: str = "cpu"
    seed: int = 0
    threshold: float = 0.7


def _train(config) -> float:
    from nerfstudio.scripts.train import train_loop

    config.save_config()
    t0 = time.perf_counter()
    train_loop(local_rank=0, world_size=1, config=config)
    return time.perf_counter() - t0


def consistency(records: Sequence[Dict], level: Optional[str] = None, iou_min: float = CONSISTENT_IOU) -> float:
    """Fraction of propagation records (one per object and held-out view) with IoU >= ``iou_min``."""
    rs = [r for r in records if level is None or r["level"] == level]
    return float(np.mean([r["iou"] >= iou_min for r in rs])) if rs else float("nan")


def run_scene(scene_dir: Path, out_dir: Path, settings: BenchmarkSettings, rows: Sequence[str] = (),
              dataparser: str = "synthetic", progress: bool = True) -> List[Dict]:
    """All rows of :data:`ROWS` (or those named in ``rows``) on one scene folder; returns one result per row."""
    from pepeseg3d_ns.demo import evaluate_segmentation, finished_run, make_config, make_contrast_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    done = {r["row"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    wanted = [r for r in ROWS if not rows or r[0] in rows]
    recon_paths: Dict[str, Path] = {}
    results = []
    for name, geometry, overrides in wanted:
        key = f"{name}"
        if key in done and done[key].get("settings") == settings.__dict__:
            results.append(done[key])
            continue
        if geometry not in recon_paths:
            rc = make_config(scene_dir, out_dir / "runs", settings.recon_steps, settings.device, settings.seed)
            rc.timestamp = f"recon_{geometry}"
            _set_dataparser(rc, dataparser)
            for k, v in RECON[geometry].items():
                setattr(rc.pipeline.model, k, v)
            path = rc.get_base_dir() / "config.yml"
            if not finished_run(rc, settings.recon_steps):
                _train(rc)
            recon_paths[geometry] = path
        cc = make_contrast_config(recon_paths[geometry], out_dir / "runs", settings.contrast_steps, settings.device,
                                  settings.seed, timestamp="contrast_" + "".join(c for c in name if c.isalnum()))
        _set_dataparser(cc, dataparser)
        for k, v in overrides.items():
            setattr(cc.pipeline.model, k, v)
        cpath = cc.get_base_dir() / "config.yml"
        train_s = _train(cc) if not finished_run(cc, settings.contrast_steps) else float("nan")
        seg = evaluate_segmentation(cpath, settings.threshold, progress=progress)
        summary = seg["summary"]
        levels = {lvl: {**s, "consistency": consistency(seg["records"], lvl)} for lvl, s in summary["per_level"].items()}
        result = {"row": name, "scene": scene_dir.name, "settings": settings.__dict__, "config": str(cpath),
                  "train_s": round(train_s, 1), "overall": {**summary["overall"], "consistency": consistency(seg["records"])},
                  "per_level": levels}
        done[key] = result
        results_path.write_text(json.dumps(list(done.values()), indent=2))
        results.append(result)
    return results


def _set_dataparser(config, dataparser: str) -> None:
    if dataparser == "synthetic":
        return
    from pepeseg3d_ns.data.dataparser_configs import lerf_mask, spinnerf

    spec = {"spinnerf": spinnerf, "lerf-mask": lerf_mask}[dataparser]
    config.pipeline.datamanager.dataparser = copy.deepcopy(spec.config)


def format_table(results: Sequence[Dict]) -> str:
    """Markdown: one line per (scene, row) with mIoU / mAcc / mBIoU / consistency per level."""
    levels = []
    for r in results:
        for lvl in r["per_level"]:
            if lvl not in levels:
                levels.append(lvl)
    head = "| scene | row | " + " | ".join(f"{l} mIoU / mAcc / mBIoU / cons." for l in levels) + " |"
    lines = [head, "|" + "---|" * (2 + len(levels))]
    for r in results:
        cells = []
        for lvl in levels:
            s = r["per_level"].get(lvl)
            cells.append("–" if s is None else f"{s['miou']:.3f} / {s['macc']:.3f} / {s['mbiou']:.3f} / {s['consistency']:.2f}")
        lines.append(f"| {r['scene']} | {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def consistency_figure(results: Sequence[Dict], path: Path) -> Path:
    """Bar chart: cross-view consistency per row (bars) and level (groups), one panel per scene."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = list(dict.fromkeys(r["scene"] for r in results))
    fig, axes = plt.subplots(1, len(scenes), figsize=(5 * len(scenes), 3.9), squeeze=False)
    for ax, scene in zip(axes[0], scenes):
        rs = [r for r in results if r["scene"] == scene]
        levels = list(dict.fromkeys(l for r in rs for l in r["per_level"]))
        width = 0.8 / max(len(rs), 1)
        for i, r in enumerate(rs):
            vals = [r["per_level"].get(l, {}).get("consistency", np.nan) for l in levels]
            ax.bar(np.arange(len(levels)) + i * width, vals, width, label=r["row"])
        ax.set_xticks(np.arange(len(levels)) + width * (len(rs) - 1) / 2, levels)
        ax.set_ylim(0, 1)
        ax.set_title(f"{scene}: views where the clicked object keeps its segment (IoU ≥ {CONSISTENT_IOU})", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=max(len(labels), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend below the panels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmark(output_dir: Path = Path("benchmark_out"), scenes: Sequence[str] = ("tabletop", "shelf", "garden"),
                  settings: BenchmarkSettings = BenchmarkSettings(), rows: Sequence[str] = (), data: Optional[Path] = None,
                  dataparser: str = "synthetic", progress: bool = True) -> List[Dict]:
    """The synthetic suite (every scene in ``scenes``, synthesised with simulated priors) or, with ``data``, one
    existing scene folder read by ``dataparser`` (its priors cache must exist: ``pepeseg3d priors``). Writes
    ``<output_dir>/benchmark.md``, ``benchmark.json`` and ``consistency.png``."""
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
    from pepeseg3d_ns.priors.cli import Priors

    output_dir = Path(output_dir)
    results: List[Dict] = []
    if data is not None:
        results += run_scene(Path(data), output_dir / Path(data).name, settings, rows, dataparser, progress)
    else:
        for scene in scenes:
            scene_dir = output_dir / "scenes" / scene
            if not (scene_dir / "transforms.json").exists():
                generate_scene(SynthConfig(scene=scene, output_dir=scene_dir, n_views=settings.n_views,
                                           resolution=settings.resolution, seed=settings.seed), progress=progress)
                Priors(data=scene_dir, seed=settings.seed, progress=False).main()
            results += run_scene(scene_dir, output_dir / scene, settings, rows, "synthetic", progress)
    (output_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (output_dir / "benchmark.md").write_text(table)
    consistency_figure(results, output_dir / "consistency.png")
    return results
