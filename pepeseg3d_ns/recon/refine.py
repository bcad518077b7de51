"""Boundary-guided refinement (paper 2.1.1): which Gaussians to split. Pure functions of tensors.

A Gaussian is a split candidate in a view when the segment of its projected major axis (centre +- 3 sigma along
the largest eigenvector of its 2D covariance) crosses the boundary of one of the view's SAM masks: some points
of the segment lie inside the mask and some outside. Only the near-surface Gaussians are split: among the
Gaussians visible in the view, the ``lambda_close`` fraction with the smallest gap between their camera-space
depth ``z_k`` and the rendered depth at their pixel.

The view's masks come as per-pixel mask sets (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`): a segment
crosses the boundary of some mask exactly when its samples lie in different mask sets (two pixels in the same set
lie in the same masks; two pixels in different sets differ in at least one mask), so the test is ``n_samples``
lookups per Gaussian, whatever the number of masks, and only the Gaussians visible in the view are tested
(:func:`visible_gaussians`). :func:`crosses_mask_boundary` is the same test on dense ``[M, H, W]`` masks, kept as
the reference definition.

Conventions: pixel coordinates as gsplat's (pixel ``(u, v)`` centred at ``(u + 0.5, v + 0.5)``); ``conics`` are
the upper triangle ``(a, b, c)`` of the inverse 2D covariance, as returned by
:func:`pepeseg3d_ns.render.project_gaussians`.

Two split rules (``--pipeline.model.refine-split``): :func:`split_along_major_axis` ("symmetric", ours: two
children that keep the parent's mean and covariance) and :func:`split_at_boundary` ("boundary", the rule of the
paper's reference [4]: each child covers the part of the parent's axis on its side of the mask edge, shrunk by
that part's share and shifted to its middle).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def major_axes(conics: Tensor) -> Tuple[Tensor, Tensor]:
    """Unit direction ``[N, 2]`` and standard deviation ``[N]`` of the major axis of each 2D Gaussian.

    ``conics [N, 3]`` is the upper triangle ``(a, b, c)`` of the inverse covariance ``[[a, b], [b, c]]``. The major
    axis of the covariance is the eigenvector of the inverse with the *smallest* eigenvalue ``l``, and its
    standard deviation is ``1 / sqrt(l)``.
    """
    a, b, c = conics.unbind(-1)
    half_tr = 0.5 * (a + c)
    disc = torch.sqrt(torch.clamp(0.25 * (a - c) ** 2 + b * b, min=0.0))
    lam_min = torch.clamp(half_tr - disc, min=1e-12)
    # eigenvector of [[a, b], [b, c]] for lam_min: (b, lam_min - a) or (lam_min - c, b), whichever is better conditioned
    v1 = torch.stack([b, lam_min - a], dim=-1)
    v2 = torch.stack([lam_min - c, b], dim=-1)
    use1 = v1.norm(dim=-1) >= v2.norm(dim=-1)
    v = torch.where(use1[:, None], v1, v2)
    # isotropic Gaussians (both vectors ~0): any direction is a major axis
    v = torch.where(v.norm(dim=-1, keepdim=True) > 1e-12, v, torch.tensor([1.0, 0.0], dtype=v.dtype, device=v.device))
    return v / v.norm(dim=-1, keepdim=True), 1.0 / torch.sqrt(lam_min)


def crosses_mask_boundary(
    means2d: Tensor, conics: Tensor, masks: Tensor, n_samples: int = 7, n_sigma: float = 3.0, chunk: int = 16
) -> Tensor:
    """``bool [N]``: whether the major-axis segment of each Gaussian crosses the boundary of any mask.

    Args:
        means2d: ``[N, 2]`` pixel coordinates of the centres.
        conics: ``[N, 3]`` inverse 2D covariances (upper triangle).
        masks: ``bool [M, H, W]`` masks of the view (any order; the paper processes them small first, which does
            not change the union of crossings).
        n_samples: points sampled uniformly along ``centre +- n_sigma * sigma_major * direction``.
        chunk: masks per step (memory ``chunk * N * n_samples`` booleans).

    Samples falling outside the image are ignored: the image border is not a mask boundary.
    """
    n = means2d.shape[0]
    m, h, w = masks.shape
    if n == 0 or m == 0:
        return torch.zeros(n, dtype=torch.bool, device=means2d.device)
    pts = _axis_samples(means2d, conics, n_samples, n_sigma)  # [N, K, 2]
    px = torch.floor(pts[..., 0]).long()
    py = torch.floor(pts[..., 1]).long()
    inside_img = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = (py.clamp(0, h - 1) * w + px.clamp(0, w - 1)).reshape(-1)  # [N*K]
    crossing = torch.zeros(n, dtype=torch.bool, device=means2d.device)
    flat_masks = masks.reshape(m, -1)
    for start in range(0, m, chunk):
        hit = flat_masks[start : start + chunk][:, flat].reshape(-1, n, n_samples)
        crossing |= ((hit & inside_img).any(-1) & (~hit & inside_img).any(-1)).any(0)
    return crossing


def _axis_samples(means2d: Tensor, conics: Tensor, n_samples: int, n_sigma: float) -> Tensor:
    """``[N, n_samples, 2]`` points ``centre + t * sigma_major * direction``, ``t`` uniform in ``[-n_sigma, n_sigma]``."""
    direction, sigma = major_axes(conics)
    t = torch.linspace(-n_sigma, n_sigma, n_samples, dtype=means2d.dtype, device=means2d.device)
    return means2d[:, None, :] + t[None, :, None] * (sigma[:, None, None] * direction[:, None, :])


def _axis_set_ids(means2d: Tensor, conics: Tensor, pixel_set: Tensor, scale: float, n_samples: int,
                  n_sigma: float) -> Tuple[Tensor, Tensor]:
    """Mask-set ids ``long [K, n_samples]`` at the major-axis samples of each Gaussian (read at ``scale x`` their
    render coordinates) and ``inside bool [K, n_samples]``: whether each sample lies in the image."""
    k = means2d.shape[0]
    h, w = pixel_set.shape
    pts = _axis_samples(means2d, conics, n_samples, n_sigma) * float(scale)
    px = torch.floor(pts[..., 0]).long()
    py = torch.floor(pts[..., 1]).long()
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = (py.clamp(0, h - 1) * w + px.clamp(0, w - 1)).reshape(-1)
    return pixel_set.reshape(-1).index_select(0, flat).long().view(k, n_samples), inside


def visible_gaussians(radii: Tensor, depths: Tensor) -> Tensor:
    """long ``[K]`` indices of the Gaussians drawn in the view: projected radius ``> 0`` and camera depth ``> 0``
    (in front of the camera). ``radii``, ``depths``: ``[N]`` (gsplat's ``info["radii"][0]``, ``info["depths"][0]``).
    Reads the count back from the device (refinement steps only)."""
    return torch.nonzero((radii > 0) & (depths > 0)).flatten()


def crosses_set_boundary(
    means2d: Tensor, conics: Tensor, pixel_set: Tensor, scale: float = 1.0, n_samples: int = 7, n_sigma: float = 3.0
) -> Tensor:
    """``bool [K]``: whether the major-axis segment of each Gaussian crosses the boundary of some mask, i.e. its
    samples inside the image lie in more than one mask set.

    Args:
        means2d: ``[K, 2]`` pixel coordinates of the centres at the render resolution.
        conics: ``[K, 3]`` inverse 2D covariances (upper triangle) at the render resolution.
        pixel_set: ``int [H, W]`` mask-set id of every pixel of the masks (``PixelMasks.pixel_set`` reshaped).
        scale: mask pixels per render pixel (splatfacto's downscale factor early in training): the samples are
            looked up at ``scale x`` their render coordinates, so the masks are read at their own resolution.
        n_samples: points sampled uniformly along ``centre +- n_sigma * sigma_major * direction``.

    Samples falling outside the image are ignored: the image border is not a mask boundary. Cost ``O(K n_samples)``
    lookups, independent of the number of masks.
    """
    if means2d.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=means2d.device)
    ids, inside = _axis_set_ids(means2d, conics, pixel_set, scale, n_samples, n_sigma)
    lo = torch.where(inside, ids, torch.full_like(ids, torch.iinfo(torch.int64).max)).min(1).values
    hi = torch.where(inside, ids, torch.full_like(ids, -1)).max(1).values
    return (hi >= 0) & (lo != hi)


def near_surface(
    depths: Tensor, means2d: Tensor, radii: Tensor, rendered_depth: Tensor, fraction: float = 0.1,
    candidates: Optional[Tensor] = None, max_count: Optional[int] = None,
) -> Tensor:
    """``bool [N]``: the ``fraction`` (lambda_close) of the visible Gaussians (among ``candidates`` when given)
    whose camera depth is closest to the rendered depth at their centre pixel.

    Args:
        depths: ``[N]`` camera-space z of each Gaussian.
        means2d: ``[N, 2]`` pixel coordinates; radii ``[N]`` (0 = not visible in this view).
        rendered_depth: ``[H, W]`` expected z-depth rendered for the view.
        fraction: share of the pool to keep (at least one when the pool is not empty).
        candidates: optional ``bool [N]``: the pool is the visible candidates (pepe-recon passes the Gaussians
            crossing a mask boundary, so lambda_close applies to those, as in the paper).
        max_count: optional cap on the number kept (the nearest ones).
    """
    h, w = rendered_depth.shape
    px = torch.floor(means2d[:, 0]).long()
    py = torch.floor(means2d[:, 1]).long()
    visible = (radii > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    if candidates is not None:
        visible = visible & candidates
    out = torch.zeros_like(visible)
    n_vis = int(visible.sum())
    if n_vis == 0:
        return out
    idx = visible.nonzero(as_tuple=True)[0]
    gap = (depths[idx] - rendered_depth[py[idx], px[idx]]).abs()
    k = max(1, int(round(fraction * n_vis)))
    if max_count is not None:
        k = min(k, int(max_count))
        if k <= 0:
            return out
    keep = torch.topk(gap, k, largest=False).indices
    out[idx[keep]] = True
    return out


CHILD_OFFSET = 0.5 * 3.0**0.5  # children at +-(sqrt(3)/2) sigma with half the std: the pair keeps the parent's variance


@torch.no_grad()
def boundary_fractions(
    means2d: Tensor, conics: Tensor, pixel_set: Tensor, scale: float = 1.0, n_samples: int = 7, n_sigma: float = 3.0
) -> Tensor:
    """``float [K]`` in ``(0, 1)``: where the mask edge cuts each Gaussian's major-axis segment, as the share of the
    segment (from its ``t = -n_sigma`` end, see :func:`_axis_samples`) that lies in the mask set of its first
    sample inside the image before the set first changes. Each of the ``n_samples`` samples stands for an equal
    piece of the segment; the result is clamped to ``[1, n_samples - 1] / n_samples``. Arguments as
    :func:`crosses_set_boundary` (same samples, same lookups)."""
    if means2d.shape[0] == 0:
        return torch.zeros(0, dtype=means2d.dtype, device=means2d.device)
    ids, inside = _axis_set_ids(means2d, conics, pixel_set, scale, n_samples, n_sigma)
    first_in = torch.argmax(inside.to(torch.int8), dim=1)  # first sample inside the image
    first_id = ids.gather(1, first_in[:, None])
    # samples outside the image continue the current run (the border is not a mask edge)
    same = (ids == first_id) | ~inside
    run = torch.cumprod(same.to(torch.int64), dim=1).sum(1)
    f = run.to(means2d.dtype) / n_samples
    return f.clamp(1.0 / n_samples, (n_samples - 1.0) / n_samples)


@torch.no_grad()
def split_at_boundary(params, optimizers: dict, state: dict, mask: Tensor, fraction: Tensor, means2d: Tensor,
                      conics: Tensor, viewmat: Tensor, K: Tensor, n_sigma: float = 3.0) -> int:
    """Split the Gaussians in ``mask`` in place at the mask edge (the rule of the paper's reference [4]).

    The edge cuts the parent's ``+- n_sigma`` extent along its longest 3D axis at share ``f`` (``fraction``, from
    :func:`boundary_fractions`, measured along the 2D major axis from its ``t = -n_sigma`` end). Child A covers
    ``[-n_sigma, -n_sigma + 2 n_sigma f]`` (in parent standard deviations ``sigma`` along that axis): centre at its
    middle, std ``f sigma``; child B the rest, centre at its middle, std ``(1 - f) sigma``. Other axes, rotation,
    colour and opacity are the parent's. Which end of the 3D axis is ``t = -n_sigma`` is read from the projection
    of the axis into the view (its sign against the 2D major axis).

    Args:
        params, optimizers, state: as :func:`split_along_major_axis` (same re-indexing).
        mask: ``bool [N]``; fraction: ``float [N]`` (used where ``mask``).
        means2d, conics: ``[N, 2]``, ``[N, 3]`` projection of every Gaussian in this view (render pixels).
        viewmat: ``[4, 4]`` OpenCV world-to-camera; K: ``[3, 3]`` intrinsics at the render resolution.
    Returns the number of Gaussians split.
    """
    from pepeseg3d_ns.render.rasterize import quat_to_rotmat

    sel = torch.where(mask)[0]
    if sel.numel() == 0:
        return 0
    log_scales = params["scales"][sel].detach()
    axis = log_scales.argmax(dim=-1)
    ar = torch.arange(sel.numel(), device=sel.device)
    direction = quat_to_rotmat(params["quats"][sel].detach())[ar, :, axis]  # [S, 3] world
    sigma = log_scales[ar, axis].exp()
    mean = params["means"][sel].detach()
    # the 3D axis's image direction: camera-space derivative of the pinhole projection along it
    R, t = viewmat[:3, :3].to(mean), viewmat[:3, 3].to(mean)
    pc = mean @ R.T + t
    dc = direction @ R.T
    z = pc[:, 2:3].clamp(min=1e-6)
    fxy = torch.stack([K[0, 0], K[1, 1]]).to(mean)
    d2 = fxy * (dc[:, :2] * z - pc[:, :2] * dc[:, 2:3]) / (z * z)
    e2, _ = major_axes(conics[sel].detach().to(mean))
    sign = torch.where((d2 * e2).sum(-1) >= 0, 1.0, -1.0).to(mean)
    d = direction * sign[:, None]  # now t = -n_sigma is the -d end
    f = fraction[sel].to(mean)
    centre_a = (-n_sigma + n_sigma * f) * sigma
    centre_b = (n_sigma * f) * sigma
    scales_a, scales_b = log_scales.clone(), log_scales.clone()
    scales_a[ar, axis] += torch.log(f)
    scales_b[ar, axis] += torch.log1p(-f)
    children_means = torch.cat([mean + centre_a[:, None] * d, mean + centre_b[:, None] * d])
    return _replace_with_children(params, optimizers, state, mask, children_means,
                                  torch.cat([scales_a, scales_b]))


@torch.no_grad()
def _replace_with_children(params, optimizers: dict, state: dict, mask: Tensor, child_means: Tensor,
                           child_scales: Tensor) -> int:
    """Replace the Gaussians in ``mask`` (``S`` of them) by ``2 S`` children with the given means and log-scales
    (first children of all, then second children), other parameters copied; re-index optimizers and state the way
    gsplat's ``ops.split`` does (kept Gaussians first, then the children; new moments zero)."""
    from gsplat.strategy.ops import _update_param_with_optimizer

    sel = torch.where(mask)[0]
    rest = torch.where(~mask)[0]

    def param_fn(name: str, p: Tensor) -> Tensor:
        if name == "means":
            children = child_means.to(p)
        elif name == "scales":
            children = child_scales.to(p)
        else:
            children = torch.cat([p[sel], p[sel]])
        return torch.nn.Parameter(torch.cat([p[rest], children]))

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v[rest], torch.zeros((2 * sel.numel(), *v.shape[1:]), dtype=v.dtype, device=v.device)])

    names = [k for k in params.keys() if k in optimizers]
    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers, names)
    for k in params.keys():
        if k not in optimizers:  # parameters without an optimizer still need the new layout
            params[k] = param_fn(k, params[k])
    for k, v in state.items():
        if isinstance(v, Tensor) and v.shape[:1] == mask.shape:
            state[k] = torch.cat([v[rest], v[sel], v[sel]])
    return int(sel.numel())


