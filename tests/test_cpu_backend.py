"""Tests of the C++ CPU compositing kernel (pepeseg3d_ns.render.cpu_backend) against brute-force references."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from pepeseg3d_ns.render import cpu_backend

_AVAILABLE = cpu_backend.is_available()  # compiles on first use (cached afterwards)
_TOOLCHAIN = shutil.which("ninja") is not None and any(
    shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")
)
needs_ext = pytest.mark.skipif(not _AVAILABLE, reason="C++ CPU rasterizer could not be built")


@pytest.mark.skipif(not _TOOLCHAIN, reason="no C++ compiler / ninja on this machine")
def test_extension_builds():
    ops = cpu_backend.load_extension()  # raises with the compiler's message if the build is broken
    assert hasattr(ops, "rasterize_fwd") and hasattr(ops, "rasterize_bwd")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: random projected Gaussians and their tile intersection lists


def random_gaussians(C, N, width, height, D, seed, radii=(1.0, 8.0), opacity=(0.05, 1.0), dtype=torch.float32):
    """Random 2D Gaussians: means in (a little around) the image, SPD covariances whose 3-sigma radii lie in
    ``radii`` px, random depths, opacities and colours."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    means2d = rand(C, N, 2) * torch.tensor([width + 4.0, height + 4.0], dtype=torch.float64) - 2.0
    std = (radii[0] + (radii[1] - radii[0]) * rand(C, N, 2)) / 3.0
    theta = rand(C, N) * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [C, N, 2, 2]
    cov = rot @ torch.diag_embed(std**2) @ rot.transpose(-1, -2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1)
    radius = torch.ceil(3.0 * torch.sqrt(torch.linalg.eigvalsh(cov)[..., -1]))
    depths = rand(C, N)
    opacities = opacity[0] + (opacity[1] - opacity[0]) * rand(C, N)
    colors = rand(C, N, D)
    return dict(
        means2d=means2d.to(dtype), conics=conics.to(dtype), colors=colors.to(dtype), opacities=opacities.to(dtype),
        radius=radius, depths=depths,
    )


