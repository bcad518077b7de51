"""Rendering: one :func:`rasterize` for CPU (our C++ kernel) and CUDA (gsplat), and camera conversions."""

from pepeseg3d_ns.render.cameras import c2w_from_viewmat, viewmat_from_c2w
from pepeseg3d_ns.render.rasterize import isect_tiles, project_gaussians, rasterize

__all__ = ["rasterize", "project_gaussians", "isect_tiles", "viewmat_from_c2w", "c2w_from_viewmat"]
