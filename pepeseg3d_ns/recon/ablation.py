"""Geometry metrics of a pepe-recon run against the synthetic scenes' ground truth, and the four-way ablation
(depth loss on/off x boundary-guided refinement on/off) behind ``pepeseg3d recon-ablation``.

Measures on every held-out view (the datamanager's eval split; nothing here is used in training):

* ``psnr``: image PSNR over the whole view (dB);
* ``depth_absrel``: mean ``|d - d_gt| / d_gt`` of the rendered expected z-depth (converted back to metres with the
  dataparser's scale) over pixels with accumulated opacity >= 0.5;
* ``inv_depth_r``: Pearson correlation of rendered and ground-truth inverse depth over the same pixels (affine
  invariant: it does not care about the scale of the reconstruction);
* ``edge_depth_absrel``: ``depth_absrel`` restricted to the *edge band*, pixels within ``band`` px of a ground-truth
  object boundary (where the object id of a pixel differs from one of its 8 neighbours); this is the "boundary
  error of rendered depth": blurry or floating Gaussians straddling an object edge mix foreground and
  background depth there;
* ``edge_psnr``: image PSNR inside the same band (mask-edge sharpness of the colour image).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F


def boundary_band(ids: np.ndarray | torch.Tensor, band: int = 1) -> torch.Tensor:
    """Pixels within ``band`` px (Chebyshev distance) of an instance boundary.

    ``ids`` is an integer instance map ``[H, W]``; a pixel is on a boundary when one of its 8 neighbours has a
    different id (image borders do not count). Returns ``bool [H, W]``; ``band = 0`` gives an empty band.
    """
    ids = torch.as_tensor(np.asarray(ids)).long()
    if ids.ndim != 2:
        raise ValueError(f"ids must be [H, W], got {tuple(ids.shape)}")
    if band <= 0:
        return torch.zeros_like(ids, dtype=torch.bool)
    x = ids[None, None].double()
    hi = F.max_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    lo = -F.max_pool2d(F.pad(-x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    edge = (hi != lo).double()
    if band > 1:
        edge = F.max_pool2d(edge, 2 * band - 1, stride=1, padding=band - 1)
    return edge[0, 0] > 0


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> Dict[str, float]:
    """Depth accuracy of ``pred [H, W]`` (z-depth, metres) against ``gt [H, W]`` over ``valid [H, W]`` (bool;
    pixels with non-positive depth are dropped too): ``absrel`` = mean ``|pred - gt| / gt``, ``inv_r`` = Pearson
    r of ``1/pred`` and ``1/gt``, ``n`` = number of pixels. NaN values when fewer than 2 pixels remain."""
    pred, gt = pred.double().flatten(), gt.double().flatten()
    m = valid.flatten() & (pred > 0) & (gt > 0) & torch.isfinite(pred) & torch.isfinite(gt)
    n = int(m.sum())
    if n < 2:
        return {"absrel": math.nan, "inv_r": math.nan, "n": n}
    p, g = pred[m], gt[m]
    absrel = float(((p - g).abs() / g).mean())
    ip, ig = 1 / p - (1 / p).mean(), 1 / g - (1 / g).mean()
    denom = float(ip.norm() * ig.norm())
    r = float((ip * ig).sum()) / denom if denom > 0 else math.nan
    return {"absrel": absrel, "inv_r": r, "n": n}


def masked_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR (dB, peak 1) of ``pred`` against ``gt`` (``[H, W, 3]`` in [0, 1]) over ``mask [H, W]`` (all when None)."""
    err = ((pred.double() - gt.double()) ** 2).mean(-1)
    if mask is not None:
        err = err[mask]
    if err.numel() == 0:
        return math.nan
    mse = float(err.mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def evaluate_geometry(config_path: Path, scene_dir: Optional[Path] = None, band: int = 1, level: str = "objects") -> Dict[str, float]:
    """Load a finished pepe-recon run (like ``ns-eval``) and average the module's metrics over its held-out
    views. ``scene_dir`` defaults to the run's data folder and must be a synthetic scene (``gt/depth``,
    ``gt/<level>``)."""
    from pepeseg3d_ns.runs import eval_setup

    from pepeseg3d_ns.data.synthetic import load_gt_depth, load_gt_masks

    config, pipeline, _, step = eval_setup(Path(config_path), test_mode="test")
    scene_dir = Path(scene_dir or config.pipeline.datamanager.data or config.data)
    if not (scene_dir / "gt" / "depth").is_dir():
        raise FileNotFoundError(f"{scene_dir} has no gt/depth: geometry metrics need a synthetic scene (pepeseg3d synth)")
    pipeline.eval()
    dm = pipeline.datamanager
    dataset = dm.eval_dataset
    scale = float(dataset._dataparser_outputs.dataparser_scale)  # rendered depth is in the parser's scaled units
    model = pipeline.model
    rows = []
    with torch.no_grad():
        for i, fname in enumerate(dataset.image_filenames):
            stem = Path(fname).stem
            camera = dataset.cameras[i : i + 1].to(model.device)
            out = model.get_outputs_for_camera(camera)
            gt_rgb = dataset.get_image_float32(i)[..., :3].to(out["rgb"])
            gt_depth = torch.from_numpy(load_gt_depth(scene_dir, stem))
            ids = load_gt_masks(scene_dir, stem, level)
            depth = out["depth"][..., 0].cpu() / scale
            if depth.shape != gt_depth.shape:
                raise ValueError(f"rendered depth {tuple(depth.shape)} vs ground truth {tuple(gt_depth.shape)} for {stem}")
            valid = out["accumulation"][..., 0].cpu() >= 0.5
            edge = boundary_band(ids, band)
            full = depth_metrics(depth, gt_depth, valid)
            near_edge = depth_metrics(depth, gt_depth, valid & edge)
            rows.append({
                "psnr": masked_psnr(out["rgb"].cpu(), gt_rgb.cpu()),
                "edge_psnr": masked_psnr(out["rgb"].cpu(), gt_rgb.cpu(), edge),
                "depth_absrel": full["absrel"], "inv_depth_r": full["inv_r"],
                "edge_depth_absrel": near_edge["absrel"],
            })
    keys = rows[0].keys() if rows else []
    result = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    result.update({"n_eval_views": len(rows), "num_gaussians": int(model.num_points), "step": int(step)})
    return result


ABLATION_ROWS = [
    ("splatfacto (no depth loss, no refinement)", 0.0, False),
    ("+ depth loss", 0.05, False),
    ("+ refinement", 0.0, True),
    ("pepe-recon (depth loss + refinement)", 0.05, True),
]


def run_recon_ablation(
    output_dir: Path = Path("ablation_out"),
    scene: str = "tabletop",
    resolution: int = 128,
    n_views: int = 40,
    steps: int = 2000,
    seed: int = 0,
    device: str = "cpu",
    band: int = 1,
) -> List[Dict]:
    """Train the four rows of :data:`ABLATION_ROWS` on one synthetic scene with simulated priors (the demo's
    settings) and evaluate each with :func:`evaluate_geometry`. Writes ``<output_dir>/recon_ablation.json`` and
    ``recon_ablation.md``; finished rows are reused when the command is run again."""
    from nerfstudio.scripts.train import train_loop

    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
    from pepeseg3d_ns.recipes import make_config
    from pepeseg3d_ns.priors.cli import Priors

    output_dir = Path(output_dir)
    scene_dir = output_dir / "scenes" / scene
    if not (scene_dir / "transforms.json").exists():
        generate_scene(SynthConfig(scene=scene, output_dir=scene_dir, n_views=n_views, resolution=resolution, seed=seed))
        Priors(data=scene_dir, seed=seed, progress=False).main()
    results_path = output_dir / "recon_ablation.json"
    done = {r["name"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    rows = []
    for name, depth_w, refine in ABLATION_ROWS:
        tag = f"d{depth_w:g}_r{int(refine)}"
        if results_path.exists():  # another process (or a re-run) may have finished rows meanwhile
            done.update({r["name"]: r for r in json.loads(results_path.read_text())})
        if name in done and done[name].get("steps") == steps:
            rows.append(done[name])
            continue
        config = make_config(scene_dir, output_dir / "runs", steps, device, seed)
        config.timestamp = tag
        config.pipeline.model.depth_loss_weight = depth_w
        config.pipeline.model.refine_boundaries = refine
        config.save_config()
        t0 = time.perf_counter()
        train_loop(local_rank=0, world_size=1, config=config)
        train_s = time.perf_counter() - t0
        metrics = evaluate_geometry(config.get_base_dir() / "config.yml", scene_dir, band=band)
        row = {"name": name, "depth_loss_weight": depth_w, "refine_boundaries": refine, "steps": steps,
               "train_s": round(train_s, 1), "config": str(config.get_base_dir() / "config.yml"), **metrics}
        rows.append(row)
        if results_path.exists():  # keep rows another process wrote meanwhile
            done = {**{r["name"]: r for r in json.loads(results_path.read_text())}, **done}
        done[name] = row
        results_path.write_text(json.dumps(list(done.values()), indent=2))
    (output_dir / "recon_ablation.md").write_text(format_ablation(rows))
    return rows


def format_ablation(rows: List[Dict]) -> str:
    """Markdown table of :func:`run_recon_ablation` rows."""
    lines = [
        "| run | λd | refine | PSNR (dB) | edge PSNR | depth abs-rel | inverse-depth r | edge depth abs-rel | Gaussians | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['depth_loss_weight']:g} | {'on' if r['refine_boundaries'] else 'off'} | {r['psnr']:.2f} | "
            f"{r['edge_psnr']:.2f} | {r['depth_absrel']:.4f} | {r['inv_depth_r']:.4f} | {r['edge_depth_absrel']:.4f} | "
            f"{r['num_gaussians']} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
