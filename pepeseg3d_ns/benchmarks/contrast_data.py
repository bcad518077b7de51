"""Benchmark of the data path of a pepe-contrast step alone (``pepeseg3d bench-step``): batch preparation, pixel
sampling, pair targets and losses (with their backward into the feature map), no rendering.

Two paths on the same inputs, each configuration in a fresh process:

* ``dense`` (what ``main`` did before the per-pixel mask sets): the datamanager expands the image's bit-packed
  :class:`~pepeseg3d_ns.priors.masks.MaskSet` to a bool ``[M, H, W]`` tensor; the model computes the covered map
  over ``[M, H, W]``, the mask-balanced probabilities of every pixel in float64
  (:func:`~pepeseg3d_ns.contrast.dense_reference.mask_balanced_probabilities`), copies them to the host, draws with
  ``torch.multinomial`` on a CPU generator, and builds ``member [P, M]`` for the dense
  :func:`~pepeseg3d_ns.contrast.dense_reference.sample_pairs` / ``pair_targets`` / ``pixel_weights``
  (:func:`dense_data_path`, a copy of that code);
* ``sets`` (now): the datamanager hands the :class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks` built once per
  image, and the model's own ``get_loss_dict`` runs on it (draws by an exponential race over pixels, ``O(P L)``
  gathers for labels, pair targets and omega).

Inputs: the step benchmark's synthetic view (:func:`pepeseg3d_ns.benchmarks.contrast_step.make_batch`: nested SAM-like
masks, scales by area, smooth depth, random image), generated once per (size, mask count) and stored as the packed
MaskSet and the PixelMasks arrays (what the priors cache holds); random unit features ``[H, W, 32]`` stand in for
the rendered map. The backward runs through the losses into the scale gate; the gradient of the rendered map itself
(a dense ``[H, W, 32]`` in any step, whatever the data path) belongs to the rasterizer's backward and is left out. Model settings are pepe-contrast's defaults (4000 pixels, 16384
pairs, mask-balanced draws, omega weights, Lm + Lp + L2D; the centroid loss is off, as before ``centroid_start``).

Measured per configuration: the median CPU time of the (single-threaded) child over ``repeats`` steps after one
warm-up (``time.process_time``: on a shared machine it counts this process's work only; the median wall time is
reported too), and the peak memory of
a step above what is resident before it (inputs, model), measured on two further steps: glibc's mmap threshold is
then fixed at 64 KiB (``mallopt``) and the free heap trimmed, so that every large block comes from and goes back
to the kernel, and the kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs``) before those steps
and read after them. (The timed steps run with the default allocator: fresh mappings cost page faults.)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from statistics import median
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from pepeseg3d_ns.errors import UserError

__all__ = ["dense_data_path", "sets_data_path", "main_perception_pairs", "run_data_path_bench", "format_markdown", "BenchStep"]


# ----------------------------------------------------------------------------------------------------------------
# the two paths
# ----------------------------------------------------------------------------------------------------------------


def _dense_sample_pixels(model, valid: Tensor, masks: Tensor, areas: Tensor, mask_scales: Tensor,
                         gen: torch.Generator) -> Tensor:
    """``PepeContrastModel._sample_pixels`` as it was before the per-pixel mask sets (``pixel_sampling``)."""
    from pepeseg3d_ns.contrast.dense_reference import mask_balanced_probabilities, pixel_weights

    mode = model.config.pixel_sampling
    idx = torch.nonzero(valid.flatten()).flatten()
    n = min(model.config.num_sample_pixels, idx.numel())
    if mode in ("omega", "mask") and n > 0:
        if mode == "omega":
            member = masks.flatten(1)[:, idx].T  # [P, M]
            w = pixel_weights(member, areas, mask_scales).double().cpu()
        else:
            w = mask_balanced_probabilities(masks, mask_scales, model.config.mask_balance)[idx].cpu()
        if int((w > 0).sum()) >= n:
            pick = torch.multinomial(w, n, replacement=False, generator=gen).to(idx.device)
            return idx[pick]
    perm = torch.randperm(idx.numel(), generator=gen)[:n].to(idx.device)
    return idx[perm]


def main_perception_pairs(image: Tensor, depth_prior: Tensor, pix: Tensor, s: Tensor,
                          generator: Optional[torch.Generator] = None, k_depth: float = 1.0, k_colour: float = 1.0,
                          eps: float = 1e-6):
    """:func:`~pepeseg3d_ns.contrast.perception.perception_pairs` as ``main`` computed it before this change (window
    statistics from 8 float64 integral channels built with full-image temporaries, validation read back), kept as
    the baseline's cost and as the reference the current implementation is tested against."""
    from pepeseg3d_ns.contrast import perception as P
    from pepeseg3d_ns.contrast import sampling as S

    h, w, _ = image.shape
    if not bool(torch.isfinite(depth_prior).all()) or not bool(torch.isfinite(image).all()):
        raise ValueError("non-finite image or depth prior")
    dev = image.device
    pix = S._check_index(pix, h * w, "pix").to(dev)
    s_t = S._broadcast_scale(s, pix.shape[0], dev)
    r = P.radius_px(s_t, h, w).to(dev).clamp(min=1)
    py, px = pix // w, pix % w
    y0, y1 = (py - r).clamp(min=0), (py + r).clamp(max=h - 1)
    x0, x1 = (px - r).clamp(min=0), (px + r).clamp(max=w - 1)
    ww = x1 - x0 + 1
    area = (y1 - y0 + 1) * ww
    u = S._randint_below(area - 1, generator)
    a_idx = (py - y0) * ww + (px - x0)
    u = u + (u >= a_idx).long()
    qy, qx = y0 + u // ww, x0 + u % ww
    q = qy * w + qx
    d = depth_prior.double()
    med = d.flatten().median()
    mad = (d - med).abs().mean()
    d = torch.zeros_like(d) if float(mad) <= 0.0 else (d - med) / mad
    img = image.double()
    chw = img.permute(2, 0, 1)
    feats = torch.cat([d[None], d[None] ** 2, chw, chw**2], dim=0)  # [8, H, W]
    integral = torch.nn.functional.pad(feats.cumsum(2).cumsum(1), (1, 0, 1, 0))
    sums = P._box_sum(integral, y0, y1, x0, x1) / area[:, None].double()
    var_d = (sums[:, 1] - sums[:, 0] ** 2).clamp(min=0)
    var_c = (sums[:, 5:8] - sums[:, 2:5] ** 2).clamp(min=0).sum(1)
    sig_d, sig_c = var_d.sqrt(), var_c.sqrt()
    theta_d, theta_c = k_depth * sig_d, k_colour * sig_c
    dd = (d[py, px] - d[qy, qx]).abs()
    dc = (img[py, px] - img[qy, qx]).norm(dim=-1)
    flat_d, flat_c = sig_d <= eps, sig_c <= eps
    sim = (flat_d | (dd < theta_d)) & (flat_c | (dc < theta_c))
    dis = (~flat_d & (dd > theta_d)) & (~flat_c & (dc > theta_c))
    return P.PerceptionPairs(q=q, sim=sim, dis=dis, radius=r, theta_d=theta_d.float(), theta_c=theta_c.float())


