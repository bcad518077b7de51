"""pepe-recon depth loss on hand-made inputs whose answer is known."""

from __future__ import annotations

import pytest
import torch

from pepeseg3d_ns.recon.losses import depth_prior_loss, fit_affine, fit_affine_robust


def _depth(seed=0, h=24, w=32):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 4.0 * torch.rand(h, w, generator=g, dtype=torch.float64)


def test_fit_recovers_known_affine():
    x = torch.linspace(0.2, 3.0, 50, dtype=torch.float64)
    a, b = fit_affine(x, 2.5 * x - 0.7)
    assert a.item() == pytest.approx(2.5) and b.item() == pytest.approx(-0.7)
    a, b = fit_affine(torch.ones(10), torch.arange(10.0))
    assert a.item() == 0.0 and b.item() == pytest.approx(4.5)


def test_exact_affine_prior_gives_zero_loss():
    z = _depth()
    prior = 3.0 / z + 0.25  # relative inverse depth: an affine map of 1/z
    loss, alpha, beta = depth_prior_loss(z, prior)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert alpha.item() == pytest.approx(3.0) and beta.item() == pytest.approx(0.25)


def test_loss_is_invariant_to_prior_scale_and_shift_and_grows_with_error():
    z = _depth(1)
    g = torch.Generator().manual_seed(5)
    prior = 1.0 / z + 0.05 * torch.randn(z.shape, generator=g, dtype=torch.float64)
    base, _, _ = depth_prior_loss(z, prior)
    scaled, _, _ = depth_prior_loss(z, 40.0 * prior + 3.0)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-9)
    worse, _, _ = depth_prior_loss(z, 1.0 / z + 0.2 * torch.randn(z.shape, generator=g, dtype=torch.float64))
    assert worse > base > 0


def test_invalid_pixels_are_excluded():
    z = _depth(2)
    prior = 2.0 / z
    valid = torch.ones_like(z, dtype=torch.bool)
    corrupted = prior.clone()
    corrupted[:, :8] = 100.0  # garbage where there is no geometry
    valid[:, :8] = False
    loss, alpha, beta = depth_prior_loss(z, corrupted, valid)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and alpha.item() == pytest.approx(2.0)
    zbad = z.clone()
    zbad[0, 0] = float("nan")
    zbad[1, 1] = 0.0
    loss, _, _ = depth_prior_loss(zbad, prior)  # non-finite / non-positive rendered depth ignored
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-10)
    none, _, _ = depth_prior_loss(z, prior, torch.zeros_like(valid))
    assert none.item() == 0.0


