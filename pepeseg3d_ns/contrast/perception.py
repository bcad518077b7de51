"""Perception pairs of pepe-contrast (paper eq. 4): window partners of sampled pixels and their adaptive
depth / colour thresholds. Pure functions of tensors (torch only).

For one view ``H x W`` with its depth prior ``depth_prior: [H, W]`` and image ``image: [H, W, 3]`` in ``[0, 1]``,
and ``P`` sampled pixels ``pix: long [P]`` (flat ``y * W + x``) at scales ``s_t``:

* ``radius_px`` -- the window radius ``r(s)`` in pixels;
* ``normalise_depth`` -- the depth prior mapped to ``[0, 1]``;
* ``perception_pairs`` -- one partner per pixel inside its window and the flags ``sim`` / ``dis`` from the
  window's adaptive thresholds.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from pepeseg3d_ns.contrast.sampling import ScaleLike, _broadcast_scale, _check_index, _randint_below


# ----------------------------------------------------------------------------------------------------------------
# perception pairs (paper eq. 4)
# ----------------------------------------------------------------------------------------------------------------


def radius_px(s: ScaleLike, H: int, W: int, r_min: float = 2.0, r_max_frac: float = 0.25) -> Tensor:
    """Window radius in pixels for scale ``s``: ``r(s) = max(1, round(r_min + clamp(s, 0, 1) * (r_max - r_min)))``.

    ``r_max = max(r_min, r_max_frac * min(H, W))`` (defaults: ``r_min = 2`` px, ``r_max = 0.25 * min(H, W)``).
    The window of radius ``r`` around ``p`` is the square ``[y - r, y + r] x [x - r, x + r]`` (clamped to the image).

    Args:
        s: float or ``float [P]``. H, W: image size.

    Returns:
        ``long`` tensor of ``s``'s shape (0-d for a float).
    """
    if H < 1 or W < 1:
        raise ValueError(f"image size must be positive, got H={H}, W={W}")
    s_t = torch.as_tensor(s, dtype=torch.float64)
    r_max = max(float(r_min), r_max_frac * min(H, W))
    r = torch.round(r_min + s_t.clamp(0.0, 1.0) * (r_max - r_min))
    return r.clamp(min=1).long()


class PerceptionPairs(NamedTuple):
    """Output of :func:`perception_pairs` (all ``[P]``, on the input's device)."""

    q: Tensor  # long [P]: flat index (y * W + x) of the partner pixel of each anchor
    sim: Tensor  # bool [P]: similar in depth AND colour -> pulled together
    dis: Tensor  # bool [P]: dissimilar in depth AND colour -> pushed apart
    radius: Tensor  # long [P]: window radius r(s_p) used
    theta_d: Tensor  # float [P]: depth threshold (normalised depth units)
    theta_c: Tensor  # float [P]: colour threshold (RGB Euclidean units)


def _perception_integral(d: Tensor, image: Tensor) -> Tensor:
    """Zero-padded 2-D integral images (float64) ``[6, H + 1, W + 1]`` of ``D, D^2, R, G, B, R^2 + G^2 + B^2`` for
    ``d [H, W]`` (float64) and ``image [H, W, 3]``: the channels are written into one buffer and summed in place
    (one ``6 x (H+1) x (W+1)`` allocation, no full-image temporaries). Channels first: torch's CPU cumsum is several
    times faster along contiguous dimensions."""
    h, w = d.shape
    out = torch.empty(6, h + 1, w + 1, dtype=torch.float64, device=d.device)
    out[:, 0, :] = 0
    out[:, :, 0] = 0
    body = out[:, 1:, 1:]
    body[0].copy_(d)
    torch.mul(body[0], body[0], out=body[1])
    body[2:5].copy_(image.permute(2, 0, 1))
    torch.mul(body[2], body[2], out=body[5])
    body[5].addcmul_(body[3], body[3]).addcmul_(body[4], body[4])
    out.cumsum_(2)
    out.cumsum_(1)
    return out


def _box_sum(integral: Tensor, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    """Sums over the inclusive boxes ``[y0, y1] x [x0, x1]`` (each ``long [P]``) of ``integral [C, H+1, W+1]`` -> ``[P, C]``."""
    c, hp, wp = integral.shape
    flat = integral.reshape(c, hp * wp)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.index_select(1, yy * wp + xx)

    return (at(y1 + 1, x1 + 1) - at(y0, x1 + 1) - at(y1 + 1, x0) + at(y0, x0)).t()


def normalise_depth(depth_prior: Tensor) -> Tensor:
    """Per-image normalisation of a relative depth prior: ``(D - median(D)) / mean|D - median(D)|`` (float64).

    A constant map becomes all zeros. ``depth_prior`` must be finite, any shape.
    """
    med = depth_prior.flatten().median().double()  # an element of the map: the same value in any precision
    d = depth_prior.to(torch.float64, copy=True).sub_(med)
    mad = d.abs().mean()
    return d.div_(torch.where(mad > 0, mad, torch.ones_like(mad)))  # mad = 0 only for a constant map: d is 0 there


def perception_pairs(
    image: Tensor,
    depth_prior: Tensor,
    pix: Tensor,
    s: ScaleLike,
    radius_fn: Optional[Callable[[Tensor, int, int], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    k_depth: float = 1.0,
    k_colour: float = 1.0,
    eps: float = 1e-6,
) -> PerceptionPairs:
    """Window partners and adaptive similar/dissimilar decisions for the perception loss ``Lp`` (paper eq. 4).

    For each anchor ``p = pix[k]`` with scale ``s_k``:

    * ``r = radius_fn(s, H, W)[k]`` (default :func:`radius_px`); the window ``N(p)`` is the square of radius ``r``
      around ``p`` clamped to the image; the partner ``q`` is uniform over ``N(p) \\ {p}``.
    * Depth: ``D`` = :func:`normalise_depth` of the prior (median 0, mean absolute deviation 1 per image, so the
      thresholds are scale-free). With the window statistics ``mu_D(p) = mean_N(p) D``,
      ``sigma_D(p) = sqrt(mean_N(p) (D - mu_D)^2)``, the threshold is ``theta_d(p) = k_depth * sigma_D(p)``.
    * Colour: ``sigma_C(p) = sqrt(sum_c var_N(p)(I_c))`` (square root of the summed per-channel variance over the
      window = RMS Euclidean distance of the window's colours to their mean), ``theta_c(p) = k_colour * sigma_C(p)``.
    * ``sim = |D(p) - D(q)| < theta_d and ||I(p) - I(q)||_2 < theta_c``;
      ``dis = |D(p) - D(q)| > theta_d and ||I(p) - I(q)||_2 > theta_c``; pairs in neither are ignored by ``Lp``.
    * A cue whose window std is ``<= eps`` (a flat window) counts as *similar* for that cue (and never
      dissimilar): inside a flat window every partner has the anchor's value.

    For a window holding two flat regions with values ``a, b`` and fractions ``f, 1 - f``,
    ``sigma = |a - b| sqrt(f (1 - f)) <= |a - b| / 2``: with ``k = 1`` partners across the border are always
    dissimilar and partners on the anchor's side always similar. Window means/variances come from integral images
    (``O(HW)`` per call, independent of ``r``), evaluated at the anchors only.

    Args:
        image: ``float [H, W, 3]`` in ``[0, 1]``.
        depth_prior: ``float [H, W]`` (or ``[H, W, 1]``) relative inverse depth, finite.
        pix: ``long [P]`` anchor flat indices ``y * W + x``.
        s: float or ``float [P]`` anchor scales in ``[0, 1]``.
        radius_fn: ``(s [P], H, W) -> long [P]``; default :func:`radius_px`. Radii are clamped to ``>= 1``.
        generator: optional ``torch.Generator`` for the partner draw.
        k_depth, k_colour: threshold multipliers ``k`` (paper-style adaptive thresholds ``theta = k * sigma``).
        eps: std below which a window is flat.

    Returns:
        :class:`PerceptionPairs` ``(q, sim, dis, radius, theta_d, theta_c)``.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {tuple(getattr(image, 'shape', ()))}")
    h, w, _ = image.shape
    if h * w < 2:
        raise ValueError(f"image must have at least 2 pixels, got {h}x{w}")
    if not isinstance(depth_prior, Tensor):
        raise ValueError("depth_prior must be a tensor")
    if depth_prior.dim() == 3 and depth_prior.shape[-1] == 1:
        depth_prior = depth_prior[..., 0]
    if depth_prior.shape != (h, w):
        raise ValueError(f"depth_prior must be [H, W] = [{h}, {w}], got shape {tuple(depth_prior.shape)}")
    if not bool(torch.isfinite(depth_prior).all()):
        raise ValueError("depth_prior has non-finite values")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image has non-finite values")
    dev = image.device
    pix = _check_index(pix, h * w, "pix").to(dev)
    s_t = _broadcast_scale(s, pix.shape[0], dev)
    return _perception_pairs(image, depth_prior.to(dev), pix, s_t, radius_fn, generator, k_depth, k_colour, eps)


def _perception_pairs(image: Tensor, depth_prior: Tensor, pix: Tensor, s_t: Tensor,
                      radius_fn: Optional[Callable[[Tensor, int, int], Tensor]] = None,
                      generator: Optional[torch.Generator] = None, k_depth: float = 1.0, k_colour: float = 1.0,
                      eps: float = 1e-6) -> PerceptionPairs:
    """:func:`perception_pairs` without validation (no read-back): ``image [H, W, 3]`` and ``depth_prior [H, W]``
    finite and on one device, ``pix`` long ``[P]`` in range, ``s_t [P]`` finite (the training step's own inputs)."""
    h, w, _ = image.shape
    dev = image.device
    n = pix.shape[0]
    fn = radius_fn if radius_fn is not None else radius_px
    r = torch.as_tensor(fn(s_t, h, w), device=dev).long().reshape(-1)
    if r.shape[0] != n:
        raise ValueError(f"radius_fn returned {r.shape[0]} radii for {n} anchors")
    r = r.clamp(min=1)

    py, px = pix // w, pix % w
    y0, y1 = (py - r).clamp(min=0), (py + r).clamp(max=h - 1)
    x0, x1 = (px - r).clamp(min=0), (px + r).clamp(max=w - 1)
    ww = x1 - x0 + 1
    area = (y1 - y0 + 1) * ww  # >= 2 since r >= 1 and the image has >= 2 pixels
    # partner: uniform over the window minus the anchor
    u = _randint_below(area - 1, generator)
    a_idx = (py - y0) * ww + (px - x0)
    u = u + (u >= a_idx).long()
    qy, qx = y0 + u // ww, x0 + u % ww
    q = qy * w + qx

    d = normalise_depth(depth_prior.to(dev))
    sums = _box_sum(_perception_integral(d, image), y0, y1, x0, x1) / area[:, None].double()  # window means [P, 6]
    var_d = (sums[:, 1] - sums[:, 0] ** 2).clamp(min=0)
    var_c = (sums[:, 5] - (sums[:, 2:5] ** 2).sum(1)).clamp(min=0)  # summed channel variances
    sig_d, sig_c = var_d.sqrt(), var_c.sqrt()
    theta_d, theta_c = k_depth * sig_d, k_colour * sig_c

    dd = (d[py, px] - d[qy, qx]).abs()
    dc = (image[py, px].double() - image[qy, qx].double()).norm(dim=-1)
    flat_d, flat_c = sig_d <= eps, sig_c <= eps
    sim_d = flat_d | (dd < theta_d)
    sim_c = flat_c | (dc < theta_c)
    dis_d = ~flat_d & (dd > theta_d)
    dis_c = ~flat_c & (dc > theta_c)
    return PerceptionPairs(
        q=q,
        sim=sim_d & sim_c,
        dis=dis_d & dis_c,
        radius=r,
        theta_d=theta_d.float(),
        theta_c=theta_c.float(),
    )