def dense_data_path(model, F: Tensor, inputs: Dict, gen: torch.Generator) -> Tensor:
    """The data path of ``main`` (before the per-pixel mask sets): batch preparation (MaskSet -> dense masks on the
    device), sampling, pair targets, losses. Returns the total loss (call ``backward`` on it)."""
    from pepeseg3d_ns.contrast import losses as L
    from pepeseg3d_ns.contrast import dense_reference as R

    cfg, dev = model.config, model.device
    ms = inputs["maskset"]
    masks = ms.to_torch(dev)  # the datamanager, every step
    areas = torch.from_numpy(ms.areas).to(dev).float()
    H, W, D = F.shape
    mask_scales = model.gate_scales(inputs["mask_scales"].to(dev).float())
    known = torch.isfinite(mask_scales)
    covered = (masks & known[:, None, None]).any(0)
    pix = _dense_sample_pixels(model, covered, masks, areas, mask_scales, gen)
    Fp = F.reshape(-1, D)[pix]
    member = R.membership(masks, pix)
    i, j, s = R.sample_pairs(member, mask_scales, cfg.num_pairs, hard_fraction=cfg.hard_pair_fraction, generator=gen,
                             mask_areas=areas)
    targets = R.pair_targets(member, mask_scales, i, j, s, areas)
    w = R.pixel_weights(member, areas, mask_scales)
    g = model._train_gate(s)
    loss = cfg.lambda_m * L.scale_contrastive_loss(Fp[i] * g, Fp[j] * g, targets["positive"], w[i] * w[j],
                                                   targets["valid"])
    s_p = torch.rand(pix.numel(), generator=gen).to(dev)
    pp = main_perception_pairs(inputs["image"], inputs["depth_prior"][..., 0], pix, s_p, generator=gen)
    g = model._train_gate(s_p)
    loss = loss + cfg.lambda_p * L.perception_loss(Fp * g, F.reshape(-1, D)[pp.q] * g, pp.sim, pp.dis)
    return loss + cfg.lambda_norm * L.norm_regulariser(Fp)