def tile_lists(means2d, radius, depths, width, height, tile_size):
    """(isect_offsets [C, th, tw] int32, flatten_ids [M] int32): every Gaussian is listed in each tile its
    3-sigma box touches, each tile's list sorted by depth (front first)."""
    C, N = means2d.shape[:2]
    th, tw = -(-height // tile_size), -(-width // tile_size)
    m = means2d.detach().double()
    r = radius.double()[..., None]
    lo = torch.floor((m - r) / tile_size).long()
    hi = torch.ceil((m + r) / tile_size).long()
    lo = torch.stack([lo[..., 0].clamp(0, tw), lo[..., 1].clamp(0, th)], -1)
    hi = torch.stack([hi[..., 0].clamp(0, tw), hi[..., 1].clamp(0, th)], -1)
    ext = (hi - lo).clamp(min=0)
    count = (ext[..., 0] * ext[..., 1]).reshape(-1)  # [C*N]
    M = int(count.sum())
    owner = torch.repeat_interleave(torch.arange(C * N), count)
    first = torch.cumsum(count, 0) - count
    local = torch.arange(M) - first[owner]
    ex = ext.reshape(-1, 2)[owner]
    lo_f = lo.reshape(-1, 2)[owner]
    tx = lo_f[:, 0] + local % ex[:, 0].clamp(min=1)
    ty = lo_f[:, 1] + local // ex[:, 0].clamp(min=1)
    cam = owner // N
    depth_rank = torch.argsort(torch.argsort(depths.reshape(-1)))  # global depth order
    key = ((cam * th * tw + ty * tw + tx) << 32) | depth_rank[owner]
    order = torch.argsort(key)
    flatten_ids = owner[order].int()
    tile_key = (cam * th * tw + ty * tw + tx)[order]
    counts = torch.bincount(tile_key, minlength=C * th * tw)
    offsets = (torch.cumsum(counts, 0) - counts).reshape(C, th, tw).int()
    return offsets, flatten_ids


def make_case(C=2, N=200, width=37, height=29, D=3, tile_size=16, seed=0, background=True, **kw):
    s = random_gaussians(C, N, width, height, D, seed, **kw)
    offsets, flat = tile_lists(s["means2d"], s["radius"], s["depths"], width, height, tile_size)
    g = torch.Generator().manual_seed(seed + 1)
    bg = torch.rand(C, D, generator=g, dtype=s["colors"].dtype) if background else None
    return dict(
        means2d=s["means2d"], conics=s["conics"], colors=s["colors"], opacities=s["opacities"],
        image_width=width, image_height=height, tile_size=tile_size, isect_offsets=offsets, flatten_ids=flat,
        backgrounds=bg,
    )


# ---------------------------------------------------------------------------------------------------------------
# Brute-force reference: per tile, the tile's pixels walk its list front to back (float64, autograd-able)


def reference(means2d, conics, colors, opacities, image_width, image_height, tile_size, isect_offsets,
              flatten_ids, backgrounds=None):
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    th, tw = isect_offsets.shape[1:]
    H, W = image_height, image_width
    m = means2d.reshape(-1, 2)
    q = conics.reshape(-1, 3)
    col = colors.reshape(-1, D)
    op = opacities.reshape(-1)
    offs = isect_offsets.reshape(-1).tolist() + [flatten_ids.numel()]
    flat = flatten_ids.tolist()
    out_c = torch.zeros(C, H, W, D, dtype=means2d.dtype)
    out_a = torch.zeros(C, H, W, 1, dtype=means2d.dtype)
    for c in range(C):
        for ty in range(th):
            for tx in range(tw):
                ys, xs = torch.meshgrid(
                    torch.arange(ty * tile_size, min((ty + 1) * tile_size, H)),
                    torch.arange(tx * tile_size, min((tx + 1) * tile_size, W)), indexing="ij",
                )
                ys, xs = ys.reshape(-1), xs.reshape(-1)
                if ys.numel() == 0:
                    continue
                px, py = xs.to(means2d.dtype) + 0.5, ys.to(means2d.dtype) + 0.5
                T = torch.ones(ys.numel(), dtype=means2d.dtype)
                acc = torch.zeros(ys.numel(), D, dtype=means2d.dtype)
                done = torch.zeros(ys.numel(), dtype=torch.bool)
                t = (c * th + ty) * tw + tx
                for idx in range(offs[t], offs[t + 1]):
                    g = flat[idx]
                    dx, dy = m[g, 0] - px, m[g, 1] - py
                    sigma = 0.5 * (q[g, 0] * dx * dx + q[g, 2] * dy * dy) + q[g, 1] * dx * dy
                    alpha = torch.clamp(op[g] * torch.exp(-sigma), max=0.999)
                    ok = (~done) & (sigma.detach() >= 0) & (alpha.detach() >= 1.0 / 255.0)
                    next_T = T * (1.0 - alpha)
                    stop = ok & (next_T.detach() <= 1e-4)
                    done = done | stop
                    use = ok & ~stop
                    acc = acc + torch.where(use, alpha * T, torch.zeros_like(T))[:, None] * col[g]
                    T = torch.where(use, next_T, T)
                rgb = acc if backgrounds is None else acc + T[:, None] * backgrounds[c]
                out_c[c, ys, xs] = rgb
                out_a[c, ys, xs, 0] = 1.0 - T
    return out_c, out_a


DIFF_KEYS = ("means2d", "conics", "colors", "opacities", "backgrounds")


def run_both(case, seed=0):
    """Forward + backward (random cotangents on colours and alphas) of the kernel (float32) and the
    float64 reference. Returns (ours, ref) dicts with outputs and input gradients."""
    g = torch.Generator().manual_seed(seed + 7)
    C, H, W = case["means2d"].shape[0], case["image_height"], case["image_width"]
    D = case["colors"].shape[-1]
    v_c = torch.randn(C, H, W, D, generator=g, dtype=torch.float64)
    v_a = torch.randn(C, H, W, 1, generator=g, dtype=torch.float64)
    results = []
    for fn, dtype in ((cpu_backend.rasterize_to_pixels_cpu, torch.float32), (reference, torch.float64)):
        args = dict(case)
        leaves = {}
        for k in DIFF_KEYS:
            if args[k] is not None:
                leaves[k] = args[k].detach().to(dtype).requires_grad_(True)
                args[k] = leaves[k]
        rc, ra = fn(**args)
        ((rc.double() * v_c).sum() + (ra.double() * v_a).sum()).backward()
        res = {"colors_out": rc.detach().double(), "alphas_out": ra.detach().double()}
        res.update({f"grad_{k}": v.grad.double() for k, v in leaves.items()})
        results.append(res)
    return results


def assert_close_rel(a, b, rel, name):
    scale = b.abs().max().item() + 1e-12
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("D", [1, 3, 32])
@pytest.mark.parametrize("background", [True, False])
def test_forward_matches_reference(D, background):
    case = make_case(D=D, background=background, seed=D + 10 * background)
    assert case["flatten_ids"].numel() > 0
    rc, ra = cpu_backend.rasterize_to_pixels_cpu(**case)
    assert rc.shape == (2, 29, 37, D) and ra.shape == (2, 29, 37, 1)
    assert rc.dtype == torch.float32 and ra.dtype == torch.float32
    ref_case = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in case.items()}
    with torch.no_grad():
        rc_ref, ra_ref = reference(**ref_case)
    assert (ra_ref > 0.5).float().mean() > 0.5  # the scene actually covers the image
    torch.testing.assert_close(rc.double(), rc_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ra.double(), ra_ref, atol=1e-5, rtol=0)


