"""One rasterization entry point for CPU and CUDA.

:func:`rasterize` has the signature and return values of ``gsplat.rasterization`` (gsplat 1.4.0). On CUDA tensors it
calls gsplat. On CPU tensors it projects with gsplat's pure-torch projection (``gsplat.cuda._torch_impl``), builds the
tile/Gaussian intersection lists with a vectorised torch routine (:func:`isect_tiles`) and composites with our own
C++ kernel (:mod:`pepeseg3d_ns.render.cpu_backend`, analytic backward). Nothing on the CPU path imports gsplat's CUDA
backend, so a machine with ``nvcc`` but no GPU never starts gsplat's JIT CUDA build.

Camera conventions: ``viewmats`` are OpenCV world-to-camera ``[C, 4, 4]`` and ``Ks`` pinhole intrinsics ``[C, 3, 3]``
in pixels; see :mod:`pepeseg3d_ns.render.cameras` for the conversion from nerfstudio's OpenGL camera-to-world.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
_RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: RenderMode = "RGB",
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
) -> Tuple[Tensor, Tensor, Dict]:
    """Render ``N`` 3D Gaussians into ``C`` images.

    Args:
        means: ``[N, 3]`` centres in world space.
        quats: ``[N, 4]`` rotations as (w, x, y, z) quaternions, normalised internally.
        scales: ``[N, 3]`` standard deviations along the rotated axes (already exponentiated).
        opacities: ``[N]`` opacities in [0, 1] (already through the sigmoid).
        colors: ``[N, D]`` or ``[C, N, D]`` post-activation values of any channel count (e.g. RGB, 32-d features)
            when ``sh_degree`` is None; ``[N, K, 3]`` or ``[C, N, K, 3]`` SH coefficients otherwise.
        viewmats: ``[C, 4, 4]`` OpenCV world-to-camera matrices.
        Ks: ``[C, 3, 3]`` pinhole intrinsics in pixels.
        width, height: image size in pixels.
        sh_degree: SH degree to evaluate (``(sh_degree + 1) ** 2 <= K``), or None for plain colours.
        packed: forwarded to gsplat on CUDA; the CPU path is always non-packed (``info`` arrays are ``[C, N]``).
        tile_size: tile edge in pixels.
        backgrounds: ``[C, D]`` colour composited behind the Gaussians, or None (black).
        render_mode: ``"RGB"`` (colours), ``"D"`` (accumulated z-depth), ``"ED"`` (expected z-depth =
            accumulated depth / alpha), ``"RGB+D"``, ``"RGB+ED"`` (depth appended as the last channel).
        absgrad: also accumulate ``|dL/dmeans2d|`` per pixel into ``info["means2d"].absgrad`` (splatfacto's
            densification criterion).
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (opacity compensation for the 2D blur ``eps2d``).

    Returns:
        ``render [C, H, W, D']``, ``alphas [C, H, W, 1]`` and the ``info`` dict that gsplat's ``DefaultStrategy``
        reads: ``means2d [C, N, 2]`` (keeps its gradient), ``radii [C, N]``, ``depths [C, N]``, ``conics``,
        ``opacities``, ``width``, ``height``, ``n_cameras``, ``tile_size``, ``tile_width``, ``tile_height``,
        ``isect_ids``, ``flatten_ids``, ``isect_offsets``, ``camera_ids``/``gaussian_ids`` (None when non-packed).
    """
    if render_mode not in _RENDER_MODES:
        raise ValueError(f"render_mode must be one of {_RENDER_MODES}, got {render_mode!r}")
    if means.shape[0] == 0:
        raise ValueError(
            "rasterize() got zero Gaussians: the model has no Gaussians left (all were pruned, or the initial "
            "point cloud is empty). Check the scene's point cloud or lower the culling thresholds."
        )
    if means.is_cuda:
        from gsplat.rendering import rasterization  # CUDA path: gsplat's fused kernels

        return rasterization(
            means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats,
            Ks=Ks, width=width, height=height, near_plane=near_plane, far_plane=far_plane,
            radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=packed, tile_size=tile_size,
            backgrounds=backgrounds, render_mode=render_mode, absgrad=absgrad, rasterize_mode=rasterize_mode,
        )
    return _rasterize_cpu(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        radius_clip, eps2d, sh_degree, tile_size, backgrounds, render_mode, absgrad, rasterize_mode,
    )


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` from (w, x, y, z) quaternions ``[..., 4]`` (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    compensations: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """EWA projection of 3D Gaussians into pinhole cameras, numerically as gsplat 1.4.0's projection.

    Args:
        means ``[N, 3]``, quats ``[N, 4]`` (w, x, y, z; normalised here), scales ``[N, 3]`` (std devs),
        viewmats ``[C, 4, 4]`` OpenCV world-to-camera, Ks ``[C, 3, 3]`` pixels.

    Returns:
        ``radii [C, N] int32`` (3-sigma pixel radius, 0 = culled: behind ``near_plane``, beyond ``far_plane``,
        outside the image or ``<= radius_clip``), ``means2d [C, N, 2]`` pixels, ``depths [C, N]`` camera z,
        ``conics [C, N, 3]`` (upper triangle of the inverse 2D covariance after adding ``eps2d``) and
        ``compensations [C, N]`` (``sqrt(det(cov2d) / det(cov2d + eps2d))``, for antialiasing) or None.

    Written with elementwise ops and small matmuls; gsplat's reference ``_torch_impl`` uses 3-operand einsums
    that take ~1 s for 50k Gaussians on 2 CPU cores. One numerical difference: the 2D determinant is a sum of
    squares (``|a0 x a1|^2 + eps2d * trace + eps2d^2``), not gsplat's ``c00 * c11 - c01^2``, which cancels in
    float32 for a thin Gaussian seen edge-on near the camera (it came out <= 0 and was clamped to 1e-10: conics
    ~1e19, gradients ~1e16 and, in the garden scene, NaN). Elsewhere the two agree to rounding.
    """
    rot = viewmats[:, None, :3, :3]  # [C, 1, 3, 3]
    m = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3]: covariance = m m^T
    cam_m = rot @ m[None]  # [C, N, 3, 3]
    pts = means[None] @ viewmats[:, :3, :3].transpose(1, 2) + viewmats[:, None, :3, 3]  # [C, N, 3]
    tx, ty, tz = pts.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # Jacobian evaluated at a point clamped to 1.3x the field of view, as gsplat does
    lim_xp = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_xn = cx / fx + 0.3 * (0.5 * width / fx)
    lim_yp = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_yn = cy / fy + 0.3 * (0.5 * height / fy)
    jx = tz * torch.clamp(tx / tz, min=-lim_xn, max=lim_xp)
    jy = tz * torch.clamp(ty / tz, min=-lim_yn, max=lim_yp)
    inv_z = 1.0 / tz
    # rows of J @ (R_cam M): [C, N, 3] each
    a0 = (fx * inv_z)[..., None] * cam_m[..., 0, :] - (fx * jx * inv_z * inv_z)[..., None] * cam_m[..., 2, :]
    a1 = (fy * inv_z)[..., None] * cam_m[..., 1, :] - (fy * jy * inv_z * inv_z)[..., None] * cam_m[..., 2, :]
    c00 = (a0 * a0).sum(-1)
    c01 = (a0 * a1).sum(-1)
    c11 = (a1 * a1).sum(-1)
    # det(cov2d) = c00 c11 - c01^2 = |a0 x a1|^2 (Lagrange's identity): a sum of squares, where the difference
    # cancels catastrophically in float32 when cov2d is nearly rank 1 and large (a thin Gaussian seen edge-on close
    # to the camera); and det(cov2d + eps2d I) = det(cov2d) + eps2d (c00 + c11) + eps2d^2, all terms >= 0.
    cross = torch.linalg.cross(a0, a1, dim=-1)
    det_orig = (cross * cross).sum(-1)
    det = (det_orig + eps2d * (c00 + c11) + eps2d * eps2d).clamp(min=1e-10)
    c00 = c00 + eps2d
    c11 = c11 + eps2d
    comp = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if compensations else None
    conics = torch.stack([c11 / det, -c01 / det, c00 / det], dim=-1)
    means2d = torch.stack([fx * tx * inv_z + cx, fy * ty * inv_z + cy], dim=-1)
    with torch.no_grad():
        b = 0.5 * (c00 + c11)
        radius = torch.ceil(3.0 * torch.sqrt(b + torch.sqrt(torch.clamp(b * b - det, min=0.01))))
        valid = (det > 0) & (tz > near_plane) & (tz < far_plane)
        mx, my = means2d[..., 0], means2d[..., 1]
        valid &= (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        if radius_clip > 0:
            valid &= radius > radius_clip
        radii = torch.where(valid, radius, torch.zeros_like(radius)).int()
    return radii, means2d, tz, conics, comp


@torch.no_grad()
def isect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tile/Gaussian intersection lists, sorted by (camera, tile, depth), like gsplat's ``isect_tiles``.

    Args:
        means2d: ``[C, N, 2]`` projected centres in pixels.
        radii: ``[C, N]`` integer pixel radii; 0 means culled.
        depths: ``[C, N]`` camera-space z (positive for every Gaussian with radius > 0).
        tile_size, tile_width, tile_height: tile edge in pixels and the tile grid size.

    Returns:
        ``tiles_per_gauss [C, N] int32``, ``isect_ids [M] int64`` (gsplat's packing ``(camera << tile_bits | tile) << 32 | depth bits``),
        ``flatten_ids [M] int32`` (``camera * N + gaussian``) and ``isect_offsets [C, tile_height, tile_width] int32``.
    """
    C, N = means2d.shape[:2]
    device = means2d.device
    n_tiles = tile_width * tile_height
    tile_xy = means2d.detach() / tile_size
    tile_r = (radii.float() / tile_size)[..., None]
    lo = torch.floor(tile_xy - tile_r).long()
    hi = torch.ceil(tile_xy + tile_r).long()
    limits = torch.tensor([tile_width, tile_height], device=device)
    lo = torch.minimum(lo.clamp(min=0), limits)
    hi = torch.minimum(hi.clamp(min=0), limits)
    extent = hi - lo  # [C, N, 2]
    counts = (extent[..., 0] * extent[..., 1]) * (radii > 0)
    counts_flat = counts.reshape(-1)
    n_isects = int(counts_flat.sum())
    if n_isects == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return (
            counts.int(), empty, empty.int(),
            torch.zeros(C, tile_height, tile_width, dtype=torch.int32, device=device),
        )
    owner = torch.repeat_interleave(torch.arange(C * N, device=device), counts_flat)  # [M] flat c*N+n
    starts = torch.cumsum(counts_flat, 0) - counts_flat
    local = torch.arange(n_isects, device=device) - starts[owner]
    ext_x = extent.reshape(-1, 2)[owner, 0]
    lo_flat = lo.reshape(-1, 2)[owner]
    tx = lo_flat[:, 0] + local % ext_x
    ty = lo_flat[:, 1] + local // ext_x
    cam = owner // N
    tile_id = ty * tile_width + tx
    tile_key = cam * n_tiles + tile_id  # dense (camera, tile) index
    tile_n_bits = n_tiles.bit_length()  # gsplat's packing: camera | tile | depth
    # Positive float32 depths order like their int32 bit patterns.
    depth_bits = depths.detach().float().clamp(min=0).contiguous().view(torch.int32).reshape(-1)[owner].long()
    isect_ids = (((cam << tile_n_bits) | tile_id) << 32) | depth_bits
    isect_ids, order = torch.sort(isect_ids)
    flatten_ids = owner[order].int()
    tile_counts = torch.bincount(tile_key, minlength=C * n_tiles)
    offsets = (torch.cumsum(tile_counts, 0) - tile_counts).reshape(C, tile_height, tile_width).int()
    return counts.int(), isect_ids, flatten_ids, offsets


def eval_sh_colors(means: Tensor, coeffs: Tensor, viewmats: Tensor, sh_degree: int) -> Tensor:
    """View-dependent colours ``[C, N, 3]`` from SH ``coeffs [N, K, 3]`` or ``[C, N, K, 3]`` (gsplat's +0.5 offset
    and clamp at 0 included); the view direction is from each camera centre to each Gaussian. Only the first
    ``(sh_degree + 1) ** 2`` coefficients are touched (gsplat's torch reference multiplies all ``K``)."""
    from gsplat.cuda._torch_impl import _eval_sh_bases_fast

    n_bases = (sh_degree + 1) ** 2
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = F.normalize(means[None, :, :] - campos[:, None, :], dim=-1)  # [C, N, 3]
    bases = _eval_sh_bases_fast(n_bases, dirs)  # [C, N, n_bases]
    used = coeffs[..., :n_bases, :]
    if used.dim() == 3:
        used = used[None]
    colors = (bases[..., None] * used).sum(dim=-2)
    return torch.clamp_min(colors + 0.5, 0.0)


_warned_fallback = False


def cpu_backend_name() -> str:
    """``"cpp"`` when the C++ compositing kernel is usable, else ``"torch"``. ``PEPESEG3D_CPU_BACKEND=torch``
    forces the pure-torch path (``=cpp`` makes a failed build an error instead of a fallback)."""
    choice = os.environ.get("PEPESEG3D_CPU_BACKEND", "auto").lower()
    if choice == "torch":
        return "torch"
    from . import cpu_backend

    if choice == "cpp":
        cpu_backend.load_extension()  # raises with the compiler's message
        return "cpp"
    return "cpp" if cpu_backend.is_available() else "torch"


def composite_cpu(
    means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, width: int, height: int, tile_size: int,
    isect_offsets: Tensor, flatten_ids: Tensor, backgrounds: Optional[Tensor] = None, absgrad: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians on the CPU (C++ kernel, or pure torch when it cannot be built).

    Shapes as gsplat's ``rasterize_to_pixels`` (non-packed): ``means2d [C, N, 2]``, ``conics [C, N, 3]``,
    ``colors [C, N, D]``, ``opacities [C, N]``, ``isect_offsets [C, th, tw]``, ``flatten_ids [M]``,
    ``backgrounds [C, D]``. Returns ``colors [C, H, W, D]`` and ``alphas [C, H, W, 1]``. With ``absgrad`` the
    backward pass also stores ``sum over pixels |dL/dmeans2d|`` in ``means2d.absgrad``.
    """
    global _warned_fallback
    if cpu_backend_name() == "cpp":
        from .cpu_backend import rasterize_to_pixels_cpu

        return rasterize_to_pixels_cpu(
            means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids,
            backgrounds=backgrounds, absgrad=absgrad,
        )
    from .torch_composite import rasterize_to_pixels_torch

    if not _warned_fallback and os.environ.get("PEPESEG3D_CPU_BACKEND", "auto").lower() != "torch":
        _warned_fallback = True
        warnings.warn(
            "pepeseg3d's C++ CPU rasterizer could not be built (needs g++ and ninja); using the much slower "
            "pure-torch compositing. Run `python -c 'from pepeseg3d_ns.render import cpu_backend; "
            "cpu_backend.load_extension(verbose=True)'` to see why.",
            stacklevel=3,
        )
    if absgrad and means2d.requires_grad:
        # per-pixel contributions are not separable under autograd: |sum| stands in for sum |.|
        means2d.register_hook(lambda g: setattr(means2d, "absgrad", g.abs()))
    return rasterize_to_pixels_torch(
        means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids, backgrounds
    )


def _rasterize_cpu(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, radius_clip,
    eps2d, sh_degree, tile_size, backgrounds, render_mode, absgrad, rasterize_mode,
):
    N = means.shape[0]
    C = viewmats.shape[0]
    if sh_degree is None:
        if not ((colors.dim() == 2 and colors.shape[0] == N) or (colors.dim() == 3 and colors.shape[:2] == (C, N))):
            raise ValueError(f"colors must be [N, D] or [C, N, D] with N={N}, C={C}; got {tuple(colors.shape)}")
    elif colors.shape[-1] != 3 or colors.shape[-2] < (sh_degree + 1) ** 2:
        raise ValueError(f"SH colors must be [(C,) N, K>={(sh_degree + 1) ** 2}, 3], got {tuple(colors.shape)}")

    radii, means2d, depths, conics, comp = project_gaussians(
        means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        compensations=rasterize_mode == "antialiased",
    )
    opacities_c = opacities[None, :].expand(C, N)
    if comp is not None:
        opacities_c = opacities_c * comp

    if sh_degree is None:
        colors_c = colors.expand(C, N, colors.shape[-1]) if colors.dim() == 2 else colors
    else:
        colors_c = eval_sh_colors(means, colors, viewmats, sh_degree)

    if render_mode in ("RGB+D", "RGB+ED"):
        colors_c = torch.cat([colors_c, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors_c = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)

    tile_width = math.ceil(width / tile_size)
    tile_height = math.ceil(height / tile_size)
    tiles_per_gauss, isect_ids, flatten_ids, isect_offsets = isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height
    )
    render, alphas = composite_cpu(
        means2d, conics, colors_c.contiguous(), opacities_c.contiguous(), width, height, tile_size,
        isect_offsets, flatten_ids, backgrounds=backgrounds, absgrad=absgrad,
    )
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    info = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities_c,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": tiles_per_gauss,
        "isect_ids": isect_ids,
        "flatten_ids": flatten_ids,
        "isect_offsets": isect_offsets,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
    }
    return render, alphas, info
