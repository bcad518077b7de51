"""Benchmarks of the stage-2 helpers: HDBSCAN implementations/subsample sizes and the kNN graph.

Run as ``python -m pepeseg3d_ns.benchmarks.contrast_parts --what all`` (or ``cluster`` / ``knn`` / ``smooth``); the markdown tables it prints
are what ``docs/contrast_bench.md`` records. Every configuration runs in a fresh Python process (imports, numba
compilation and allocator state of one configuration cannot leak into the next), which reports its own timings and
peak memory as one JSON line.

Public API: ``run_cluster_bench(...) -> dict``, ``run_knn_bench(...) -> dict``, ``run_smooth_bench(...) -> dict``
(in-process), ``format_markdown(result) -> str``,
``main(argv=None)``; synthetic data: ``make_sphere_blobs``, ``make_hierarchical_blobs``, ``make_scene_points``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "make_sphere_blobs",
    "make_hierarchical_blobs",
    "make_scene_points",
    "run_cluster_bench",
    "run_knn_bench",
    "run_smooth_bench",
    "format_markdown",
    "main",
]


# ----------------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------------


def make_sphere_blobs(
    n: int, n_clusters: int = 16, dim: int = 32, sigma: float = 0.12, noise_frac: float = 0.05, seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """Gaussian blobs on the unit sphere plus uniform noise.

    Centres are random unit vectors; cluster sizes are drawn from a Dirichlet(2) (so some clusters are small);
    a point is ``normalise(centre + sigma * N(0, I))``; ``noise_frac`` of the points are uniform on the sphere.

    Returns ``(feats float32 [n, dim] unit rows, labels long [n])`` with ``-1`` for the noise points.
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    n_noise = int(round(noise_frac * n))
    gam = -torch.log(torch.rand(n_clusters, 2, generator=g)).sum(1)  # Gamma(2) -> Dirichlet(2) weights
    counts = torch.floor(gam / gam.sum() * (n - n_noise)).long()
    counts[0] += n - n_noise - int(counts.sum())
    labels = torch.repeat_interleave(torch.arange(n_clusters), counts)
    x = F.normalize(centres[labels] + sigma * torch.randn(len(labels), dim, generator=g), dim=1)
    noise = F.normalize(torch.randn(n_noise, dim, generator=g), dim=1)
    feats = torch.cat([x, noise])
    labels = torch.cat([labels, torch.full((n_noise,), -1, dtype=torch.long)])
    perm = torch.randperm(n, generator=g)
    return feats[perm], labels[perm]


