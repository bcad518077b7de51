"""Losses of pepe-recon (PePESeg3D stage 1). Pure functions of tensors.

Depth constraint (paper eq. 1-2): ``L_depth = mean_p |alpha* * D_hat(p) + beta* - D(p)|`` over valid pixels, where
``D`` is the monocular prior and ``(alpha*, beta*)`` the per-image fit of the rendered map ``D_hat`` to it.

**Space.** Depth-Anything-V2 gives *relative inverse depth* (disparity up to an unknown scale and shift), so the
comparison is done in inverse depth: ``D_hat = 1 / z_rendered``, where ``z_rendered`` is splatfacto's expected
z-depth. Only there does an affine map relate the two exactly. (An affine map of inverse depth is not an affine
map of depth.)

**The fit** (``fit="robust"``, the default; a departure from the paper, see docs/recon.md). The paper solves
``(alpha*, beta*)`` by plain least squares, and one floater (a Gaussian rendered at z = 0.01, so ``D_hat = 100``)
among 1024 pixels is a leverage point that drags the least-squares line through itself: ``alpha*`` drops from 2.0
to 0.006 and the loss's gradient on every other pixel shrinks with it. Trimming the residuals of that
least-squares line afterwards does not help, because the floater's own residual is then small. The robust
estimator (:func:`fit_affine_robust`) is:

1. a least-median-of-squares (LMedS) start: ``n_subsample`` (2048) valid pixels, evenly spaced in raster order
   among the valid ones, and ``n_candidates`` (128) lines, each through two of them chosen by a fixed
   low-discrepancy (R2) sequence; the line with the smallest median squared residual on the subsample wins.
   Its breakdown point is 50 %: any set of outliers (floaters, sky, wrong prior) covering less than half of the
   valid pixels cannot move it far, however extreme their values;
2. ``rounds`` (3) of least squares on the inliers of the current line: the valid pixels with
   ``|residual| <= k * sigma``, ``k = 3``, ``sigma = 1.4826 * median |residual|`` on the subsample (the MAD
   scale, floored at 1e-6 of the prior's spread). Inliers are chosen by residual only, never by leverage, so a
   genuinely near object that follows the same affine map stays in the fit and pins the slope.

``fit="lstsq"`` is the paper's plain least squares. Both are deterministic, run on the tensors' device with no
host-device synchronisation (weights and masked reductions, no boolean indexing, no ``.item()``).

**Normalisation.** The prior's units are arbitrary, so the residual is divided by the prior's mean absolute
deviation from its median over the valid pixels. That makes the loss invariant to rescaling the prior, so that
``lambda_d = 0.05`` means the same thing for every image and every depth model. The loss itself is the paper's:
the L1 mean over *all* valid pixels (outliers of the fit included; L1 bounds each pixel's pull, and a floater's
gradient is what moves it back onto the surface).

**Gradient.** ``(alpha*, beta*)`` are solved without gradient and *detached*: they act as constants of the step,
and the gradient reaches the Gaussians only through ``D_hat``. Letting the gradient flow through the fit would
reward degenerate solutions (a flat ``D_hat`` makes the fit trivially good) rather than correct geometry.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import Tensor

DepthFit = Literal["robust", "lstsq"]

# increments of the R2 low-discrepancy sequence (Roberts 2018): frac(0.5 + k * g), g = 1/phi2, 1/phi2^2
_R2 = (0.7548776662466927, 0.5698402909980532)
_MAD_TO_SIGMA = 1.4826


def fit_affine(x: Tensor, y: Tensor, weights: Optional[Tensor] = None, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
    """Closed-form (weighted) least squares ``argmin_{a,b} sum w * (a*x + b - y)^2`` for 1-D ``x, y, weights [P]``.

    Computed in float64; ``weights`` (default all ones) may be 0/1 masks or any non-negative values, and entries
    with weight 0 must still be finite. Returns scalars ``a, b`` (0-d tensors in ``x``'s dtype). For a constant
    ``x`` (weighted variance <= ``eps``), ``a = 0`` and ``b`` = the weighted mean of ``y``; with all weights 0,
    ``a = b = 0``.
    """
    x64, y64 = x.double(), y.double()
    w = torch.ones_like(x64) if weights is None else weights.double()
    sw = w.sum()
    inv_sw = torch.where(sw > 0, 1.0 / sw.clamp(min=1e-300), torch.zeros_like(sw))
    mx, my = (w * x64).sum() * inv_sw, (w * y64).sum() * inv_sw
    dx = x64 - mx
    var = (w * dx * dx).sum() * inv_sw
    cov = (w * dx * (y64 - my)).sum() * inv_sw
    a = torch.where(var > eps, cov / var.clamp(min=eps), torch.zeros_like(var))
    b = my - a * mx
    return a.to(x.dtype), b.to(x.dtype)


def _valid_subsample(ok: Tensor, size: int) -> Tensor:
    """``size`` indices ``[size] int64`` of valid entries of ``ok [P] bool``, evenly spaced in order among them
    (repeated when fewer than ``size`` are valid; index ``P - 1`` when none is). No host synchronisation."""
    cs = torch.cumsum(ok.to(torch.int64), 0)
    n = cs[-1]
    ranks = torch.arange(size, device=ok.device, dtype=torch.int64) * n // size  # in [0, n) when n > 0
    return torch.searchsorted(cs, ranks + 1).clamp(max=ok.numel() - 1)


def fit_affine_robust(
    x: Tensor,
    y: Tensor,
    valid: Tensor,
    n_subsample: int = 2048,
    n_candidates: int = 128,
    rounds: int = 3,
    k: float = 3.0,
    scale_floor: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Outlier-resistant affine fit ``y ~ a*x + b``: LMedS start over two-point candidates, then least squares
    on the pixels within ``k`` robust sigmas (see the module docstring for the estimator and its parameters).

    Args:
        x, y: ``[P]`` values (entries where ``valid`` is False are ignored but must be finite).
        valid: ``[P] bool`` entries that may take part.
        scale_floor: 0-d lower bound of the residual scale sigma (default 1e-12), so that exactly affine data
            keep their inliers.

    Returns:
        ``a, b`` (0-d, float64) and ``inliers [P] bool``: the valid entries within ``k`` sigmas of the returned
        line, the set its last least-squares round used.
    """
    x64, y64 = x.double(), y.double()
    idx = _valid_subsample(valid, n_subsample)
    xs, ys = x64[idx], y64[idx]  # [S]

    # LMedS start: lines through pairs (i, j) of subsample points picked by the R2 sequence
    kk = torch.arange(n_candidates, device=x.device, dtype=torch.float64)
    pairs = torch.stack([torch.frac(0.5 + kk * g) for g in _R2], dim=-1)  # [K, 2] in [0, 1)
    pi = (pairs * n_subsample).long().clamp(max=n_subsample - 1)
    x1, x2, y1, y2 = xs[pi[:, 0]], xs[pi[:, 1]], ys[pi[:, 0]], ys[pi[:, 1]]
    dx = x2 - x1
    flat = dx.abs() <= 1e-12 * (x1.abs() + x2.abs() + 1e-30)  # same x: the horizontal line through point 1
    a_c = torch.where(flat, torch.zeros_like(dx), (y2 - y1) / torch.where(flat, torch.ones_like(dx), dx))
    b_c = y1 - a_c * x1
    med_sq = ((a_c[:, None] * xs[None, :] + b_c[:, None] - ys[None, :]) ** 2).median(dim=1).values  # [K]
    best = torch.argmin(med_sq).reshape(1)  # first minimum: deterministic
    a, b = a_c.index_select(0, best)[0], b_c.index_select(0, best)[0]  # (a_c[best] would sync: .item())

    floor = torch.full((), 1e-12, dtype=torch.float64, device=x.device) if scale_floor is None else (
        scale_floor.double().clamp(min=1e-12))
    inliers = valid
    for _ in range(max(1, rounds)):
        res = (a * x64 + b - y64).abs()
        sigma = torch.maximum(_MAD_TO_SIGMA * res[idx].median(), floor)
        inliers = valid & (res <= k * sigma)
        a, b = fit_affine(x64, y64, inliers.to(torch.float64))
    return a, b, inliers


def depth_prior_loss(
    rendered_depth: Tensor,
    prior_disparity: Tensor,
    valid: Optional[Tensor] = None,
    min_depth: float = 1e-3,
    min_pixels: int = 16,
    fit: DepthFit = "robust",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scale- and shift-invariant depth loss between a rendered z-depth and a relative inverse-depth prior.

    Args:
        rendered_depth: ``[H, W]`` or ``[H, W, 1]`` expected z-depth rendered by the model (differentiable).
        prior_disparity: same shape, the monocular prior (larger = nearer, unknown scale and shift).
        valid: optional ``bool``, same shape: pixels to use (e.g. accumulated alpha > 0.5). Pixels with
            non-finite values or ``rendered_depth <= min_depth`` are always excluded.
        min_pixels: below this many valid pixels the loss is 0 (and carries no gradient).
        fit: ``"robust"`` (LMedS start + inlier least squares, :func:`fit_affine_robust`) or ``"lstsq"``
            (the paper's plain least squares, :func:`fit_affine`).

    Returns:
        ``loss`` (0-d, differentiable w.r.t. ``rendered_depth``), and the fitted ``alpha``, ``beta`` (detached;
        0 when there are too few valid pixels) mapping rendered inverse depth to the prior.
    """
    if fit not in ("robust", "lstsq"):
        raise ValueError(f"depth fit must be 'robust' or 'lstsq', got {fit!r}")
    z = rendered_depth.reshape(-1)
    d = prior_disparity.reshape(-1).to(z.dtype)
    if z.shape != d.shape:
        raise ValueError(f"rendered depth has {z.numel()} pixels but the prior has {d.numel()}")
    ok = torch.isfinite(z) & torch.isfinite(d) & (z > min_depth)
    if valid is not None:
        ok &= valid.reshape(-1).bool()
    # invalid pixels get harmless stand-ins (never NaN/inf, so no NaN reaches the gradient through `where`)
    z_safe = torch.where(ok, z, torch.ones_like(z))
    inv = 1.0 / z_safe
    target = torch.where(ok, d, torch.zeros_like(d))
    okf = ok.to(z.dtype)
    n = okf.sum()
    enough = n >= min_pixels
    with torch.no_grad():
        t64 = target.double()
        med = torch.nanmedian(torch.where(ok, t64, torch.full_like(t64, float("nan"))))
        med = torch.where(torch.isfinite(med), med, torch.zeros_like(med))
        spread = ((t64 - med).abs() * ok).sum() / n.double().clamp(min=1.0)
        spread = spread.clamp(min=1e-8)
        if fit == "robust":
            alpha, beta, _ = fit_affine_robust(inv.detach(), target, ok, scale_floor=1e-6 * spread)
        else:
            alpha, beta = fit_affine(inv.detach(), target, okf)
        zero = torch.zeros_like(alpha)
        alpha, beta = torch.where(enough, alpha, zero).to(z.dtype), torch.where(enough, beta, zero).to(z.dtype)
        spread = spread.to(z.dtype)
    loss = ((alpha * inv + beta - target).abs() * okf).sum() / (n.clamp(min=1.0) * spread)
    loss = torch.where(enough, loss, torch.zeros_like(loss))
    return loss, alpha, beta
