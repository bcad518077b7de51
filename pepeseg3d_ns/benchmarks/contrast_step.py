"""Benchmark of one pepe-contrast training step: time per phase and peak memory (``pepeseg3d bench-contrast``).

No trained scene is needed. For ``N`` Gaussians the benchmark writes a synthetic pepe-recon checkpoint (the keys
:func:`pepeseg3d_ns.contrast.model.load_recon_geometry` reads) into a temporary folder and builds the real
:class:`~pepeseg3d_ns.contrast.model.PepeContrastModel` from it, exactly as ``ns-train pepe-contrast`` does
(``populate_modules`` loads the geometry and builds the 16-NN index). The scene is the rasterizer benchmark's
(:func:`pepeseg3d_ns.benchmarks.render.random_scene`): ``N`` random Gaussians in a slab 2-4 units in front of one pinhole
camera (focal length = image width), 1-6 px radius at 128 px, so every pixel is covered by many Gaussians.

The batch is what the pepe-contrast datamanager hands the model (:func:`make_batch`): ``num_masks`` nested SAM-like
masks (rectangles at the top level, ellipses clipped to their parent below), their pixel areas, mask scales in
[0, 1] (the rank of ``sqrt(area)``, as the scene's quantile transform would give), a smooth depth prior and a random
image.

One training step is what nerfstudio's trainer does for this model (:func:`train_step`)::

    out = model(camera); loss = sum(model.get_loss_dict(out, batch).values()); loss.backward(); optimizer.step()

with Adam (lr 0.0025) on ``model.get_param_groups()``. Three kinds of step are timed separately:

* ``plain``: before ``centroid_start`` (Lm + Lp + L2D);
* ``lc``: after the centroid sets exist, not a refresh step (adds the centroid pull loss);
* ``refresh``: a refresh's start step (its views' pixels gated at s = 1 and s = 0 and handed to the clustering
  worker, which runs HDBSCAN on at most ``cluster_max_points`` = 5000 pixels in a background process); the step that
  merges its centres ``centroid_lag`` = 10 steps later is timed as ``merge`` (JSON rows only), with the steps in
  between run untimed as in training.

Each configuration (size, resolution, thread count) runs in a fresh Python process with ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` set before torch is imported. Before anything is measured the child
builds and trains a 64-Gaussian model once and runs HDBSCAN once (lazy imports, C++ kernel load, numba compilation
are not in the numbers). Times are the median of ``repeats`` steps after one warm-up step of the same kind.
Memory (CPU): ``peak_mib`` = the process's high-water RSS (``getrusage``) minus the RSS after that warm-up (model,
kNN index, optimiser state and the steps' transients included); ``step_peak_mib`` = the largest RSS seen by a 2 ms sampling thread during the timed plain steps minus
the RSS just before them (what one step allocates on top of the resident model). On CUDA both are
``torch.cuda.max_memory_allocated`` differences.

Optionally one extra plain step and one extra refresh step run under ``torch.profiler`` with labelled ranges around
the kNN smoothing, projection, tile intersection, compositing, pair sampling, losses, HDBSCAN and the optimiser;
the backward nodes of the two custom autograd functions (kNN mean, compositing) are read from the profiler's
``autograd::engine::evaluate_function`` events. The result is the row's ``profile`` dict (seconds per part).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "make_recon_checkpoint",
    "make_camera",
    "make_batch",
    "build_model",
    "train_step",
    "run_contrast_step_bench",
    "format_markdown",
    "BenchContrast",
]

Resolution = Tuple[int, int]


# ----------------------------------------------------------------------------------------------------------------
# synthetic inputs
# ----------------------------------------------------------------------------------------------------------------


def make_recon_checkpoint(folder: Path, n: int, resolution: int = 128, sh_degree: int = 3, seed: int = 0) -> Path:
    """Write a pepe-recon-like checkpoint of ``n`` random Gaussians to ``folder/step-000000000.ckpt``.

    Geometry from :func:`pepeseg3d_ns.benchmarks.render.random_scene` (world = the camera of :func:`make_camera`):
    ``{"step": 0, "pipeline": {"_model.gauss_params.means" [n, 3], ".scales" [n, 3] log standard deviations,
    ".quats" [n, 4] (w, x, y, z, unnormalised), ".features_dc" [n, 3], ".features_rest" [n, (sh_degree+1)^2 - 1, 3],
    ".opacities" [n, 1] logits}}``, all float32. ``resolution`` only matters for the unused intrinsics.
    Returns the checkpoint path.
    """
    if n < 2:
        raise ValueError(f"make_recon_checkpoint needs at least 2 Gaussians, got n={n}")
    if sh_degree < 0:
        raise ValueError(f"sh_degree must be >= 0, got {sh_degree}")
    from pepeseg3d_ns.benchmarks.render import random_scene

    scene = random_scene(n, channels=3, resolution=resolution, device="cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    prefix = "_model.gauss_params."
    pipe = {
        prefix + "means": scene["means"],
        prefix + "scales": scene["scales"].log(),
        prefix + "quats": scene["quats"],
        prefix + "features_dc": torch.rand(n, 3, generator=g) - 0.5,
        prefix + "features_rest": 0.05 * torch.randn(n, (sh_degree + 1) ** 2 - 1, 3, generator=g),
        prefix + "opacities": torch.logit(scene["opacities"].clamp(1e-4, 1 - 1e-4))[:, None],
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "step-000000000.ckpt"
    torch.save({"step": 0, "pipeline": pipe}, path)
    return path


def make_camera(resolution: Resolution, device: str = "cpu"):
    """One nerfstudio pinhole ``Cameras`` of ``resolution = (H, W)`` px, focal length ``W`` px, principal point at
    the image centre, whose OpenCV view matrix is the identity (OpenGL camera-to-world ``diag(1, -1, -1)``): it looks
    down world ``+z`` at the Gaussians of :func:`make_recon_checkpoint`."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    from pepeseg3d_ns.render.cameras import c2w_from_viewmat

    H, W = _check_resolution(resolution)
    c2w = c2w_from_viewmat(torch.eye(4)[None])  # [1, 3, 4]
    return Cameras(
        camera_to_worlds=c2w, fx=float(W), fy=float(W), cx=W / 2.0, cy=H / 2.0, width=W, height=H,
        camera_type=CameraType.PERSPECTIVE,
    ).to(device)