@needs_ext
@pytest.mark.parametrize("D,background", [(1, False), (3, True), (32, True), (33, False)])
def test_backward_matches_autograd_reference(D, background):
    case = make_case(D=D, background=background, seed=100 + D)
    ours, ref = run_both(case)
    torch.testing.assert_close(ours["colors_out"], ref["colors_out"], atol=1e-5, rtol=0)
    keys = [k for k in DIFF_KEYS if case[k] is not None]
    assert set(f"grad_{k}" for k in keys) <= set(ours)
    for k in keys:
        assert ref[f"grad_{k}"].abs().max() > 0, k
        assert_close_rel(ours[f"grad_{k}"], ref[f"grad_{k}"], 1e-4, k)


@needs_ext
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_thin_gaussians_float32_reference(seed):
    # Very anisotropic conics (condition number up to ~1e4): the per-Gaussian pixel box the kernel visits must
    # still cover every pixel with alpha >= 1/255. A float32 reference takes the same threshold decisions as
    # the kernel, so the two agree to rounding.
    case = make_case(C=2, N=300, D=3, seed=seed, radii=(0.1, 40.0))
    q = case["conics"].double()
    assert (q[..., 0] * q[..., 2] / (q[..., 0] * q[..., 2] - q[..., 1] ** 2)).max() > 1e3
    rc, ra = cpu_backend.rasterize_to_pixels_cpu(**case)
    with torch.no_grad():
        rc_ref, ra_ref = reference(**case)
    torch.testing.assert_close(rc, rc_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ra, ra_ref, atol=1e-5, rtol=0)


@needs_ext
def test_gradcheck_float64():
    case = make_case(C=2, N=5, width=8, height=8, D=2, tile_size=4, seed=3, radii=(2.0, 6.0), opacity=(0.2, 0.8),
                     dtype=torch.float64)
    assert case["flatten_ids"].numel() > 0
    fixed = {k: v for k, v in case.items() if k not in DIFF_KEYS}
    inputs = tuple(case[k].detach().clone().requires_grad_(True) for k in DIFF_KEYS)

    def fn(means2d, conics, colors, opacities, backgrounds):
        return cpu_backend.rasterize_to_pixels_cpu(means2d, conics, colors, opacities, backgrounds=backgrounds,
                                                   **fixed)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_ext