def sets_data_path(model, F: Tensor, inputs: Dict, gen: Optional[torch.Generator] = None) -> Tensor:
    """The data path now: the datamanager's batch (PixelMasks moved to the device) and the model's own
    ``get_loss_dict`` on the stand-in feature map. Returns the total loss."""
    dev = model.device
    batch = {"pixel_masks": inputs["pixel_masks"].to(dev), "mask_scales": inputs["mask_scales"].to(dev),
             "depth_prior": inputs["depth_prior"].to(dev), "image": inputs["image"].to(dev)}
    return sum(model.get_loss_dict({"features": F}, batch).values())


_PATHS = {"dense": dense_data_path, "sets": sets_data_path}


# ----------------------------------------------------------------------------------------------------------------
# inputs on disk (what the priors cache holds), child process
# ----------------------------------------------------------------------------------------------------------------


def write_inputs(folder: Path, resolution: Tuple[int, int], num_masks: int, seed: int = 0) -> Path:
    """Generate the synthetic view of ``make_batch`` and store ``maskset.npz`` (packed masks), ``pixel_masks.npz``
    (:meth:`PixelMasks.to_arrays`) and ``view.npz`` (image, depth prior, mask scales). Returns ``folder``."""
    from pepeseg3d_ns.benchmarks.contrast_step import make_batch
    from pepeseg3d_ns.priors.masks import MaskSet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    b = make_batch(resolution, num_masks=num_masks, seed=seed)
    MaskSet.from_dense(b["sam_masks"]).save(folder / "maskset.npz")
    np.savez(folder / "pixel_masks.npz", **b["pixel_masks"].to_arrays())
    np.savez(folder / "view.npz", image=b["image"].numpy(), depth_prior=b["depth_prior"].numpy(),
             mask_scales=b["mask_scales"].numpy())
    return folder