def _check_resolution(resolution) -> Resolution:
    try:
        H, W = (int(v) for v in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be (H, W), got {resolution!r}") from None
    if H < 4 or W < 4:
        raise ValueError(f"resolution must be at least 4x4 px, got {(H, W)}")
    return H, W


def make_batch(resolution: Resolution, num_masks: int = 60, seed: int = 0, device: str = "cpu") -> Dict[str, Tensor]:
    """A pepe-contrast training batch of one ``(H, W)`` view with ``num_masks`` nested SAM-like masks.

    Masks: the first ``max(1, num_masks // 10)`` are axis-aligned rectangles covering random parts of the image
    (objects / groups); every later mask is an ellipse inside a random earlier mask's bounding box (centre uniform
    in the box, semi-axes 15-50 % of the box side) clipped to that mask, so masks nest like SAM's part/object
    hierarchy (one holding no pixel centre becomes the parent's pixel nearest to the ellipse centre). Every mask is
    non-empty and every non-top mask lies inside an earlier mask. Mask scales are the rank of ``sqrt(area)`` mapped to
    [0, 1] (ties by index), i.e. what the scene's quantile transform gives when size grows with area.

    Returns ``{"image": float32 [H, W, 3] in [0, 1], "pixel_masks": PixelMasks (what the datamanager hands the
    model), "mask_scales": float32 [M], "depth_prior": float32 [H, W, 1] (smooth, larger = nearer)}`` on ``device``,
    plus the dense reference ``"sam_masks": bool [M, H, W]`` and ``"sam_mask_areas": int64 [M]`` (the model does
    not read them).
    """
    H, W = _check_resolution(resolution)
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5,
                            indexing="ij")
    masks = torch.zeros(num_masks, H, W, dtype=torch.bool)
    boxes: List[Tuple[float, float, float, float]] = []  # y0, x0, y1, x1
    n_top = max(1, num_masks // 10)
    for m in range(num_masks):
        if m < n_top:
            h = H * (0.3 + 0.6 * float(torch.rand(1, generator=g)))
            w = W * (0.3 + 0.6 * float(torch.rand(1, generator=g)))
            y0 = (H - h) * float(torch.rand(1, generator=g))
            x0 = (W - w) * float(torch.rand(1, generator=g))
            box = (y0, x0, y0 + h, x0 + w)
            mask = (yy >= box[0]) & (yy < box[2]) & (xx >= box[1]) & (xx < box[3])
        else:
            p = int(torch.randint(0, m, (1,), generator=g))
            py0, px0, py1, px1 = boxes[p]
            cy = py0 + (py1 - py0) * float(torch.rand(1, generator=g))
            cx = px0 + (px1 - px0) * float(torch.rand(1, generator=g))
            ry = (py1 - py0) * (0.15 + 0.35 * float(torch.rand(1, generator=g)))
            rx = (px1 - px0) * (0.15 + 0.35 * float(torch.rand(1, generator=g)))
            mask = (((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0) & masks[p]
            box = (cy - ry, cx - rx, cy + ry, cx + rx)
            if not mask.any():  # too small to hold a pixel centre: the parent's pixel nearest to the centre
                d2 = torch.where(masks[p], (yy - cy) ** 2 + (xx - cx) ** 2, torch.tensor(float("inf")))
                mask = torch.zeros(H * W, dtype=torch.bool)
                mask[int(torch.argmin(d2))] = True
                mask = mask.reshape(H, W)
        masks[m] = mask
        boxes.append(box)
    areas = masks.flatten(1).sum(1)
    order = torch.argsort(areas.double() + torch.arange(num_masks, dtype=torch.float64) * 1e-6)
    rank = torch.empty(num_masks, dtype=torch.float32)
    rank[order] = torch.arange(num_masks, dtype=torch.float32)
    scales = rank / max(num_masks - 1, 1)
    depth = 1.0 + 0.5 * torch.sin(xx / W * 3.0) * torch.cos(yy / H * 2.0)
    image = torch.rand(H, W, 3, generator=g)
    from pepeseg3d_ns.priors.pixel_masks import PixelMasks

    batch = {
        "image": image,
        "pixel_masks": PixelMasks.from_dense(masks),
        "sam_masks": masks,
        "sam_mask_areas": areas.long(),
        "mask_scales": scales,
        "depth_prior": depth[..., None],
    }
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# model and step
# ----------------------------------------------------------------------------------------------------------------


def build_model(checkpoint: Path, device: str = "cpu", centroid_start: int = 1000, centroid_every: int = 200,
                **config_overrides):
    """The real :class:`~pepeseg3d_ns.contrast.model.PepeContrastModel` on the geometry of ``checkpoint``, in train
    mode (gate trained from step 0 unless ``gate_warmup`` is given), plus ``info = {"setup_s": seconds of the whole
    construction, "knn_s": seconds of the kNN index build inside it}``. ``config_overrides`` are fields of ``PepeContrastModelConfig``. Returns ``(model, info)``."""
    from nerfstudio.data.scene_box import SceneBox

    from pepeseg3d_ns.contrast.model import PepeContrastModel, PepeContrastModelConfig

    timing: Dict[str, float] = {}

    class _TimedKnnModel(PepeContrastModel):
        def _build_knn(self, means: Tensor) -> Tensor:
            t0 = time.perf_counter()
            out = super()._build_knn(means)
            timing["knn_s"] = time.perf_counter() - t0
            return out

    config_overrides.setdefault("gate_warmup", 0)  # a timed step includes the gate's backward
    config_overrides.setdefault("centroid_lag", 10)  # our background lag, 100 of 10k scaled to a 1000-step run
    cfg = PepeContrastModelConfig(recon_checkpoint=Path(checkpoint), centroid_start=centroid_start,
                                  centroid_every=centroid_every, **config_overrides)
    cfg._target = _TimedKnnModel
    t0 = time.perf_counter()
    model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-2.0, -2.0, 1.0], [2.0, 2.0, 5.0]])),
                      num_train_data=1, metadata={})
    model = model.to(device)
    _sync(device)
    timing["setup_s"] = time.perf_counter() - t0
    model.train()
    return model, {"setup_s": timing["setup_s"], "knn_s": timing.get("knn_s", float("nan"))}