def test_empty_intersections_give_background_and_zero_grads():
    case = make_case(N=6, D=3, seed=5)
    case["isect_offsets"] = torch.zeros_like(case["isect_offsets"])
    case["flatten_ids"] = torch.zeros(0, dtype=torch.int32)
    leaves = {k: case[k].clone().requires_grad_(True) for k in DIFF_KEYS}
    rc, ra = cpu_backend.rasterize_to_pixels_cpu(**{**case, **leaves})
    bg = case["backgrounds"]
    assert torch.equal(rc, bg[:, None, None, :].expand_as(rc))
    assert torch.equal(ra, torch.zeros_like(ra))
    v = torch.randn_like(rc)
    (rc * v).sum().add(ra.sum()).backward()
    for k in ("means2d", "conics", "colors", "opacities"):
        assert torch.equal(leaves[k].grad, torch.zeros_like(leaves[k].grad)), k
    torch.testing.assert_close(leaves["backgrounds"].grad, v.sum((1, 2)), atol=1e-5, rtol=1e-6)


@needs_ext
def test_saturation_cutoff_matches_reference():
    # Opaque Gaussians stacked on one spot: T falls below 1e-4 and the later ones must be excluded; opacities
    # above 1 hit the 0.999 clamp (no gradient through it).
    C, N, W, H = 1, 6, 12, 10
    means2d = torch.tensor([[[6.0, 5.0]] * N]) + 0.3 * torch.randn(1, N, 2, generator=torch.Generator().manual_seed(0))
    conics = torch.tensor([[[0.01, 0.002, 0.012]] * N])  # wide: the 5.0 one is clamped wherever it is used
    opacities = torch.tensor([[0.99, 5.0, 0.97, 0.995, 0.9, 0.98]])
    colors = torch.rand(C, N, 4, generator=torch.Generator().manual_seed(1))
    case = dict(means2d=means2d, conics=conics, colors=colors, opacities=opacities, image_width=W, image_height=H,
                tile_size=8, backgrounds=torch.tensor([[0.2, 0.4, 0.6, 0.8]]))
    radius = torch.full((C, N), 20.0)
    case["isect_offsets"], case["flatten_ids"] = tile_lists(means2d, radius, torch.arange(N).double()[None],
                                                            W, H, 8)
    ours, ref = run_both(case)
    assert ref["alphas_out"].max() > 1 - 1e-3  # saturated somewhere
    torch.testing.assert_close(ours["colors_out"], ref["colors_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["alphas_out"], ref["alphas_out"], atol=1e-5, rtol=0)
    for k in DIFF_KEYS:
        assert_close_rel(ours[f"grad_{k}"], ref[f"grad_{k}"], 1e-4, k)
    assert ours["grad_opacities"][0, 1] == 0  # clamped at 0.999 everywhere it is used -> no gradient
    assert ours["grad_colors"][0, 5].abs().max() == 0  # hidden behind the cut-off


@needs_ext
@pytest.mark.parametrize("D", [3, 5, 32])  # channel-major (D <= 4), pixel-major, and the D = 32 specialisation
def test_deterministic_and_thread_independent(D):
    case = make_case(C=2, N=4000, width=128, height=96, D=D, seed=11)  # big enough to run multi-threaded
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (old, old, 1, 3):
            torch.set_num_threads(threads)
            leaves = {k: case[k].clone().requires_grad_(True) for k in DIFF_KEYS}
            rc, ra = cpu_backend.rasterize_to_pixels_cpu(**{**case, **leaves}, absgrad=True)
            (rc.sin().sum() + ra.cos().sum()).backward()
            outs.append([rc, ra, leaves["means2d"].absgrad] + [leaves[k].grad for k in DIFF_KEYS])
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_ext
def test_absgrad():
    case = make_case(D=3, seed=21)
    means = case["means2d"].clone().requires_grad_(True)
    rc, ra = cpu_backend.rasterize_to_pixels_cpu(**{**case, "means2d": means}, absgrad=True)
    (rc * torch.randn_like(rc)).sum().backward()
    assert means.absgrad.shape == means.shape
    assert (means.absgrad >= means.grad.abs() - 1e-6).all()
    assert (means.absgrad > means.grad.abs() + 1e-6).any()
    # a single pixel: sum of |per-pixel gradient| is |gradient|
    one = make_case(C=1, N=10, width=1, height=1, D=3, seed=22, radii=(4.0, 8.0))
    means = one["means2d"].clone().requires_grad_(True)
    rc, _ = cpu_backend.rasterize_to_pixels_cpu(**{**one, "means2d": means}, absgrad=True)
    rc.sum().backward()
    assert means.grad.abs().max() > 0
    torch.testing.assert_close(means.absgrad, means.grad.abs())


@needs_ext
def test_noncontiguous_and_int64_inputs():
    case = make_case(D=4, seed=31)
    base = cpu_backend.rasterize_to_pixels_cpu(**case)
    nc = dict(case)
    nc["colors"] = case["colors"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not nc["colors"].is_contiguous()
    nc["flatten_ids"] = case["flatten_ids"].long()
    nc["isect_offsets"] = case["isect_offsets"].long()
    for a, b in zip(base, cpu_backend.rasterize_to_pixels_cpu(**nc)):
        assert torch.equal(a, b)


@needs_ext
def test_input_validation():
    case = make_case(N=4, D=3, seed=41)
    with pytest.raises(ValueError, match="float32"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "means2d": case["means2d"].half()})
    with pytest.raises(ValueError, match="conics"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "conics": case["conics"].double()})
    with pytest.raises(ValueError, match="shape"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "opacities": case["opacities"][..., None]})
    with pytest.raises(ValueError, match="backgrounds"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "backgrounds": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="cover"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "image_width": 100})
    with pytest.raises(ValueError, match="int32"):
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "flatten_ids": case["flatten_ids"].float()})
    with pytest.raises(RuntimeError, match="flatten_ids out of range"):
        bad = case["flatten_ids"].clone()
        bad[0] = 10_000
        cpu_backend.rasterize_to_pixels_cpu(**{**case, "flatten_ids": bad})