def test_gradient_reaches_rendered_depth_only():
    z = _depth(3).requires_grad_(True)
    prior = (1.5 / z.detach() + 0.1) * (1 + 0.1 * torch.rand(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    loss, alpha, beta = depth_prior_loss(z, prior)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert not alpha.requires_grad and not beta.requires_grad
    # a small gradient step on the rendered depth lowers the loss
    with torch.no_grad():
        z2 = z - 1e-2 * z.grad / z.grad.abs().max()
    assert depth_prior_loss(z2, prior)[0] < loss


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="pixels"):
        depth_prior_loss(torch.ones(4, 4), torch.ones(4, 5))


# ---------------------------------------------------------------- robust scale/shift fit (floaters, sky, near content)

ALPHA, BETA, NOISE = 2.0, 0.3, 0.02


def _scene(seed=0, h=32, w=32):
    """Rendered z in [1, 5] and a prior ``ALPHA / z + BETA`` with Gaussian noise (std NOISE): 1024 pixels."""
    g = torch.Generator().manual_seed(seed)
    z = 1.0 + 4.0 * torch.rand(h, w, generator=g, dtype=torch.float64)
    prior = ALPHA / z + BETA + NOISE * torch.randn(h, w, generator=g, dtype=torch.float64)
    return z, prior, g


def _loss_grad(z, prior, fit):
    z = z.clone().requires_grad_(True)
    loss, alpha, beta = depth_prior_loss(z, prior, fit=fit)
    loss.backward()
    return alpha.item(), beta.item(), z.grad.reshape(-1)


def _contamination_effect(z_bad, prior_bad, outliers, fit):
    """(relative change of alpha*, max and min per-pixel |grad| ratio on the inlier pixels) against the clean
    image of :func:`_scene`, for one fit."""
    z, prior, _ = _scene()
    a_clean, _, g_clean = _loss_grad(z, prior, fit)
    a_bad, _, g_bad = _loss_grad(z_bad, prior_bad, fit)
    inl = ~outliers.reshape(-1)
    ratio = g_bad[inl].abs() / g_clean[inl].abs()
    return abs(a_bad / a_clean - 1.0), ratio.max().item(), ratio.min().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_robust_fit_recovers_clean_affine(dtype):
    z, _, _ = _scene()
    prior = ALPHA / z + BETA
    loss, alpha, beta = depth_prior_loss(z.to(dtype), prior.to(dtype))
    assert alpha.item() == pytest.approx(ALPHA, rel=1e-5) and beta.item() == pytest.approx(BETA, rel=1e-5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # and with noise it agrees with plain least squares (no outliers: the same estimate up to noise)
    z, prior, _ = _scene()
    a_r, b_r, _ = _loss_grad(z, prior, "robust")
    a_l, b_l, _ = _loss_grad(z, prior, "lstsq")
    assert a_r == pytest.approx(a_l, rel=0.01) and b_r == pytest.approx(b_l, abs=0.01)


def test_floaters_barely_move_the_robust_fit_and_break_plain_least_squares():
    z, prior, g = _scene()
    outliers = torch.zeros(z.numel(), dtype=torch.bool)
    outliers[torch.randperm(z.numel(), generator=g)[: z.numel() // 100]] = True  # 1 % of the valid pixels
    outliers = outliers.reshape(z.shape)
    z_bad = torch.where(outliers, torch.full_like(z, 0.01), z)  # floaters in front of the camera
    d_alpha, r_max, r_min = _contamination_effect(z_bad, prior, outliers, "robust")
    assert d_alpha < 0.05 and r_max < 2.0 and r_min > 0.5
    # the paper's plain least squares: the floaters drag alpha* to ~0 and the inliers lose their gradient
    d_alpha, r_max, r_min = _contamination_effect(z_bad, prior, outliers, "lstsq")
    assert d_alpha > 0.05 and r_min < 0.5


def test_sky_barely_moves_the_robust_fit_and_breaks_plain_least_squares():
    z, prior, g = _scene()
    sky = torch.zeros_like(z, dtype=torch.bool)
    sky[:6] = True  # 19 % of the image: rendered at arbitrary depths 0.2..1000, prior says ~0 (infinitely far)
    z_bad = torch.where(sky, torch.exp(torch.empty_like(z).uniform_(-1.6, 6.9, generator=g)), z)
    prior_bad = torch.where(sky, 1e-3 * torch.rand(z.shape, generator=g, dtype=z.dtype), prior)
    d_alpha, r_max, r_min = _contamination_effect(z_bad, prior_bad, sky, "robust")
    assert d_alpha < 0.05 and r_max < 2.0 and r_min > 0.5
    d_alpha, r_max, r_min = _contamination_effect(z_bad, prior_bad, sky, "lstsq")
    assert d_alpha > 0.05 and (r_max > 2.0 or r_min < 0.5)


def test_near_object_is_kept_by_the_robust_fit():
    """A genuinely near object (10 % of the image, z 0.1..0.2: inverse depth 5..10 against 0.2..1 elsewhere)
    follows the same affine map: it is high-leverage but not an outlier, and must stay in the fit."""
    z, _, g = _scene(seed=3)
    near = torch.zeros_like(z, dtype=torch.bool)
    near[10:13] = True
    near[13, :3] = True  # 99 pixels, ~10 %
    z = torch.where(near, 0.1 + 0.1 * torch.rand(z.shape, generator=g, dtype=z.dtype), z)
    prior = ALPHA / z + BETA + NOISE * torch.randn(z.shape, generator=g, dtype=z.dtype)
    a, b, inliers = fit_affine_robust((1.0 / z).reshape(-1), prior.reshape(-1), torch.ones(z.numel(), dtype=torch.bool))
    assert inliers.reshape(z.shape)[near].all()
    assert a.item() == pytest.approx(ALPHA, rel=0.01) and b.item() == pytest.approx(BETA, abs=0.01)
    _, alpha, beta = depth_prior_loss(z, prior)
    assert alpha.item() == pytest.approx(a.item()) and beta.item() == pytest.approx(b.item())
    # the near pixels are fitted to the noise level, as well as the rest
    res = (alpha * (1.0 / z) + beta - prior).abs()
    assert res[near].mean() < 2 * NOISE and res[~near].mean() < 2 * NOISE


def test_robust_fit_is_deterministic_and_ignores_invalid_pixels():
    z, prior, g = _scene()
    valid = torch.rand(z.shape, generator=g) > 0.3
    garbage = torch.where(valid, prior, torch.full_like(prior, 1e6))  # must not be seen
    z_garbage = torch.where(valid, z, torch.full_like(z, float("nan")))
    first = depth_prior_loss(z_garbage, garbage, valid)
    again = depth_prior_loss(z_garbage, garbage, valid)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert first[1].item() == pytest.approx(ALPHA, rel=0.05)


@pytest.mark.parametrize("fit", ["robust", "lstsq"])
def test_too_few_pixels_give_zero_loss_and_finite_zero_gradient(fit):
    z, prior, _ = _scene()
    z = z.clone()
    z[0, 0] = float("nan")
    valid = torch.zeros_like(z, dtype=torch.bool)
    valid[1, :5] = True  # 5 < min_pixels
    for v in (valid, torch.zeros_like(valid)):
        zz = z.clone().requires_grad_(True)
        loss, alpha, beta = depth_prior_loss(zz, prior, v, fit=fit)
        loss.backward()
        assert loss.item() == 0.0 and alpha.item() == 0.0 and beta.item() == 0.0
        assert torch.equal(zz.grad, torch.zeros_like(zz))


@pytest.mark.parametrize("fit", ["robust", "lstsq"])
def test_depth_loss_needs_no_host_sync(fit):
    """On meta tensors any .item()/int()/bool() of a tensor, nonzero or boolean-mask indexing raises: the loss
    runs (forward and backward) without one, so on CUDA it never waits for the device."""
    z = torch.empty(48, 64, device="meta", requires_grad=True)
    prior = torch.empty(48, 64, device="meta")
    valid = torch.empty(48, 64, dtype=torch.bool, device="meta")
    loss, alpha, beta = depth_prior_loss(z, prior, valid, fit=fit)
    loss.backward()
    assert loss.shape == () and z.grad.shape == z.shape


def test_unknown_fit_is_an_error():
    with pytest.raises(ValueError, match="robust"):
        depth_prior_loss(torch.ones(4, 4), torch.ones(4, 4), fit="ransac")