def make_optimizer(model, lr: float = 0.0025) -> torch.optim.Optimizer:
    """Adam (``lr``, eps 1e-15 as nerfstudio's configs) over every group of ``model.get_param_groups()``."""
    groups = [{"params": p, "name": name} for name, p in model.get_param_groups().items()]
    return torch.optim.Adam(groups, lr=lr, eps=1e-15)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer: torch.optim.Optimizer, camera, batch: Dict[str, Tensor], step: int) -> Dict[str, float]:
    """One training step at ``step`` (sets ``model.step`` as the trainer's step callback does). Returns seconds of
    ``forward`` (render), ``loss`` (``get_loss_dict``: sampling, losses and, on a refresh step, HDBSCAN),
    ``backward``, ``optimizer`` (Adam step + zero_grad) and ``total``, plus ``loss_value``."""
    device = str(model.device)
    model.step = step
    _sync(device)
    t0 = time.perf_counter()
    out = model(camera)
    _sync(device)
    t1 = time.perf_counter()
    losses = model.get_loss_dict(out, batch)
    loss = sum(losses.values())
    _sync(device)
    t2 = time.perf_counter()
    loss.backward()
    _sync(device)
    t3 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t4 = time.perf_counter()
    return {"forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0,
            "loss_value": float(loss.detach())}