def _refusing_compiler(tmp_path, when_compiling_only):
    """A C++ compiler wrapper that rejects -march=native (always, or only when compiling a source file)."""
    real = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    need_c = 'case " $* " in *" -c "*) ;; *) exec "$REAL" "$@";; esac\n' if when_compiling_only else ""
    script = tmp_path / "refusing-c++"
    script.write_text(
        "#!/bin/sh\n"
        f'REAL="{real}"\n'
        'case " $* " in *" -march=native "*) ;; *) exec "$REAL" "$@";; esac\n'
        + need_c
        + 'echo "error: -march=native not supported here" >&2\nexit 1\n'
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not _TOOLCHAIN, reason="no C++ compiler / ninja on this machine")
def test_native_target_and_variant_names(tmp_path, monkeypatch):
    target = cpu_backend._native_target()
    assert target is not None and any(m in target for m in ("__x86_64__", "__aarch64__", "__arm64__"))
    flags, ld = ["-O3", "-march=native"], ["-fopenmp"]
    names = {
        cpu_backend._variant_name("native", flags, ld, target),
        cpu_backend._variant_name("native", flags, ld, target.replace("__x86_64__", "__other_cpu__") + "\n#x"),
        cpu_backend._variant_name("native", flags + ["-fopenmp"], ld, target),
        cpu_backend._variant_name("portable", ["-O3"], ld),
    }
    assert len(names) == 4  # another CPU target or another flag set never reuses a build
    assert cpu_backend._variant_name("native", flags, ld, target) == cpu_backend._variant_name(
        "native", list(flags), list(ld), target)
    monkeypatch.setenv("CXX", _refusing_compiler(tmp_path, when_compiling_only=False))
    assert cpu_backend._native_target() is None  # a compiler that refuses -march=native: portable flags


@needs_ext
def test_loaded_variant_is_cached_under_its_own_name():
    tag, name, cflags = cpu_backend.loaded_variant()
    assert tag in ("native", "portable", "native_serial", "serial")
    assert ("-march=native" in cflags) == tag.startswith("native") and "-ffp-contract=off" in cflags
    assert os.path.isdir(os.path.join(cpu_backend.extension_build_dir(), name))