def _read_inputs(folder: Path, path: str) -> Dict:
    from pepeseg3d_ns.priors.masks import MaskSet
    from pepeseg3d_ns.priors.pixel_masks import PixelMasks

    with np.load(folder / "view.npz") as z:
        out = {k: torch.from_numpy(z[k]) for k in ("image", "depth_prior", "mask_scales")}
    if path == "dense":
        out["maskset"] = MaskSet.load(folder / "maskset.npz")
    else:
        with np.load(folder / "pixel_masks.npz") as z:
            out["pixel_masks"] = PixelMasks.from_arrays({k: z[k] for k in z.files})
    return out


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _worker(cfg: dict) -> dict:
    """One (path, inputs) configuration in this fresh process. Returns the row."""
    import gc

    from pepeseg3d_ns.benchmarks.contrast_step import build_model, make_recon_checkpoint

    torch.set_num_threads(int(cfg["threads"]))
    device = cfg.get("device", "cpu")
    cuda = device.startswith("cuda")
    folder = Path(cfg["inputs"])
    with tempfile.TemporaryDirectory(prefix="pepe_data_bench_") as tmp:
        model, _ = build_model(make_recon_checkpoint(Path(tmp), 64), device=device, centroid_start=10**9,
                               gate_warmup=0)
    inputs = _read_inputs(folder, cfg["path"])  # on the host, as the datamanager holds them
    H, W = inputs["image"].shape[:2]
    g = torch.Generator().manual_seed(1)
    F = torch.nn.functional.normalize(torch.randn(H, W, model.config.feature_dim, generator=g), dim=-1).to(device)
    fn = _PATHS[cfg["path"]]
    gen = torch.Generator().manual_seed(0)  # the dense path draws on the host, as it did

    def step() -> Tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn(model, F, inputs, gen)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        model.zero_grad(set_to_none=True)
        return c, t

    step()  # warm-up (lazy imports, first allocations, CUDA kernels)
    runs = [step() for _ in range(int(cfg["repeats"]))]

    timed = [t for _, t in runs] if cuda else [c for c, _ in runs]  # wall time on CUDA, CPU time on the CPU
    row = {**cfg, "height": int(H), "width": int(W), "step_s": median(timed), "wall_s": median([t for _, t in runs]),
           "min_s": min(timed), "loadavg": list(os.getloadavg())}
    if cuda:  # the device allocator's peak above what the model and feature map already hold
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        return {**row, "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "resident_mib": base / 2**20}
    # memory: every block above 64 KiB mapped and unmapped on its own, the free heap returned, the peak reset
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also stops glibc's dynamic threshold)
    libc.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    base = _proc_status("VmRSS")
    step()
    step()
    peak = _proc_status("VmHWM") - base
    return {**row, "peak_mib": peak / 2**20, "resident_mib": base / 2**20}


def _run_child(cfg: dict, timeout: float) -> dict:
    """Run :func:`_worker` in a fresh interpreter (:func:`pepeseg3d_ns.benchmarks.run_worker_process`)."""
    from pepeseg3d_ns.benchmarks import run_worker_process

    return run_worker_process("contrast_data", cfg, timeout)


# ----------------------------------------------------------------------------------------------------------------
# runner, table, CLI
# ----------------------------------------------------------------------------------------------------------------


def run_data_path_bench(
    resolutions: Sequence[Tuple[int, int]] = ((256, 256), (512, 512), (756, 1008)),
    num_masks: Sequence[int] = (50, 150, 300),
    paths: Sequence[str] = ("dense", "sets"),
    repeats: int = 5,
    threads: int = 1,
    timeout: float = 1200.0,
    log: bool = True,
    device: str = "cpu",
) -> List[Dict]:
    """Time and peak memory of the data path for every (resolution ``(H, W)``, mask count, path), each in a fresh
    process on ``device`` (``"cpu"`` or ``"cuda"``; the inputs start on the host, as the datamanager holds them).
    Rows: ``path``, ``device``, ``height``, ``width``, ``num_masks``, ``step_s`` (median CPU time on the CPU, median
    wall time with the device synchronised on CUDA), ``wall_s`` (median wall time), ``min_s``, ``peak_mib`` (a
    step's peak above the resident inputs and model: resident set size on the CPU, the allocator's peak on CUDA),
    ``resident_mib``, or ``error``."""
    for p in paths:
        if p not in _PATHS:
            raise ValueError(f"paths must be among {sorted(_PATHS)}, got {p!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pepe_data_bench_inputs_") as tmp:
        for H, W in resolutions:
            for m in num_masks:
                folder = write_inputs(Path(tmp) / f"{H}x{W}_{m}", (int(H), int(W)), int(m))
                for p in paths:
                    cfg = {"path": p, "inputs": str(folder), "num_masks": int(m), "repeats": int(repeats),
                           "threads": int(threads), "device": device}
                    row = _run_child(cfg, timeout)
                    row.setdefault("height", int(H))
                    row.setdefault("width", int(W))
                    row.pop("inputs", None)
                    rows.append(row)
                    if log:
                        msg = row.get("error") or f"{row['step_s'] * 1e3:8.1f} ms  peak +{row['peak_mib']:7.1f} MiB"
                        print(f"{W}x{H} M={m:<4d} {p:<6s} {msg}", file=sys.stderr, flush=True)
    return rows


def sets_breakdown(resolution: Tuple[int, int] = (756, 1008), num_masks: int = 300, repeats: int = 5,
                   threads: int = 1) -> Dict[str, float]:
    """Median CPU seconds of each part of the ``sets`` path in this process (the same calls as the model's
    ``get_loss_dict``, one after another): ``draw weights``, ``pixel draw`` (O(H W)), ``sampled masks``,
    ``pairs + targets``, ``Lm``, ``perception pairs`` (O(H W) integral images), ``Lp + L2D``, ``backward``."""
    from pepeseg3d_ns.contrast import losses as L
    from pepeseg3d_ns.contrast import perception as P
    from pepeseg3d_ns.contrast import sampling as S
    from pepeseg3d_ns.benchmarks.contrast_step import build_model, make_recon_checkpoint

    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix="pepe_data_bench_") as tmp:
        folder = write_inputs(Path(tmp) / "in", resolution, num_masks)
        inputs = _read_inputs(folder, "sets")
        model, _ = build_model(make_recon_checkpoint(Path(tmp) / "ckpt", 64), centroid_start=10**9, gate_warmup=0)
    cfg = model.config
    pm, H, W = inputs["pixel_masks"], resolution[0], resolution[1]
    F = torch.nn.functional.normalize(torch.randn(H, W, cfg.feature_dim, generator=torch.Generator().manual_seed(1)),
                                      dim=-1)
    gen = torch.Generator().manual_seed(0)
    parts: Dict[str, List[float]] = {}

    def once() -> None:
        clock = [time.process_time()]

        def tick(name: str) -> None:
            now = time.process_time()
            parts.setdefault(name, []).append(now - clock[0])
            clock[0] = now

        scales = model.gate_scales(inputs["mask_scales"].float())
        w = S.set_draw_weights(pm, scales, cfg.pixel_sampling, cfg.mask_balance)
        tick("draw weights")
        pix, ok = S.draw_pixels(pm, w, cfg.num_sample_pixels, gen)
        tick("pixel draw")
        sm = S.gather_sampled(pm, pix, scales)
        tick("sampled masks")
        i, j, s, t = S.set_sample_pairs(pm, sm, cfg.num_pairs, cfg.hard_pair_fraction, generator=gen)
        tick("pairs + targets")
        om, Fp = S.set_pixel_weights(sm), F.reshape(-1, cfg.feature_dim)[pix]
        g = model._train_gate(s)
        lm = L.scale_contrastive_loss(Fp[i] * g, Fp[j] * g, t["positive"], om[i] * om[j], t["valid"], check=False)
        tick("Lm")
        s_p = torch.rand(pix.numel(), generator=gen)
        pp = P._perception_pairs(inputs["image"], inputs["depth_prior"][..., 0], pix, s_p, generator=gen)
        tick("perception pairs")
        gp = model._train_gate(s_p)
        lp = L.perception_loss(Fp * gp, F.reshape(-1, cfg.feature_dim)[pp.q] * gp, pp.sim & ok, pp.dis & ok)
        loss = lm + cfg.lambda_p * lp + L.norm_regulariser(Fp, ok)
        tick("Lp + L2D")
        loss.backward()
        model.zero_grad(set_to_none=True)
        tick("backward")

    once()
    for _ in range(int(repeats)):
        once()
    return {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in parts.items()}