# ----------------------------------------------------------------------------------------------------------------
# profiling (child process only: wraps module functions in labelled profiler ranges)
# ----------------------------------------------------------------------------------------------------------------

_PROFILED = {
    # label: (module, attribute)
    "knn smoothing fwd": ("pepeseg3d_ns.contrast.knn", "KnnSmoother.__call__"),  # what the model uses
    "projection fwd": ("pepeseg3d_ns.render.rasterize", "project_gaussians"),
    "tile intersection": ("pepeseg3d_ns.render.rasterize", "isect_tiles"),
    "compositing fwd": ("pepeseg3d_ns.render.rasterize", "composite_cpu"),
    "sampling: pixel draw": ("pepeseg3d_ns.contrast.sampling", "draw_pixels"),
    "sampling: sampled masks": ("pepeseg3d_ns.contrast.sampling", "gather_sampled"),
    "sampling: pairs": ("pepeseg3d_ns.contrast.sampling", "set_sample_pairs"),
    "sampling: pair targets": ("pepeseg3d_ns.contrast.sampling", "set_pair_targets"),
    "sampling: pixel weights": ("pepeseg3d_ns.contrast.sampling", "set_pixel_weights"),
    "sampling: perception pairs": ("pepeseg3d_ns.contrast.perception", "_perception_pairs"),
    "loss: Lm": ("pepeseg3d_ns.contrast.losses", "scale_contrastive_loss"),
    "loss: Lp": ("pepeseg3d_ns.contrast.losses", "perception_loss"),
    "loss: L2D": ("pepeseg3d_ns.contrast.losses", "norm_regulariser"),
    "HDBSCAN (cluster_features)": ("pepeseg3d_ns.contrast.cluster", "cluster_features"),  # inline worker only
    "centroid refresh: start": ("pepeseg3d_ns.contrast.model", "PepeContrastModel._start_centroid_refresh"),
    "centroid refresh: merge": ("pepeseg3d_ns.contrast.model", "PepeContrastModel._merge_centroid_refresh"),
}
_BACKWARD_NODES = {"knn smoothing bwd": "_SparseApplyBackward", "compositing bwd": "_RasterizeToPixelsCPUBackward"}
_PHASES = ("step: forward", "step: loss", "step: backward", "step: optimizer")


