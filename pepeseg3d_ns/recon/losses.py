"""Losses of pepe-recon (PePESeg3D stage 1). Pure functions of tensors.

Depth constraint (paper eq. 1-2): ``L_depth = mean_p |alpha* * D_hat(p) + beta* - D(p)|`` over valid pixels, where
``D`` is the monocular prior and ``(alpha*, beta*)`` the per-image least-squares fit of the rendered map ``D_hat``
to it.

**Space.** Depth-Anything-V2 gives *relative inverse depth* (disparity up to an unknown scale and shift), so the
comparison is done in inverse depth: ``D_hat = 1 / z_rendered``, where ``z_rendered`` is splatfacto's expected
z-depth. Only there does an affine map relate the two exactly. (An affine map of inverse depth is not an affine
map of depth.)

**Normalisation.** The prior's units are arbitrary, so the residual is divided by the prior's mean absolute
deviation from its median over the valid pixels. That makes the loss invariant to rescaling the prior, so that
``lambda_d = 0.05`` means the same thing for every image and every depth model.

**Gradient.** ``(alpha*, beta*)`` are solved in closed form and *detached*: they act as constants of the step,
and the gradient reaches the Gaussians only through ``D_hat``. Letting the gradient flow through the fit would
reward degenerate solutions (a flat ``D_hat`` makes the fit trivially good) rather than correct geometry.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def fit_affine(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
    """Closed-form least squares ``argmin_{a,b} sum (a*x + b - y)^2`` for 1-D ``x [P]``, ``y [P]`` (float64 inside).

    Returns scalars ``a, b`` (0-d tensors in ``x``'s dtype). For a constant ``x``, ``a = 0`` and ``b = mean(y)``.
    """
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(), y64.mean()
    dx = x64 - mx
    var = (dx * dx).mean()
    a = torch.where(var > eps, (dx * (y64 - my)).mean() / var.clamp(min=eps), torch.zeros_like(var))
    b = my - a * mx
    return a.to(x.dtype), b.to(x.dtype)


def depth_prior_loss(
    rendered_depth: Tensor,
    prior_disparity: Tensor,
    valid: Optional[Tensor] = None,
    min_depth: float = 1e-3,
    min_pixels: int = 16,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scale- and shift-invariant depth loss between a rendered z-depth and a relative inverse-depth prior.

    Args:
        rendered_depth: ``[H, W]`` or ``[H, W, 1]`` expected z-depth rendered by the model (differentiable).
        prior_disparity: same shape, the monocular prior (larger = nearer, unknown scale and shift).
        valid: optional ``bool``, same shape: pixels to use (e.g. accumulated alpha > 0.5). Pixels with
            non-finite values or ``rendered_depth <= min_depth`` are always excluded.
        min_pixels: below this many valid pixels the loss is 0 (and carries no gradient).

    Returns:
        ``loss`` (0-d, differentiable w.r.t. ``rendered_depth``), and the fitted ``alpha``, ``beta`` (detached)
        mapping rendered inverse depth to the prior.
    """
    z = rendered_depth.reshape(-1)
    d = prior_disparity.reshape(-1).to(z.dtype)
    if z.shape != d.shape:
        raise ValueError(f"rendered depth has {z.numel()} pixels but the prior has {d.numel()}")
    ok = torch.isfinite(z) & torch.isfinite(d) & (z > min_depth)
    if valid is not None:
        ok &= valid.reshape(-1).bool()
    if int(ok.sum()) < min_pixels:
        zero = z.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    inv = 1.0 / z[ok]
    target = d[ok]
    with torch.no_grad():
        alpha, beta = fit_affine(inv, target)
        spread = (target - target.median()).abs().mean().clamp(min=1e-8)
    loss = (alpha * inv + beta - target).abs().mean() / spread
    return loss, alpha, beta