@torch.no_grad()
def split_along_major_axis(params, optimizers: dict, state: dict, mask: Tensor) -> int:
    """Split the Gaussians in ``mask`` in place, each into two children along its longest 3D axis.

    Children sit at ``mean +- (sqrt(3)/2) * s * axis`` with the std dev along that axis halved (``s / 2``), the
    other axes, rotation, colour and opacity unchanged. The pair then has the parent's mean and covariance.
    Parameters are log-scales and (w, x, y, z) quaternions, as in splatfacto's ``gauss_params``. The longest 3D
    axis is the one that usually projects to the 2D major axis that triggered the split; choosing per view is
    a possible refinement.

    ``params`` (a ParameterDict of ``[N, ...]`` tensors), the per-parameter ``optimizers`` (Adam moments) and the
    strategy's running ``state`` tensors are re-indexed the way gsplat's ``ops.split`` does: the kept Gaussians
    first, then the children. New moments are zero. Returns the number of Gaussians split.
    """
    from pepeseg3d_ns.render.rasterize import quat_to_rotmat

    sel = torch.where(mask)[0]
    if sel.numel() == 0:
        return 0
    log_scales = params["scales"][sel].detach()
    axis = log_scales.argmax(dim=-1)  # [S]
    rot = quat_to_rotmat(params["quats"][sel].detach())  # [S, 3, 3], columns = local axes in world
    ar = torch.arange(sel.numel(), device=sel.device)
    direction = rot[ar, :, axis]  # [S, 3]
    sigma = log_scales[ar, axis].exp()  # [S]
    offset = (CHILD_OFFSET * sigma)[:, None] * direction
    child_scales = log_scales.clone()
    child_scales[ar, axis] -= torch.log(torch.tensor(2.0, dtype=log_scales.dtype, device=log_scales.device))
    mean = params["means"][sel].detach()
    return _replace_with_children(params, optimizers, state, mask, torch.cat([mean + offset, mean - offset]),
                                  torch.cat([child_scales, child_scales]))