@contextlib.contextmanager
def _labelled_ranges():
    """Temporarily wrap the functions of ``_PROFILED`` in ``torch.profiler.record_function`` ranges."""
    import importlib

    saved = []
    try:
        for label, (mod_name, attr) in _PROFILED.items():
            mod = importlib.import_module(mod_name)
            *owners, attr = attr.split(".")  # "Class.method" patches the method on the class
            for owner in owners:
                mod = getattr(mod, owner)
            fn = getattr(mod, attr)

            def wrapped(*a, __fn=fn, __label=label, **kw):
                with torch.profiler.record_function(__label):
                    return __fn(*a, **kw)

            saved.append((mod, attr, fn))
            setattr(mod, attr, wrapped)
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def _profiled_step(model, optimizer, camera, batch, step: int) -> Dict[str, float]:
    """Seconds per labelled part of one step (CPU wall time of the profiler ranges; parts nest inside phases)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = str(model.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with _labelled_ranges(), profile(activities=acts) as prof:
        model.step = step
        with record_function("step: forward"):
            out = model(camera)
        with record_function("step: loss"):
            loss = sum(model.get_loss_dict(out, batch).values())
        with record_function("step: backward"):
            loss.backward()
            _sync(device)
        with record_function("step: optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
    totals: Dict[str, float] = {}
    for ev in prof.key_averages():
        name = ev.key
        if name in _PROFILED or name in _PHASES:
            totals[name] = totals.get(name, 0.0) + ev.cpu_time_total / 1e6
        else:
            for label, node in _BACKWARD_NODES.items():
                if name.startswith("autograd::engine::evaluate_function:") and name.endswith(node):
                    totals[label] = totals.get(label, 0.0) + ev.cpu_time_total / 1e6
    return totals


# ----------------------------------------------------------------------------------------------------------------
# child process
# ----------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _time_steps(model, opt, camera, batch, steps: Sequence[int]) -> Dict[str, float]:
    parts = [train_step(model, opt, camera, batch, s) for s in steps]
    return {k: _median([p[k] for p in parts]) for k in ("forward", "loss", "backward", "optimizer", "total")}


def _warm_up(device: str) -> None:
    """Pay the one-off costs outside the measurements: the lazy imports of model construction (gsplat strategy,
    metrics, viewer controls, scipy), the first render/backward, and HDBSCAN's import and numba compilation."""
    from pepeseg3d_ns.contrast.cluster import cluster_features

    with tempfile.TemporaryDirectory(prefix="pepe_step_bench_warm_") as tmp:
        model, _ = build_model(make_recon_checkpoint(Path(tmp), 64), device=device)
    train_step(model, make_optimizer(model), make_camera((16, 16), device), make_batch((16, 16), 8, device=device), 0)
    del model
    cluster_features(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)), min_cluster_size=10)


