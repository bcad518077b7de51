"""rasterize(): projection, tile lists, compositing and gradients on CPU; CPU vs gsplat on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.render import c2w_from_viewmat, isect_tiles, project_gaussians, rasterize, viewmat_from_c2w
from pepeseg3d_ns.render.rasterize import cpu_backend_name

BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("PEPESEG3D_CPU_BACKEND", request.param)
    return request.param


def small_scene(n=40, d=3, seed=0, dtype=torch.float32, width=37, height=29):
    """Gaussians 2-4 units in front of two cameras looking down +z (OpenCV)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([(torch.rand(n, 2, generator=g) * 2 - 1) * 0.8, 2 + 2 * torch.rand(n, 1, generator=g)], 1)
    f = 40.0
    K = torch.tensor([[f, 0, width / 2], [0, f * 1.1, height / 2 - 1], [0, 0, 1.0]])
    view2 = torch.eye(4)
    ang = 0.15
    view2[:3, :3] = torch.tensor([[math.cos(ang), 0, math.sin(ang)], [0, 1, 0], [-math.sin(ang), 0, math.cos(ang)]])
    view2[0, 3] = 0.2
    scene = dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.exp(torch.empty(n, 3).uniform_(-3.5, -2.0, generator=g)),
        opacities=0.2 + 0.75 * torch.rand(n, generator=g),
        colors=torch.rand(n, d, generator=g),
        viewmats=torch.stack([torch.eye(4), view2]),
        Ks=torch.stack([K, K]),
    )
    return {k: v.to(dtype) for k, v in scene.items()}, width, height


def brute_force_render(scene, width, height, backgrounds=None):
    """Per-pixel reference: every Gaussian with radius > 0, sorted by depth, composited with gsplat's rules,
    no tiles. Returns colors [C, H, W, D], alphas [C, H, W, 1] (float64)."""
    radii, means2d, depths, conics, _ = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], width, height
    )
    C = scene["viewmats"].shape[0]
    D = scene["colors"].shape[-1]
    out = torch.zeros(C, height, width, D, dtype=torch.float64)
    alphas = torch.zeros(C, height, width, 1, dtype=torch.float64)
    for c in range(C):
        # which Gaussians a pixel may see: those whose tile-rect (3-sigma box rounded out to tiles) covers it
        order = torch.argsort(depths[c])
        for y in range(height):
            for x in range(width):
                T, acc = 1.0, torch.zeros(D, dtype=torch.float64)
                tx, ty = x // 16, y // 16
                for n in order.tolist():
                    r = int(radii[c, n])
                    if r <= 0:
                        continue
                    mx, my = means2d[c, n].tolist()
                    if not (math.floor((mx - r) / 16) <= tx < math.ceil((mx + r) / 16)):
                        continue
                    if not (math.floor((my - r) / 16) <= ty < math.ceil((my + r) / 16)):
                        continue
                    a, b, cc = conics[c, n].double().tolist()
                    dx, dy = mx - (x + 0.5), my - (y + 0.5)
                    sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                    alpha = min(0.999, float(scene["opacities"][n]) * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        break
                    acc += scene["colors"][n].double() * alpha * T
                    T *= 1 - alpha
                if backgrounds is not None:
                    acc += T * backgrounds[c].double()
                out[c, y, x] = acc
                alphas[c, y, x, 0] = 1 - T
    return out, alphas


def test_camera_conversion_round_trip():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    from pepeseg3d_ns.render.rasterize import quat_to_rotmat

    c2w = torch.cat([quat_to_rotmat(q), torch.randn(5, 3, 1, generator=g)], dim=-1)
    vm = viewmat_from_c2w(c2w)
    assert torch.allclose(c2w_from_viewmat(vm), c2w, atol=1e-6)
    # An OpenGL camera at the origin looking down -z sees a point at z=-2 straight ahead, at OpenCV depth +2.
    eye = torch.eye(4)[None, :3]
    p = viewmat_from_c2w(eye)[0] @ torch.tensor([0.0, 1.0, -2.0, 1.0])
    assert torch.allclose(p[:3], torch.tensor([0.0, -1.0, 2.0]))


def test_projection_matches_gsplat_torch_reference():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    scene, w, h = small_scene(n=500, seed=3)
    radii, m2d, depths, conics, comp = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], w, h, compensations=True
    )
    covars, _ = _quat_scale_to_covar_preci(
        torch.nn.functional.normalize(scene["quats"], dim=-1), scene["scales"], compute_preci=False
    )
    r2, m2, d2, c2, comp2 = _fully_fused_projection(
        scene["means"], covars, scene["viewmats"], scene["Ks"], w, h, calc_compensations=True
    )
    assert torch.equal(radii, r2.int())
    assert (radii > 0).sum() > 100
    torch.testing.assert_close(m2d, m2, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(depths, d2)
    torch.testing.assert_close(conics, c2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(comp, comp2, atol=1e-5, rtol=1e-4)


def test_isect_tiles_matches_gsplat_reference():
    from gsplat.cuda._torch_impl import _isect_offset_encode, _isect_tiles

    scene, w, h = small_scene(n=60, seed=4)
    radii, m2d, depths, _, _ = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], w, h
    )
    tw, th = math.ceil(w / 16), math.ceil(h / 16)
    counts, ids, flat, offsets = isect_tiles(m2d, radii, depths, 16, tw, th)
    counts_ref, ids_ref, flat_ref = _isect_tiles(m2d, radii, depths, 16, tw, th)
    assert torch.equal(counts, counts_ref)
    assert torch.equal(ids, ids_ref)
    assert torch.equal(flat, flat_ref)
    assert torch.equal(offsets, _isect_offset_encode(ids_ref, 2, tw, th))


