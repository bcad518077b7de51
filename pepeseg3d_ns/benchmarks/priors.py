"""Priors benchmark (``pepeseg3d bench-priors``): seconds per image and peak memory of mask extraction and depth,
and the cache size per image.

Real SAM / Depth-Anything weights cannot be downloaded on our machines. So the models are the tiny, randomly
initialised ones from :mod:`pepeseg3d_ns.priors.tiny_models`, saved to a temporary folder and loaded through the
same code a user's checkpoint takes. With ``--real-size`` the SAM is built with ViT-B dimensions (random
weights, 1024 px input; for a lent GPU). A random SAM passes none of the default quality thresholds, so the
benchmark turns them off (IoU and stability thresholds 0, no box NMS): it then keeps one mask per prompt and
multimask output (about 3 per point, 192 for the default 8 x 8 grid), more than a trained SAM keeps after its
filters. Its timings show the cost of the whole pipeline (encoder, decoder, post-processing at image
resolution); its mask counts and cache sizes are an upper bound. The simulated-prior row shows realistic
mask counts.

Images: the first view of a synthetic ``tabletop`` scene at 128 x 128, and the same view resized to 1008 x 756
(the LLFF/SPIn-NeRF working resolution). Every measurement runs in a fresh process (peak RSS = the largest
resident set seen by a 5 ms sampling thread during the timed calls, minus the RSS before them).
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

SIZES = {"128x128": (128, 128), "1008x756": (1008, 756)}


def _image(size: tuple[int, int], workdir: Path) -> np.ndarray:
    from PIL import Image

    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene

    scene = workdir / "scene"
    if not (scene / "transforms.json").exists():
        generate_scene(SynthConfig(output_dir=scene, n_views=3, resolution=128, n_init_points=100), progress=False)
    img = Image.open(sorted((scene / "images").glob("*.png"))[0]).convert("RGB")
    return np.asarray(img.resize(size, Image.BICUBIC))


def _measure(kind: str, size_name: str, device: str, repeats: int, points_per_side: int, real_size: bool) -> Dict:
    """Run one source on one image size in this (fresh) process."""
    import torch

    from pepeseg3d_ns.benchmarks.render import _PeakRSS

    work = Path(tempfile.mkdtemp(prefix="pepe_bench_priors_"))
    image = _image(SIZES[size_name], work)
    if kind == "sam":
        from pepeseg3d_ns.priors.sam import SamConfig, SamMaskSource
        from pepeseg3d_ns.priors.tiny_models import build_tiny_sam

        if real_size:
            from segment_anything import sam_model_registry

            ckpt = work / "sam_vit_b_random.pth"
            torch.save(sam_model_registry["vit_b"]().state_dict(), ckpt)
        else:
            ckpt = build_tiny_sam(work)
        source = SamMaskSource(
            SamConfig(checkpoint=ckpt, points_per_side=points_per_side, pred_iou_thresh=0.0,
                      stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_region_area=0),
            device,
        )
    else:
        from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig
        from pepeseg3d_ns.priors.tiny_models import build_tiny_depth_anything

        source = DepthAnythingSource(DepthConfig(model=str(build_tiny_depth_anything(work / "da")), local_files_only=True), device)
    out = source(image, "bench")  # warm-up: model load, first-call allocations
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _PeakRSS(interval=0.005) as mon:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = source(image, "bench")
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    row = {"kind": kind, "size": size_name, "s_per_image": float(np.median(times)),
           "peak_mib": (mon.peak - mon.base) / 2**20}
    if device == "cuda":
        row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if kind == "sam":
        row["n_masks"] = int(out["masks"].shape[0])
        row["cache_kib"] = _cache_kib(out["masks"], out["scores"], out["stability"], image.shape[:2], work)
    else:
        row["cache_kib"] = image.shape[0] * image.shape[1] * 2 / 1024  # float16 [H, W]
    return row


def _cache_kib(masks, scores, stability, hw, work: Path) -> float:
    from pepeseg3d_ns.priors.masks import MaskSet

    path = MaskSet.from_dense(masks, scores, stability).save(work / "m.npz")
    return path.stat().st_size / 1024


def _simulated_row(size_name: str) -> Dict:
    """Mask count and cache size of simulated SAM-like priors (realistic mask counts) at ``size_name``."""
    from pepeseg3d_ns.priors.cache import PriorCache, load_image_rgb
    from pepeseg3d_ns.priors.compute import PriorImage, compute_priors
    from pepeseg3d_ns.priors.simulated import SimulatedDepthSource, SimulatedSamSource
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene

    res = SIZES[size_name][0] if size_name == "128x128" else None
    if res is None:
        return {}
    work = Path(tempfile.mkdtemp(prefix="pepe_bench_sim_"))
    scene = generate_scene(SynthConfig(output_dir=work / "s", n_views=10, resolution=res, n_init_points=100), progress=False)
    t0 = time.perf_counter()
    images = [PriorImage(p.stem, load_image_rgb(p)) for p in sorted((scene / "images").glob("*.png"))]
    cache = PriorCache.open(scene / "pepe_priors", create=True)
    compute_priors(cache, images, SimulatedSamSource(scene), SimulatedDepthSource(scene), progress=False)
    n_masks = float(np.mean([cache.read_entry(k)["masks"]["n_masks"] for k in cache.keys()]))
    return {"kind": "simulated", "size": size_name, "s_per_image": (time.perf_counter() - t0) / 10, "peak_mib": float("nan"),
            "n_masks": n_masks, "cache_kib": cache.size_bytes() / 10 / 1024}


def run_priors_benchmark(
    sizes: Sequence[str] = ("128x128", "1008x756"),
    device: str = "cpu",
    repeats: int = 3,
    points_per_side: int = 8,
    real_size: bool = False,
    output: Optional[Path] = None,
) -> List[Dict]:
    """Measure every (source, size) pair in a fresh process; print and optionally write a markdown table."""
    rows = []
    ctx = mp.get_context("spawn")
    for size in sizes:
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        for kind in ("sam", "depth"):
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                row = pool.submit(_measure, kind, size, device, repeats, points_per_side, real_size).result()
            rows.append(row)
            print(f"{kind:>9} {size:>9}: {row['s_per_image']:.3f} s/image, peak +{row['peak_mib']:.0f} MiB, "
                  f"cache {row['cache_kib']:.1f} KiB" + (f", {row['n_masks']} masks" if "n_masks" in row else ""), flush=True)
        sim = _simulated_row(size)
        if sim:
            rows.append(sim)
            print(f"simulated {size:>9}: {sim['n_masks']:.1f} masks/image, cache {sim['cache_kib']:.1f} KiB/image", flush=True)
    model = "ViT-B-size random SAM" if real_size else "tiny random SAM / tiny random Depth-Anything"
    lines = [f"{model}, device {device}, SAM points_per_side {points_per_side}, median of {repeats}", "",
             "| prior | image | s / image | peak MiB | masks | cache KiB / image |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['size']} | {r['s_per_image']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r.get('n_masks', '')} | {r['cache_kib']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if output is not None:
        Path(output).write_text(text)
    return rows