def _worker(cfg: dict) -> dict:
    """One configuration in this (fresh) process; ``cfg`` keys: gaussians, height, width, threads, repeats, device,
    num_masks, profile, seed. Returns the row (see :func:`run_contrast_step_bench`)."""
    from pepeseg3d_ns.benchmarks.render import _PeakRSS
    from pepeseg3d_ns.render.rasterize import cpu_backend_name

    torch.set_num_threads(int(cfg["threads"]))
    device = cfg["device"]
    n, H, W, repeats = int(cfg["gaussians"]), int(cfg["height"]), int(cfg["width"]), int(cfg["repeats"])
    import pepeseg3d_ns.contrast.model  # noqa: F401  (imports: nerfstudio, gsplat, viewer controls)
    import pepeseg3d_ns.contrast.cluster  # noqa: F401

    backend = cpu_backend_name() if device == "cpu" else "gsplat"  # loads the C++ kernel once, outside the timings
    _warm_up(device)
    rss0 = _rss_bytes()
    row = {**cfg, "backend": backend, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="pepe_step_bench_") as tmp:
        ckpt = make_recon_checkpoint(Path(tmp), n, resolution=W, seed=cfg["seed"])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            cuda0 = torch.cuda.memory_allocated()
        model, info = build_model(ckpt, device=device)
    row.update(setup_s=info["setup_s"], knn_s=info["knn_s"])
    camera = make_camera((H, W), device=device)
    batch = make_batch((H, W), num_masks=int(cfg["num_masks"]), seed=cfg["seed"], device=device)
    row["covered_px"] = int((batch["pixel_masks"].set_masks[:, 0] >= 0).long()[batch["pixel_masks"].pixel_set.long()].sum())
    opt = make_optimizer(model)
    c0, every = model.config.centroid_start, model.config.centroid_every

    # plain steps (no centroid loss): one warm-up, then the timed ones under the RSS sampler
    train_step(model, opt, camera, batch, 0)
    base = _rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_base = torch.cuda.memory_allocated()
    with _PeakRSS() as mon:
        plain = _time_steps(model, opt, camera, batch, range(1, 1 + repeats))
    row["step_peak_mib"] = ((mon.peak - base) if device == "cpu" else
                            (torch.cuda.max_memory_allocated() - step_base)) / 2**20
    row.update({f"plain_{k}_s": v for k, v in plain.items()})

    # refresh steps: capture the views of the steps before a start step (untimed), time the start step, run the
    # steps up to the merge untimed (the worker clusters meanwhile), time the merge step; the first refresh warms up
    first, every, lag, views = model.centroid_schedule()
    starts = [first + every * (i + 1) for i in range(repeats + 2)]
    timed = {"refresh": [], "merge": []}
    for i, t in enumerate(starts[:-1]):
        for s in range(t - views + 1, t):
            train_step(model, opt, camera, batch, s)
        r = train_step(model, opt, camera, batch, t)
        for s in range(t + 1, t + lag):
            train_step(model, opt, camera, batch, s)
        m = train_step(model, opt, camera, batch, t + lag) if lag else r
        if i:
            timed["refresh"].append(r)
            timed["merge"].append(m)
    for kind, parts in timed.items():
        row.update({f"{kind}_{k}_s": _median([p[k] for p in parts])
                    for k in ("forward", "loss", "backward", "optimizer", "total")})
    row["centroids"] = [len(model.bank_upper), len(model.bank_lower)]

    # steps with the centroid loss active but no capture, start or merge
    last = starts[-2] + lag
    quiet = [s for s in range(last + 1, last + every) if (first - s) % every >= views and (first + lag - s) % every]
    quiet = (quiet * (repeats + 2))[: repeats + 2]  # (a step number may repeat: the model only reads the schedule)
    train_step(model, opt, camera, batch, quiet[0])
    lc = _time_steps(model, opt, camera, batch, quiet[1: 1 + repeats])
    row.update({f"lc_{k}_s": v for k, v in lc.items()})

    if cfg.get("profile"):
        t = starts[-1]
        for s in range(t - views + 1, t):
            train_step(model, opt, camera, batch, s)
        row["profile"] = {"plain": _profiled_step(model, opt, camera, batch, 1 + repeats),
                          "refresh": _profiled_step(model, opt, camera, batch, t)}
        for s in range(t + 1, t + lag):
            train_step(model, opt, camera, batch, s)
        row["profile"]["merge"] = _profiled_step(model, opt, camera, batch, t + lag)
    row["rss_base_mib"] = rss0 / 2**20
    if device == "cpu":
        row["peak_mib"] = (_maxrss_bytes() - rss0) / 2**20
    else:
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
    try:
        row["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return row


def _run_child(cfg: dict, timeout: float) -> dict:
    """Run :func:`_worker` in a fresh interpreter (:func:`pepeseg3d_ns.benchmarks.run_worker_process`)."""
    from pepeseg3d_ns.benchmarks import run_worker_process

    return run_worker_process("contrast_step", cfg, timeout)


# ----------------------------------------------------------------------------------------------------------------
# public runner and formatting
# ----------------------------------------------------------------------------------------------------------------


def run_contrast_step_bench(
    sizes: Sequence[int] = (50_000, 200_000),
    resolutions: Sequence[Resolution] = ((128, 128), (256, 256)),
    threads: Sequence[int] = (1, 2),
    repeats: int = 5,
    device: str = "cpu",
    num_masks: int = 60,
    profile: bool = True,
    output: Optional[Path] = None,
    timeout: float = 1800.0,
    seed: int = 0,
    log: bool = True,
) -> List[Dict]:
    """Time a pepe-contrast training step for every (size, resolution, thread count), each in a fresh process.

    Args:
        sizes: numbers of Gaussians ``N``.
        resolutions: ``(H, W)`` image sizes.
        threads: torch/OpenMP thread counts (``OMP_NUM_THREADS`` of the child).
        repeats: timed steps per kind (the median is reported), each after one warm-up step.
        device: ``"cpu"`` or ``"cuda"``.
        num_masks: SAM masks of the synthetic view (:func:`make_batch`).
        profile: also profile one plain and one refresh step (``row["profile"]``).
        output: also write :func:`format_markdown` of the rows here.
        timeout: seconds per child process.

    Returns:
        One dict per configuration: the inputs (``gaussians``, ``height``, ``width``, ``threads``, ``repeats``,
        ``device``, ...), ``backend``, ``setup_s`` (model construction: checkpoint load + kNN index, imports excluded), ``knn_s``
        (kNN index build), ``{plain,lc,refresh}_{forward,loss,backward,optimizer,total}_s`` (medians),
        ``step_peak_mib``, ``peak_mib``, ``rss_base_mib``, ``covered_px``, ``centroids`` ([|U|, |L|] at the end),
        ``profile`` (``{"plain": {label: s}, "refresh": {...}}``), ``process_s``; or ``error``.
    """
    if not sizes or not resolutions or not threads:
        raise ValueError("sizes, resolutions and threads must each hold at least one value")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    for n in sizes:
        if int(n) < 2:
            raise ValueError(f"every size must be >= 2 Gaussians, got {n}")
    res_list = [_check_resolution(r) for r in resolutions]
    rows = []
    for n in sizes:
        for H, W in res_list:
            for t in threads:
                cfg = {"gaussians": int(n), "height": H, "width": W, "threads": int(t), "repeats": int(repeats),
                       "device": device, "num_masks": int(num_masks), "profile": bool(profile), "seed": int(seed)}
                row = _run_child(cfg, timeout)
                rows.append(row)
                if log:
                    if "error" in row:
                        print(f"N={n} {H}x{W} threads={t}: ERROR {row['error']}", file=sys.stderr, flush=True)
                    else:
                        print(f"N={n:>7} {H}x{W} threads={t}: setup {row['setup_s']:.2f}s (kNN {row['knn_s']:.2f}s)  "
                              f"step {row['plain_total_s']:.3f}s  +Lc {row['lc_total_s']:.3f}s  "
                              f"refresh {row['refresh_total_s']:.3f}s  peak +{row['peak_mib']:.0f} MiB "
                              f"(step +{row['step_peak_mib']:.0f})", file=sys.stderr, flush=True)
    if output is not None:
        Path(output).write_text(format_markdown(rows))
    return rows


def format_markdown(rows: Sequence[Dict]) -> str:
    """Markdown: the main table (one line per configuration) and, for rows with a profile, a breakdown table per
    configuration (seconds and share of the step)."""
    if not rows:
        raise ValueError("format_markdown needs at least one row")
    cols = ["Gaussians", "px", "threads", "setup s", "kNN build s", "step s", "fwd s", "loss s", "bwd s", "Adam s",
            "step with Lc s", "refresh step s", "step peak MiB", "process peak MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        head = [str(r["gaussians"]), f"{r['height']}×{r['width']}", str(r["threads"])]
        if "error" in r:
            lines.append("| " + " | ".join(head) + f" | error: {r['error']} |")
            continue
        vals = head + [f"{r['setup_s']:.2f}", f"{r['knn_s']:.2f}", f"**{r['plain_total_s']:.3f}**",
                       f"{r['plain_forward_s']:.3f}", f"{r['plain_loss_s']:.3f}", f"{r['plain_backward_s']:.3f}",
                       f"{r['plain_optimizer_s']:.3f}", f"{r['lc_total_s']:.3f}", f"{r['refresh_total_s']:.2f}",
                       f"{r['step_peak_mib']:.0f}", f"{r['peak_mib']:.0f}"]
        lines.append("| " + " | ".join(vals) + " |")
    out = "\n".join(lines) + "\n"
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        labels = [k for k in list(_PHASES) + list(_PROFILED) + list(_BACKWARD_NODES)
                  if any(k in p for p in prof.values())]
        out += (f"\nProfile, {r['gaussians']} Gaussians, {r['height']}×{r['width']} px, {r['threads']} thread(s) "
                f"(one step under torch.profiler; seconds, % of the step):\n\n")
        kinds = list(prof)
        out += "| part | " + " | ".join(f"{k} step" for k in kinds) + " |\n|---|" + "---:|" * len(kinds) + "\n"
        for lab in labels:
            cells = []
            for k in kinds:
                total = sum(prof[k].get(p, 0.0) for p in _PHASES) or math.nan
                v = prof[k].get(lab)
                cells.append("–" if v is None else f"{v:.3f} ({100 * v / total:.0f} %)")
            name = f"**{lab}**" if lab in _PHASES else lab
            out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BenchContrast:
    """Time one pepe-contrast training step (render, losses, backward, Adam; with and without the centroid
    refresh) and its peak memory, on synthetic frozen Gaussians, each configuration in a fresh process."""

    sizes: Tuple[int, ...] = (50_000, 200_000)
    """Numbers of Gaussians."""
    resolutions: Tuple[str, ...] = ("128x128", "256x256")
    """Image sizes, WIDTHxHEIGHT."""
    threads: Tuple[int, ...] = (1, 2)
    """Torch/OpenMP thread counts (OMP_NUM_THREADS of each child process)."""
    repeats: int = 5
    """Timed steps per kind; the median is reported."""
    device: Literal["cpu", "cuda"] = "cpu"
    num_masks: int = 60
    """SAM masks of the synthetic view."""
    profile: bool = True
    """Also profile one plain and one refresh step and print the breakdown."""
    output: Optional[Path] = None
    """Also write the markdown tables here."""
    json_output: Optional[Path] = None
    """Also write the raw rows as JSON here."""

    def main(self) -> None:
        from pepeseg3d_ns.benchmarks import parse_sizes

        res = parse_sizes("--resolutions", self.resolutions)
        kwargs = dataclasses.asdict(self)
        kwargs.pop("json_output")
        kwargs["resolutions"] = res
        rows = run_contrast_step_bench(**kwargs)
        try:
            load = os.getloadavg()
            print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
        except OSError:
            pass
        print(format_markdown(rows))
        if self.json_output is not None:
            Path(self.json_output).write_text(json.dumps(rows, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m pepeseg3d_ns.benchmarks.contrast_step [--sizes ...]`` (tyro over :class:`BenchContrast`)."""
    import tyro

    tyro.cli(BenchContrast, args=argv).main()


if __name__ == "__main__":
    main()