@pytest.mark.parametrize("channels", [1, 3, 32])
@pytest.mark.parametrize("with_bg", [False, True])
def test_tile_compositing_equals_brute_force(backend, channels, with_bg):
    scene, w, h = small_scene(n=40, d=channels, seed=channels + 7 * with_bg)
    bgs = torch.rand(2, channels, generator=torch.Generator().manual_seed(9)) if with_bg else None
    img, alpha, info = rasterize(
        scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"], scene["viewmats"],
        scene["Ks"], w, h, backgrounds=bgs,
    )
    ref, ref_alpha = brute_force_render(scene, w, h, bgs)
    assert img.shape == (2, h, w, channels) and alpha.shape == (2, h, w, 1)
    assert alpha.max() > 0.5, "scene should cover pixels"
    torch.testing.assert_close(img.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha.double(), ref_alpha, atol=1e-5, rtol=0)


def test_saturated_pixels_stop_at_transmittance_cutoff(backend):
    scene, w, h = small_scene(n=30, seed=11)
    scene["opacities"] = torch.full_like(scene["opacities"], 0.999)
    scene["scales"] = scene["scales"] * 4
    img, alpha, _ = rasterize(**{k: scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")}, width=w, height=h)
    ref, ref_alpha = brute_force_render(scene, w, h)
    assert ref_alpha.max() > 0.999  # some pixels hit the 1e-4 cut-off
    torch.testing.assert_close(img.double(), ref, atol=1e-5, rtol=0)


def _loss_fn(scene, w, h, weight, **kwargs):
    img, alpha, _ = rasterize(
        scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"], scene["viewmats"],
        scene["Ks"], w, h, **kwargs,
    )
    return (img * weight).sum() + (alpha * weight[..., :1]).sum()


def _grad_scene():
    scene, w, h = small_scene(n=6, d=3, seed=5, dtype=torch.float64, width=12, height=10)
    scene["Ks"][:, 0, 0] = scene["Ks"][:, 1, 1] = 12.0
    scene["Ks"][:, :2, 2] = torch.tensor([6.0, 5.0], dtype=torch.float64)
    scene["scales"] = scene["scales"] * 3
    scene["opacities"] = scene["opacities"] * 0.8
    weight = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return scene, w, h, weight


PARAMS = ["means", "quats", "scales", "opacities", "colors"]


def _analytic_grads(scene, w, h, weight, dtype):
    scene = {k: v.to(dtype) for k, v in scene.items()}
    leaves = {k: scene[k].clone().requires_grad_(True) for k in PARAMS}
    _loss_fn({**scene, **leaves}, w, h, weight.to(dtype)).backward()
    return {k: leaves[k].grad for k in PARAMS}, leaves


def test_gradients_match_finite_differences_float64(backend):
    """Every input of rasterize() gets the gradient that central differences predict (tiny, smooth scene)."""
    scene, w, h, weight = _grad_scene()
    grads, leaves = _analytic_grads(scene, w, h, weight, torch.float64)
    eps = 1e-6
    g = torch.Generator().manual_seed(0)
    for k in PARAMS:
        analytic = grads[k]
        assert analytic is not None and torch.isfinite(analytic).all(), k
        assert analytic.abs().sum() > 0, f"no gradient reached {k}"
        for i in torch.randperm(analytic.numel(), generator=g)[:8].tolist():
            plus = {kk: vv.detach().clone() for kk, vv in leaves.items()}
            minus = {kk: vv.detach().clone() for kk, vv in leaves.items()}
            plus[k].view(-1)[i] += eps
            minus[k].view(-1)[i] -= eps
            with torch.no_grad():
                fd = (_loss_fn({**scene, **plus}, w, h, weight) - _loss_fn({**scene, **minus}, w, h, weight)) / (2 * eps)
            a = analytic.view(-1)[i]
            assert abs(fd - a) <= 1e-5 * max(1.0, abs(fd)), f"{k}[{i}]: analytic {a:.6g} vs finite-diff {fd:.6g}"


def test_float32_gradients_match_float64_reference(backend, monkeypatch):
    """float32 gradients of the chosen backend agree with the float64 pure-torch gradients (checked above
    against finite differences); finite differences in float32 are too noisy to test directly."""
    scene, w, h, weight = _grad_scene()
    grads32, _ = _analytic_grads(scene, w, h, weight, torch.float32)
    monkeypatch.setenv("PEPESEG3D_CPU_BACKEND", "torch")
    grads64, _ = _analytic_grads(scene, w, h, weight, torch.float64)
    for k in PARAMS:
        assert grads32[k].abs().sum() > 0, f"no gradient reached {k}"
        torch.testing.assert_close(grads32[k].double(), grads64[k], atol=2e-3, rtol=2e-3, msg=k)


def test_sh_colors_and_render_modes(backend):
    scene, w, h = small_scene(n=50, seed=6)
    g = torch.Generator().manual_seed(0)
    shs = torch.randn(50, 16, 3, generator=g) * 0.2
    common = dict(means=scene["means"], quats=scene["quats"], scales=scene["scales"], opacities=scene["opacities"],
                  viewmats=scene["viewmats"], Ks=scene["Ks"], width=w, height=h)
    # degree 0 SH equals plain colours of 0.5 + c0 * Y00
    rgb_sh, _, _ = rasterize(colors=shs, sh_degree=0, **common)
    rgb_plain, _, _ = rasterize(colors=torch.clamp_min(shs[:, 0] * 0.28209479177387814 + 0.5, 0), **common)
    torch.testing.assert_close(rgb_sh, rgb_plain, atol=1e-6, rtol=0)
    rgb3, _, _ = rasterize(colors=shs, sh_degree=3, **common)
    assert not torch.allclose(rgb3, rgb_sh)
    # RGB+ED appends expected depth; D is accumulated depth; ED = D / alpha
    out, alpha, info = rasterize(colors=scene["colors"], render_mode="RGB+ED", **common)
    d, _, _ = rasterize(colors=scene["colors"], render_mode="D", **common)
    ed, _, _ = rasterize(colors=scene["colors"], render_mode="ED", **common)
    torch.testing.assert_close(out[..., 3:], ed)
    torch.testing.assert_close(ed, d / alpha.clamp(min=1e-10))
    covered = alpha[..., 0] > 0.5
    assert ((ed[..., 0][covered] > 1.9) & (ed[..., 0][covered] < 4.5)).all()
    for key in ("means2d", "radii", "width", "height", "n_cameras", "depths", "conics"):
        assert key in info
    assert info["means2d"].shape == (2, 50, 2) and info["n_cameras"] == 2


def test_info_means2d_gradient_feeds_default_strategy(backend):
    """gsplat's DefaultStrategy reads means2d.grad (and .absgrad) after backward."""
    from gsplat.strategy import DefaultStrategy

    scene, w, h = small_scene(n=50, seed=8)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(scene[k].clone()) for k in ("means", "quats", "scales", "opacities", "colors")})
    strategy = DefaultStrategy(absgrad=True, refine_start_iter=0)
    state = strategy.initialize_state()
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    img, _, info = rasterize(params["means"], params["quats"], params["scales"], params["opacities"], params["colors"],
                             scene["viewmats"], scene["Ks"], w, h, absgrad=True)
    strategy.step_pre_backward(params, optimizers, state, 0, info)
    img.sum().backward()
    assert info["means2d"].grad is not None and info["means2d"].grad.abs().sum() > 0
    assert info["means2d"].absgrad.shape == info["means2d"].shape
    assert (info["means2d"].absgrad >= info["means2d"].grad.abs() - 1e-6).all()
    strategy.step_post_backward(params, optimizers, state, 1, info, packed=False)
    assert state["count"].sum() > 0