_DUMP = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_cpu_backend import outputs_for_build_comparison
from pepeseg3d_ns.render import cpu_backend
out = outputs_for_build_comparison()
torch.save({"variant": cpu_backend.loaded_variant()[0], "out": out}, sys.argv[1])
"""


def outputs_for_build_comparison():
    """Outputs and gradients (float32 and float64; channel-major and pixel-major paths) to compare builds."""
    res = []
    for dtype, D in ((torch.float32, 3), (torch.float32, 32), (torch.float32, 7), (torch.float64, 3)):
        case = make_case(C=1, N=1500, width=70, height=50, D=D, seed=60 + D, dtype=dtype)
        leaves = {k: case[k].clone().requires_grad_(True) for k in DIFF_KEYS}
        rc, ra = cpu_backend.rasterize_to_pixels_cpu(**{**case, **leaves}, absgrad=True)
        (rc.sin().sum() + ra.cos().sum()).backward()
        res.append([rc.detach(), ra.detach(), leaves["means2d"].absgrad] + [leaves[k].grad for k in DIFF_KEYS])
    return res


@needs_ext
@pytest.mark.slow
def test_portable_fallback_builds_and_is_bitwise_equal(tmp_path):
    # A compiler that accepts -march=native for the target query but fails to compile with it: the loader
    # falls back to the portable flags, and that build computes bitwise what this process's build computes
    # (no FMA contraction, fixed lane count: the vector width of the target does not change any rounding).
    env = dict(os.environ, CXX=_refusing_compiler(tmp_path, when_compiling_only=True),
               PEPESEG3D_EXT_DIR=str(tmp_path / "ext"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cpu_backend.__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    dump = tmp_path / "portable.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _DUMP, str(dump), tests_dir], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    other = torch.load(dump)
    assert other["variant"] == "portable"
    mine = outputs_for_build_comparison()
    for a_case, b_case in zip(mine, other["out"]):
        for a, b in zip(a_case, b_case):
            assert torch.equal(a, b)


@needs_ext
def test_cached_build_is_reused_by_a_new_process():
    """A second process loads the build the first one made: no file of the build folder is rewritten or added
    (load times are measured by bench-render, docs/benchmarks.md, not asserted here)."""
    from pathlib import Path

    cpu_backend.load_extension()
    build = Path(cpu_backend.extension_build_dir())
    before = {p: p.stat().st_mtime_ns for p in build.rglob("*") if p.is_file()}
    assert any(p.suffix == ".so" for p in before)  # the baseline: a compiled build is there
    code = "from pepeseg3d_ns.render import cpu_backend; cpu_backend.load_extension(); print(cpu_backend.is_available())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cpu_backend.__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stderr
    after = {p: p.stat().st_mtime_ns for p in build.rglob("*") if p.is_file()}
    assert after == before


@needs_ext
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for gsplat's kernel")
def test_matches_gsplat_cuda():
    from gsplat import rasterize_to_pixels

    case = make_case(D=3, seed=51)
    ours, _ = run_both(case, seed=51)
    g = torch.Generator().manual_seed(51 + 7)
    C, H, W = 2, case["image_height"], case["image_width"]
    v_c = torch.randn(C, H, W, 3, generator=g, dtype=torch.float64).float().cuda()
    v_a = torch.randn(C, H, W, 1, generator=g, dtype=torch.float64).float().cuda()
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    leaves = {k: args[k].detach().clone().requires_grad_(True) for k in DIFF_KEYS}
    args.update(leaves)
    rc, ra = rasterize_to_pixels(**args)
    ((rc * v_c).sum() + (ra * v_a).sum()).backward()
    torch.testing.assert_close(rc.double().cpu(), ours["colors_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ra.double().cpu(), ours["alphas_out"], atol=1e-4, rtol=0)
    for k in DIFF_KEYS:
        assert_close_rel(leaves[k].grad.double().cpu(), ours[f"grad_{k}"], 1e-3, k)
