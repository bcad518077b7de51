"""Rasterizer benchmark: forward and forward+backward time and peak memory (``pepeseg3d bench-render``).

The scene is ``N`` random Gaussians in a slab 2-4 units in front of one pinhole camera (focal length = image
width, so ~53 degree field of view), scales log-uniform in [0.005, 0.03] (about 1-6 px radius at 128 px),
opacities uniform in [0.1, 1], ``D`` random colour channels. The loss for the backward pass is a fixed random
weighting of the rendered image, so every input gets a gradient.

Every configuration runs in a fresh process, so one configuration's freed-but-kept allocator memory does not
hide the next one's. Peak memory: on CPU, the largest resident set size seen by a 2 ms sampling thread during
the timed forward+backward passes minus the RSS just before them (scene tensors and the loaded kernel are
part of the baseline); on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch


def random_scene(n: int, channels: int, resolution: int, device: str = "cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random Gaussians ``means [N,3]``, ``quats [N,4]``, ``scales [N,3]``, ``opacities [N]``, ``colors [N,D]`` and
    one camera ``viewmats [1,4,4]`` (identity, OpenCV), ``Ks [1,3,3]`` for a ``resolution``-pixel square image."""
    g = torch.Generator().manual_seed(seed)
    means = torch.empty(n, 3)
    means[:, :2] = (torch.rand(n, 2, generator=g) * 2 - 1) * 1.2
    means[:, 2] = 2 + 2 * torch.rand(n, generator=g)
    log_s = torch.empty(n, 3).uniform_(torch.log(torch.tensor(0.005)).item(), torch.log(torch.tensor(0.03)).item(), generator=g)
    f = float(resolution)
    K = torch.tensor([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1.0]])
    scene = {
        "means": means,
        "quats": torch.randn(n, 4, generator=g),
        "scales": log_s.exp(),
        "opacities": 0.1 + 0.9 * torch.rand(n, generator=g),
        "colors": torch.rand(n, channels, generator=g),
        "viewmats": torch.eye(4)[None],
        "Ks": K[None],
    }
    return {k: v.to(device) for k, v in scene.items()}


class _PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "_PeakRSS":
        self.base = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_render(n: int, resolution: int, channels: int, device: str = "cpu", repeats: int = 3) -> Dict[str, float]:
    """Median seconds of forward and of forward+backward, peak extra memory (MiB) and intersections count."""
    from pepeseg3d_ns.render import rasterize

    scene = random_scene(n, channels, resolution, device)
    params = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    weight = torch.rand(1, resolution, resolution, channels, device=device)

    def forward():
        img, _, info = rasterize(**params, viewmats=scene["viewmats"], Ks=scene["Ks"], width=resolution, height=resolution)
        return img, info

    forward()  # warm-up (kernel build/load, allocator)
    fwd, full = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            forward()
        _sync(device)
        fwd.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for p in params.values():
        p.grad = None
    mon = _PeakRSS() if device == "cpu" else None
    if mon:
        mon.__enter__()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        img, info = forward()
        (img * weight).sum().backward()
        _sync(device)
        full.append(time.perf_counter() - t0)
    if mon:
        mon.__exit__(None, None, None)
        peak_mib = (mon.peak - mon.base) / 2**20
    else:
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    fwd.sort()
    full.sort()
    return {
        "forward_s": fwd[len(fwd) // 2],
        "fwd_bwd_s": full[len(full) // 2],
        "peak_mib": peak_mib,
        "intersections": float(info["flatten_ids"].numel()),
    }


def run_render_benchmark(
    gaussians: Sequence[int] = (10_000, 50_000, 200_000),
    resolutions: Sequence[int] = (128, 256),
    channels: Sequence[int] = (3, 32),
    repeats: int = 3,
    device: str = "cpu",
    backend: str = "auto",
    output: Optional[Path] = None,
) -> List[Dict[str, float]]:
    """Run :func:`time_render` over the grid, print a table, optionally write it as markdown to ``output``."""
    from rich.console import Console
    from rich.table import Table

    from pepeseg3d_ns.render.rasterize import cpu_backend_name

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    if device == "cpu":
        os.environ["PEPESEG3D_CPU_BACKEND"] = backend
        backend_used = cpu_backend_name()
    else:
        backend_used = "gsplat"
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    ctx = mp.get_context("spawn")
    for n in gaussians:
        for res in resolutions:
            for ch in channels:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    r = pool.submit(time_render, n, res, ch, device, repeats).result()
                rows.append({"gaussians": n, "resolution": res, "channels": ch, **r})
                print(f"N={n:>7} {res:>4}px D={ch:>2}: fwd {r['forward_s']:.3f}s  fwd+bwd {r['fwd_bwd_s']:.3f}s  "
                      f"peak +{r['peak_mib']:.0f} MiB  isects {int(r['intersections'])}", flush=True)
    table = Table(title=f"rasterize() on {device} ({backend_used}), {torch.get_num_threads()} threads")
    for col in ("Gaussians", "px", "channels", "forward s", "fwd+bwd s", "peak MiB", "intersections"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["gaussians"]), str(r["resolution"]), str(r["channels"]), f"{r['forward_s']:.3f}",
                      f"{r['fwd_bwd_s']:.3f}", f"{r['peak_mib']:.0f}", str(int(r["intersections"])))
    Console().print(table)
    if output is not None:
        lines = [
            "| Gaussians | px | channels | forward s | fwd+bwd s | peak MiB | intersections |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['gaussians']} | {r['resolution']} | {r['channels']} | {r['forward_s']:.3f} | {r['fwd_bwd_s']:.3f} "
            f"| {r['peak_mib']:.0f} | {int(r['intersections'])} |"
            for r in rows
        ]
        Path(output).write_text(f"rasterize() on {device} ({backend_used}), {torch.get_num_threads()} threads\n\n" + "\n".join(lines) + "\n")
    return rows
