"""Degenerate Gaussians in the CPU projection: gradients stay finite and match a float64 reference.

The case: a long, thin Gaussian seen almost edge-on just in front of the camera. Its 2D covariance is large
(~1e9 px^2) and nearly rank 1, so gsplat's ``c00 * c11 - c01^2`` loses every digit in float32. Before the fix the
determinant came out <= 0, was clamped to 1e-10, and the conic (~1e22) made the Gaussian nearly invisible and
its gradients ~1e20 (the garden scene's NaN Gaussian, issue 15). ``project_gaussians`` now computes the
determinant as a sum of squares, ``|a0 x a1|^2 + eps2d (c00 + c11) + eps2d^2``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

R = importlib.import_module("pepeseg3d_ns.render.rasterize")

K = [[110.0, 0.0, 64.0], [0.0, 110.0, 64.0], [0.0, 0.0, 1.0]]
# camera at the origin looking down +z (OpenCV); the Gaussian 0.0136 in front of it, near plane 0.01
NEEDLE = {
    "means": [[0.0007, -0.00056, 0.0136]],
    "log_scales": [[5.8, -9.56, -10.68]],  # std 330 along one axis, 7e-5 and 2e-5 across
    "quats": [[0.966, -0.317, -1.339, 1.745]],
}


def _render(case, dtype):
    """Loss (L1 to grey + a little expected depth) of one Gaussian in one 128 px camera; returns the leaf
    tensors (with .grad), the render's alpha and the projection info."""
    leaves = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in case.items()}
    opacity = torch.tensor([2.0], dtype=dtype, requires_grad=True)
    color = torch.tensor([[0.5, 0.5, 0.5]], dtype=dtype, requires_grad=True)
    img, alpha, info = R.rasterize(
        leaves["means"], leaves["quats"], leaves["log_scales"].exp(), torch.sigmoid(opacity), color,
        torch.eye(4, dtype=dtype)[None], torch.tensor([K], dtype=dtype), 128, 128, render_mode="RGB+ED",
    )
    loss = (img[..., :3] - 0.2).abs().mean() + 0.01 * img[..., 3].mean()
    loss.backward()
    leaves.update(opacity=opacity, color=color)
    return leaves, alpha, info


def test_edge_on_needle_has_finite_gradients_matching_float64():
    f32, alpha32, info32 = _render(NEEDLE, torch.float32)
    f64, alpha64, info64 = _render(NEEDLE, torch.float64)
    assert int(info32["radii"][0, 0]) > 0  # visible: it is in front of the near plane and covers the image
    conic32, conic64 = info32["conics"][0, 0].detach(), info64["conics"][0, 0].detach()
    # finite, positive diagonal (the determinant of a near-rank-1 conic cannot be checked in float32)
    assert torch.isfinite(conic32).all() and conic32[0] > 0 and conic32[2] > 0
    torch.testing.assert_close(conic32.double(), conic64, rtol=1e-3, atol=0.0)
    # the footprint (its total alpha over the image) is the float64 one, not a sliver
    assert alpha32.sum().item() == pytest.approx(alpha64.sum().item(), rel=1e-3)
    for name in ("means", "log_scales", "quats", "opacity", "color"):
        g32, g64 = f32[name].grad, f64[name].grad
        assert torch.isfinite(g32).all(), name
        scale = g64.abs().max().item()
        assert (g32.double() - g64).abs().max().item() <= 1e-2 * scale + 1e-9, (name, g32, g64)


def test_float64_projection_gradients_match_finite_differences_on_the_needle():
    """The sum-of-squares determinant's autograd backward, checked by central differences in float64 (conics
    and centre as functions of mean, log-scales and quaternion)."""
    def conics_of(means, log_scales, quats):
        _, means2d, _, conics, _ = R.project_gaussians(
            means, quats, log_scales.exp(), torch.eye(4, dtype=torch.float64)[None],
            torch.tensor([K], dtype=torch.float64), 128, 128,
        )
        return torch.cat([conics.reshape(-1), means2d.reshape(-1)])

    inputs = tuple(torch.tensor(NEEDLE[k], dtype=torch.float64, requires_grad=True)
                   for k in ("means", "log_scales", "quats"))
    assert torch.autograd.gradcheck(conics_of, inputs, eps=1e-8, atol=1e-6, rtol=1e-4)


def test_sum_of_squares_determinant_agrees_with_gsplat_on_ordinary_gaussians():
    """Away from the degenerate case the conics are gsplat's (torch reference) to float32 rounding."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    g = torch.Generator().manual_seed(0)
    n = 2000
    means = torch.cat([torch.rand(n, 2, generator=g) * 2 - 1, 2 + 2 * torch.rand(n, 1, generator=g)], dim=1)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.rand(n, 3, generator=g) * 4 - 6)  # 0.0025 .. 0.14, anisotropic
    Ks, viewmats = torch.tensor([K]), torch.eye(4)[None]
    radii, _, _, conics, _ = R.project_gaussians(means, quats, scales, viewmats, Ks, 128, 128)
    covars, _ = _quat_scale_to_covar_preci(torch.nn.functional.normalize(quats, dim=-1), scales, compute_preci=False)
    r2, _, _, c2, _ = _fully_fused_projection(means, covars, viewmats, Ks, 128, 128)
    vis = (radii > 0) & (r2 > 0)
    assert vis.sum() > 1000
    torch.testing.assert_close(conics[vis], c2[vis], rtol=1e-4, atol=1e-6)
