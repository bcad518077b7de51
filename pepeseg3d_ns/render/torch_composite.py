"""Pure-torch alpha compositing (autograd backward), tile by tile.

Slower than the C++ kernel in :mod:`pepeseg3d_ns.render.cpu_backend` and memory-hungrier (it holds a
``[pixels_in_tile, gaussians_in_tile]`` matrix per tile for autograd), but it needs no compiler. It is the
fallback when the extension cannot be built, and an independent implementation the tests compare against.
Semantics are gsplat 1.4.0's ``rasterize_to_pixels``: pixel centres at ``(x + 0.5, y + 0.5)``,
``alpha = min(0.999, opacity * exp(-sigma))``, Gaussians with ``sigma < 0`` or ``alpha < 1/255`` skipped, and a
pixel stops before the Gaussian that would bring its transmittance to ``<= 1e-4``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4


def composite_pixels(pix_xy: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, colors: Tensor) -> Tuple[Tensor, Tensor]:
    """Composite ``K`` depth-sorted Gaussians over ``P`` pixels.

    Args:
        pix_xy: ``[P, 2]`` pixel centres (x, y).
        means2d: ``[K, 2]``, conics ``[K, 3]``, opacities ``[K]``, colors ``[K, D]``: front to back.

    Returns:
        ``color [P, D]`` (no background) and ``T [P]``, the transmittance left after the last used Gaussian.
    """
    d = means2d[None, :, :] - pix_xy[:, None, :]  # [P, K, 2]
    sigma = 0.5 * (conics[:, 0] * d[..., 0] ** 2 + conics[:, 2] * d[..., 1] ** 2) + conics[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(opacities[None, :] * torch.exp(-sigma), ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    trans_after = torch.cumprod(1.0 - alpha, dim=1)  # T after each Gaussian
    used = trans_after > T_MIN  # prefix mask: T only decreases
    alpha = alpha * used
    trans_before = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    weights = alpha * trans_before  # [P, K]
    color = weights @ colors
    trans_final = torch.prod(1.0 - alpha, dim=1)
    return color, trans_final


def rasterize_to_pixels_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    backgrounds: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Same inputs and outputs as :func:`pepeseg3d_ns.render.cpu_backend.rasterize_to_pixels_cpu`.

    ``means2d [C, N, 2]``, ``conics [C, N, 3]``, ``colors [C, N, D]``, ``opacities [C, N]``,
    ``isect_offsets [C, th, tw]``, ``flatten_ids [M]`` (``c * N + n``, each tile sorted by depth),
    ``backgrounds [C, D]`` or None. Returns ``render_colors [C, H, W, D]`` and ``render_alphas [C, H, W, 1]``.
    """
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    th, tw = isect_offsets.shape[1:]
    ends = torch.cat([isect_offsets.reshape(-1)[1:].long(), torch.tensor([flatten_ids.numel()])])
    starts = isect_offsets.reshape(-1).long()
    m2, cn, op, co = means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1), colors.reshape(-1, D)
    rows = []
    for c in range(C):
        tile_rows = []
        for ty in range(th):
            y0, y1 = ty * tile_size, min((ty + 1) * tile_size, image_height)
            tiles = []
            for tx in range(tw):
                x0, x1 = tx * tile_size, min((tx + 1) * tile_size, image_width)
                ys, xs = torch.meshgrid(
                    torch.arange(y0, y1, dtype=means2d.dtype), torch.arange(x0, x1, dtype=means2d.dtype), indexing="ij"
                )
                pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1) + 0.5
                t = (c * th + ty) * tw + tx
                ids = flatten_ids[starts[t] : ends[t]].long()
                if ids.numel() == 0:
                    col = colors.new_zeros(pix.shape[0], D)
                    trans = colors.new_ones(pix.shape[0])
                else:
                    col, trans = composite_pixels(pix, m2[ids], cn[ids], op[ids], co[ids])
                if backgrounds is not None:
                    col = col + trans[:, None] * backgrounds[c]
                out = torch.cat([col, (1.0 - trans)[:, None]], dim=-1)
                tiles.append(out.reshape(y1 - y0, x1 - x0, D + 1))
            tile_rows.append(torch.cat(tiles, dim=1))
        rows.append(torch.cat(tile_rows, dim=0))
    img = torch.stack(rows, dim=0)
    return img[..., :D], img[..., D:]