def make_hierarchical_blobs(
    n: int,
    n_parents: int = 4,
    n_children: int = 4,
    dim: int = 32,
    child_offset: float = 0.5,
    sigma: float = 0.05,
    noise_frac: float = 0.05,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Two-level structure: parents (objects) made of children (parts).

    Parent centres are random unit vectors; a child centre is ``normalise(parent + child_offset * u)`` with ``u`` a
    random unit vector (children of one parent have cosine ~0.8 to each other, ~0.1 to other parents' children);
    points are ``normalise(child + sigma * N(0, I))`` in equal numbers per child, plus ``noise_frac`` uniform noise.

    Returns ``(feats float32 [n, dim], fine labels long [n], coarse labels long [n])``, ``-1`` = noise.
    """
    g = torch.Generator().manual_seed(seed)
    parents = F.normalize(torch.randn(n_parents, dim, generator=g), dim=1)
    u = F.normalize(torch.randn(n_parents, n_children, dim, generator=g), dim=2)
    children = F.normalize(parents[:, None] + child_offset * u, dim=2).reshape(-1, dim)
    n_noise = int(round(noise_frac * n))
    m = n - n_noise
    fine = torch.arange(m) % (n_parents * n_children)
    x = F.normalize(children[fine] + sigma * torch.randn(m, dim, generator=g), dim=1)
    noise = F.normalize(torch.randn(n_noise, dim, generator=g), dim=1)
    feats = torch.cat([x, noise])
    fine = torch.cat([fine, torch.full((n_noise,), -1, dtype=torch.long)])
    coarse = torch.where(fine >= 0, fine // n_children, fine)
    perm = torch.randperm(n, generator=g)
    return feats[perm], fine[perm], coarse[perm]


def make_scene_points(n: int, seed: int = 0) -> Tensor:
    """Gaussian-centre-like 3D points ``float32 [n, 3]``: 90 % on the surfaces of 20 random spheres (jittered by
    1 % of their radius), 10 % uniform in a box 4x larger (floaters / background)."""
    g = torch.Generator().manual_seed(seed)
    n_surf = int(0.9 * n)
    c = torch.rand(20, 3, generator=g) * 2 - 1
    r = 0.05 + 0.3 * torch.rand(20, generator=g)
    which = torch.randint(0, 20, (n_surf,), generator=g)
    d = F.normalize(torch.randn(n_surf, 3, generator=g), dim=1)
    surf = c[which] + d * (r[which] * (1 + 0.01 * torch.randn(n_surf, generator=g)))[:, None]
    bg = (torch.rand(n - n_surf, 3, generator=g) * 2 - 1) * 4
    return torch.cat([surf, bg])[torch.randperm(n, generator=g)]


# ----------------------------------------------------------------------------------------------------------------
# child-process workers (one configuration each; print one JSON line)
# ----------------------------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker_cluster(cfg: dict) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from pepeseg3d_ns.contrast.cluster import cluster_features

    n, dataset, method, s = cfg["n_points"], cfg["dataset"], cfg["method"], cfg["max_points"]
    if dataset == "blobs":
        feats, gt = make_sphere_blobs(n, seed=cfg["seed"])
        gts = {"": gt}
    else:
        feats, fine, coarse = make_hierarchical_blobs(n, seed=cfg["seed"])
        gts = {"fine": fine, "coarse": coarse}
    # first call on 500 points: import + (numba) compilation / cache load, reported separately
    t0 = time.perf_counter()
    cluster_features(feats[:500], method=method, min_cluster_size=10)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = cluster_features(feats, method=method, max_points=s, seed=cfg["seed"])
    dt = time.perf_counter() - t0
    out = {**cfg, "first_call_s": warm, "time_s": dt, "n_clusters": res.num_clusters, "method_used": res.method}
    lab = res.labels.numpy()
    for name, gt in gts.items():
        gtn = gt.numpy()
        obj = gtn >= 0
        out[f"ari{'_' + name if name else ''}"] = float(adjusted_rand_score(gtn, lab))
        out[f"ari_obj{'_' + name if name else ''}"] = float(adjusted_rand_score(gtn[obj], lab[obj]))
    out["noise_frac_out"] = float((lab < 0).mean())
    out["peak_rss_mb"] = _maxrss_mb()
    return out


def _worker_knn(cfg: dict) -> dict:
    from pepeseg3d_ns.contrast.knn import knn_indices, smooth_features

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    pts = make_scene_points(cfg["n"], seed=cfg["seed"])
    knn_indices(pts[:2000], k=cfg["k"], backend=cfg["backend"])  # warm-up (imports, first-op overheads)
    base = _maxrss_mb()
    t0 = time.perf_counter()
    nb = knn_indices(pts, k=cfg["k"], backend=cfg["backend"])
    dt = time.perf_counter() - t0
    peak = _maxrss_mb()
    out = {**cfg, "time_s": dt, "rss_before_mb": base, "peak_rss_mb": peak}
    if cfg.get("smooth"):
        f = torch.randn(cfg["n"], 32, requires_grad=True)
        t0 = time.perf_counter()
        y = smooth_features(f, nb)
        out["smooth_fwd_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        y.sum().backward()
        out["smooth_bwd_s"] = time.perf_counter() - t0
        out["peak_rss_after_smooth_mb"] = _maxrss_mb()
    return out


def _run_child(kind: str, cfg: dict, timeout: float) -> dict:
    code = (
        "import json,sys; from pepeseg3d_ns.benchmarks import contrast_parts as bench; "
        f"print('@@' + json.dumps(bench._worker_{kind}(json.loads(sys.argv[1]))))"
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            res = json.loads(line[2:])
            res["process_s"] = time.perf_counter() - t0
            return res
    return {**cfg, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in load],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# public runners
# ----------------------------------------------------------------------------------------------------------------


def run_cluster_bench(
    methods: Sequence[str] = ("hdbscan", "sklearn"),
    sizes: Sequence[int] = (2000, 5000, 10000, 30000),
    datasets: Sequence[str] = ("blobs", "hier"),
    n_points: int = 60000,
    seed: int = 0,
    timeout: float = 900.0,
    log: bool = True,
) -> Dict:
    """Time and quality of ``cluster_features`` per implementation, subsample size and synthetic data set.

    Each (dataset, method, size) runs in a fresh process on ``n_points`` 32-d unit features: "blobs" =
    ``make_sphere_blobs`` (16 clusters, 5 % noise), "hier" = ``make_hierarchical_blobs`` (4 x 4, 5 % noise).

    Returns ``{"kind": "cluster", "machine": {...}, "rows": [dict per configuration]}``; a row holds
    ``first_call_s`` (first call on 500 points: imports + numba compile/cache load), ``time_s`` (the measured call:
    HDBSCAN on the subsample + assignment of all points), ``n_clusters``, ``ari`` / ``ari_obj`` (adjusted Rand index
    of the labels of all ``n_points`` vs ground truth, with noise as one class / on ground-truth object points
    only; ``_fine`` / ``_coarse`` for "hier"), ``noise_frac_out``, ``peak_rss_mb``, or ``error``.
    """
    rows = []
    for dataset in datasets:
        for s in sizes:
            for m in methods:
                cfg = {"dataset": dataset, "method": m, "max_points": int(s), "n_points": int(n_points), "seed": seed}
                row = _run_child("cluster", cfg, timeout)
                rows.append(row)
                if log:
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return {"kind": "cluster", "machine": _machine(), "rows": rows}


def run_knn_bench(
    sizes: Sequence[int] = (50_000, 200_000, 1_000_000),
    backends: Sequence[str] = ("scipy", "torch"),
    k: int = 16,
    smooth: bool = True,
    threads: Optional[int] = None,
    seed: int = 0,
    timeout: float = 1800.0,
    log: bool = True,
) -> Dict:
    """Time and peak memory of ``knn_indices`` (and ``smooth_features`` forward/backward with D=32) per size and
    backend, each in a fresh process, on ``make_scene_points`` data.

    Returns ``{"kind": "knn", "machine": {...}, "rows": [...]}``; a row holds ``time_s``, ``rss_before_mb`` (process
    peak RSS before the call: Python + torch + points), ``peak_rss_mb`` (after), ``smooth_fwd_s``,
    ``smooth_bwd_s``, ``peak_rss_after_smooth_mb``, or ``error``.
    """
    rows = []
    for n in sizes:
        for b in backends:
            cfg = {"n": int(n), "backend": b, "k": k, "smooth": smooth, "threads": threads, "seed": seed}
            row = _run_child("knn", cfg, timeout)
            rows.append(row)
            if log:
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {"kind": "knn", "machine": _machine(), "rows": rows}


def run_smooth_bench(
    sizes: Sequence[int] = (50_000, 200_000, 1_000_000),
    k: int = 16,
    dim: int = 32,
    repeats: int = 3,
    threads: Optional[int] = 1,
    seed: int = 0,
) -> Dict:
    """``smooth_features`` vs ``KnnSmoother`` (build once, then forward/backward) on random ``[N, k]`` neighbour
    graphs and ``[N, dim]`` features, in this process; medians of ``repeats`` runs.

    Returns ``{"kind": "smooth", "machine": {...}, "rows": [...]}`` with ``fn_fwd_s``, ``fn_bwd_s``,
    ``smoother_build_s``, ``smoother_fwd_s``, ``smoother_bwd_s``, ``max_abs_diff`` per size.
    """
    from pepeseg3d_ns.contrast.knn import KnnSmoother, smooth_features

    if threads:
        torch.set_num_threads(int(threads))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in sizes:
        nb = torch.randint(0, n, (n, k), generator=g)
        f = torch.randn(n, dim, generator=g, requires_grad=True)
        t0 = time.perf_counter()
        sm = KnnSmoother(nb)
        sm(f.detach())  # first call builds the per-device CSR matrices
        build = time.perf_counter() - t0
        row: Dict = {"n": int(n), "k": k, "dim": dim, "smoother_build_s": build}
        for name, fn in (("fn", lambda: smooth_features(f, nb)), ("smoother", lambda: sm(f))):
            tf, tb = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                y = fn()
                tf.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                y.sum().backward()
                tb.append(time.perf_counter() - t0)
                f.grad = None
            row[f"{name}_fwd_s"] = sorted(tf)[len(tf) // 2]
            row[f"{name}_bwd_s"] = sorted(tb)[len(tb) // 2]
        with torch.no_grad():
            row["max_abs_diff"] = float((smooth_features(f, nb) - sm(f)).abs().max())
        rows.append(row)
    return {"kind": "smooth", "machine": _machine(), "rows": rows}


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_markdown(result: Dict) -> str:
    """Markdown table(s) for a result of ``run_cluster_bench`` or ``run_knn_bench``."""
    m = result.get("machine", {})
    head = (
        f"_{m.get('cpus')} CPUs, torch {m.get('torch')} ({m.get('torch_threads')} threads in the parent process), "
        f"load average at the end {m.get('loadavg')}_\n\n"
    )
    lines: List[str] = []
    if result["kind"] == "cluster":
        for dataset in dict.fromkeys(r["dataset"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["dataset"] == dataset]
            hier = dataset == "hier"
            cols = ["subsample", "method", "first call (s)", "time (s)", "clusters"]
            cols += ["ARI fine", "ARI fine (objects)", "ARI coarse", "ARI coarse (objects)"] if hier else [
                "ARI",
                "ARI (objects)",
            ]
            cols += ["noise out", "peak RSS (MB)"]
            lines.append(f"**{dataset}** ({rows[0]['n_points']} points)\n")
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['max_points']} | {r['method']} | error: {r['error']} |")
                    continue
                name = r["method"] + (" (re-run)" if r.get("rerun") else "")
                vals = [str(r["max_points"]), name, _f(r["first_call_s"], "{:.1f}"), _f(r["time_s"])]
                vals.append(str(r["n_clusters"]))
                keys = ["ari_fine", "ari_obj_fine", "ari_coarse", "ari_obj_coarse"] if hier else ["ari", "ari_obj"]
                vals += [_f(r.get(kk), "{:.3f}") for kk in keys]
                vals += [_f(r["noise_frac_out"], "{:.3f}"), _f(r["peak_rss_mb"], "{:.0f}")]
                lines.append("| " + " | ".join(vals) + " |")
            lines.append("")
    elif result["kind"] == "smooth":
        cols = ["N", "smooth_features fwd / bwd (s)", "KnnSmoother build (s)", "KnnSmoother fwd / bwd (s)",
                "max abs diff"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in result["rows"]:
            lines.append(
                f"| {r['n']} | {r['fn_fwd_s']:.3f} / {r['fn_bwd_s']:.3f} | {r['smoother_build_s']:.2f} | "
                f"{r['smoother_fwd_s']:.3f} / {r['smoother_bwd_s']:.3f} | {r['max_abs_diff']:.1e} |"
            )
        lines.append("")
    else:
        cols = ["N", "backend", "kNN time (s)", "RSS before (MB)", "peak RSS (MB)", "smooth fwd (s)", "smooth bwd (s)",
                "peak RSS after smoothing (MB)"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| {r['n']} | {r['backend']} | error: {r['error']} |")
                continue
            lines.append(
                "| "
                + " | ".join(
                    [
                        str(r["n"]),
                        r["backend"] + (" (re-run)" if r.get("rerun") else ""),
                        _f(r["time_s"]),
                        _f(r["rss_before_mb"], "{:.0f}"),
                        _f(r["peak_rss_mb"], "{:.0f}"),
                        _f(r.get("smooth_fwd_s")),
                        _f(r.get("smooth_bwd_s")),
                        _f(r.get("peak_rss_after_smooth_mb"), "{:.0f}"),
                    ]
                )
                + " |"
            )
        lines.append("")
    return head + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m pepeseg3d_ns.benchmarks.contrast_parts --what {cluster,knn,smooth,all} [--json out.json]``."""
    ap = argparse.ArgumentParser(prog="pepeseg3d-contrast-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("cluster", "knn", "smooth", "all"), default="all")
    ap.add_argument("--methods", nargs="+", default=["hdbscan", "sklearn"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[2000, 5000, 10000, 30000], help="HDBSCAN subsamples")
    ap.add_argument("--datasets", nargs="+", default=["blobs", "hier"])
    ap.add_argument("--n-points", type=int, default=60000, help="points per clustering data set")
    ap.add_argument("--knn-sizes", nargs="+", type=int, default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--knn-backends", nargs="+", default=["scipy", "torch"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the kNN children (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = ap.parse_args(argv)
    results = []
    if args.what in ("cluster", "all"):
        results.append(run_cluster_bench(args.methods, args.sizes, args.datasets, args.n_points))
    if args.what in ("knn", "all"):
        results.append(run_knn_bench(args.knn_sizes, args.knn_backends, threads=args.threads))
    if args.what in ("smooth", "all"):
        results.append(run_smooth_bench(args.knn_sizes, threads=args.threads or 1))
    for r in results:
        print(format_markdown(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