def format_markdown(rows: Sequence[Dict]) -> str:
    """One line per (image size, masks): both paths' time and peak memory, and the ratios."""
    if not rows:
        raise ValueError("format_markdown needs at least one row")
    by = {}
    for r in rows:
        by.setdefault((r["width"], r["height"], r["num_masks"]), {})[r["path"]] = r

    def cell(r, key, fmt):
        return "error" if r is None or "error" in r else fmt.format(r[key] * (1e3 if key == "step_s" else 1))

    unit = "CPU ms" if all(r.get("device", "cpu") == "cpu" for r in rows) else "ms"
    lines = [f"| image (W×H) | masks | dense {unit} | sets {unit} | dense peak MiB | sets peak MiB | time ratio | "
             "memory ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (w, h, m), d in by.items():
        a, b = d.get("dense"), d.get("sets")
        ok = a is not None and b is not None and "error" not in a and "error" not in b
        lines.append(f"| {w}×{h} | {m} | {cell(a, 'step_s', '{:.1f}')} | {cell(b, 'step_s', '{:.1f}')} | "
                     f"{cell(a, 'peak_mib', '{:.0f}')} | {cell(b, 'peak_mib', '{:.1f}')} | "
                     + (f"{a['step_s'] / b['step_s']:.1f}× | {a['peak_mib'] / max(b['peak_mib'], 0.1):.0f}× |" if ok
                        else "– | – |"))
    return "\n".join(lines) + "\n"


@dataclass
class BenchStep:
    """Time and peak memory of a pepe-contrast step's data path alone (batch preparation, pixel sampling, pair
    targets, losses and their backward; no rendering), dense masks (before) against per-pixel mask sets (now)."""

    resolutions: Tuple[str, ...] = ("256x256", "512x512", "1008x756")
    """Image sizes, WxH."""
    num_masks: Tuple[int, ...] = (50, 150, 300)
    """SAM masks per view."""
    paths: Tuple[str, ...] = ("dense", "sets")
    """Which data paths to run: "dense" (before), "sets" (now)."""
    repeats: int = 5
    """Timed steps per configuration; the median is reported."""
    threads: int = 1
    """Torch/OpenMP threads of each child process."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the model, feature map and step run; the inputs start on the host, as the datamanager holds them."""
    output: Optional[Path] = None
    """Also write the markdown table here."""
    json_output: Optional[Path] = None
    """Also write the raw rows as JSON here."""
    breakdown: bool = False
    """Instead: time each part of the "sets" path in this process at the first resolution and the last mask count."""

    def main(self) -> None:
        from pepeseg3d_ns.benchmarks import parse_sizes

        res = parse_sizes("--resolutions", self.resolutions)
        if self.breakdown and self.device != "cpu":
            raise UserError("--breakdown times the parts of the step on the CPU only; drop --device")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; run with --device cpu")
        if self.breakdown:
            parts = sets_breakdown(res[0], self.num_masks[-1], self.repeats, self.threads)
            h, w = res[0]
            print(f"sets path, {w}x{h}, {self.num_masks[-1]} masks: median CPU ms per part")
            print("| part | ms |\n|---|---:|")
            for k, v in parts.items():
                print(f"| {k} | {v * 1e3:.1f} |")
            print(f"| total | {sum(parts.values()) * 1e3:.1f} |")
            return
        rows = run_data_path_bench(res, self.num_masks, self.paths, self.repeats, self.threads, device=self.device)
        md = format_markdown(rows)
        print(md)
        if self.output is not None:
            Path(self.output).write_text(md)
        if self.json_output is not None:
            Path(self.json_output).write_text(json.dumps(rows, indent=1))
