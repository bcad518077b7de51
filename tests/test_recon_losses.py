"""pepe-recon depth loss on hand-made inputs whose answer is known."""

from __future__ import annotations

import pytest
import torch

from pepeseg3d_ns.recon.losses import depth_prior_loss, fit_affine


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