def test_zero_gaussians_is_a_clear_error():
    scene, w, h = small_scene(n=3)
    with pytest.raises(ValueError, match="zero Gaussians"):
        rasterize(scene["means"][:0], scene["quats"][:0], scene["scales"][:0], scene["opacities"][:0],
                  scene["colors"][:0], scene["viewmats"], scene["Ks"], w, h)


def test_fallback_equals_cpp_kernel(monkeypatch):
    scene, w, h = small_scene(n=80, d=5, seed=12)
    outs = []
    for b in BACKENDS:
        monkeypatch.setenv("PEPESEG3D_CPU_BACKEND", b)
        assert cpu_backend_name() == b
        outs.append(rasterize(**{k: scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")}, width=w, height=h)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels", [3, 32])
def test_cpu_matches_gsplat_cuda(channels):
    scene, w, h = small_scene(n=300, d=channels, seed=13, width=64, height=48)
    leaves_cpu = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    leaves_gpu = {k: scene[k].cuda().requires_grad_(True) for k in leaves_cpu}
    weight = torch.rand(2, h, w, channels)
    img_c, a_c, _ = rasterize(**leaves_cpu, viewmats=scene["viewmats"], Ks=scene["Ks"], width=w, height=h, render_mode="RGB+ED")
    img_g, a_g, _ = rasterize(**leaves_gpu, viewmats=scene["viewmats"].cuda(), Ks=scene["Ks"].cuda(), width=w, height=h,
                              render_mode="RGB+ED", packed=False)
    torch.testing.assert_close(img_c, img_g.cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a_c, a_g.cpu(), atol=1e-5, rtol=1e-5)
    (img_c[..., :channels] * weight).sum().backward()
    (img_g[..., :channels] * weight.cuda()).sum().backward()
    for k in leaves_cpu:
        torch.testing.assert_close(leaves_cpu[k].grad, leaves_gpu[k].grad.cpu(), atol=1e-3, rtol=1e-3)
