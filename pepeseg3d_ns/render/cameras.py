"""Camera conventions, converted in exactly one place.

* nerfstudio stores **camera-to-world** matrices in the **OpenGL** convention: the camera looks down its
  ``-z`` axis, ``+y`` points up and ``+x`` right.
* gsplat (and our CPU rasterizer) take **world-to-camera** ``viewmats`` in the **OpenCV** convention: the camera
  looks down ``+z``, ``+y`` points down and ``+x`` right. Pixel ``(u, v)`` has its centre at ``(u + 0.5, v + 0.5)``.

Everything in this package that renders converts with :func:`viewmat_from_c2w` and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Flipping y and z turns an OpenGL camera frame into an OpenCV one (and back: the flip is its own inverse).
_GL_TO_CV = (1.0, -1.0, -1.0)


def viewmat_from_c2w(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[C, 3, 4]`` or ``[C, 4, 4]`` -> OpenCV world-to-camera ``[C, 4, 4]``.

    The inverse is analytic (``R^T``, ``-R^T t``) and deliberately not ``torch.compile``d: nerfstudio's
    compiled ``get_viewmat`` stalls for tens of seconds on the first CPU call.
    Gradients flow to ``c2w`` (camera pose optimisation uses that).
    """
    if c2w.dim() != 3 or c2w.shape[-2] not in (3, 4) or c2w.shape[-1] != 4:
        raise ValueError(f"c2w must be [C, 3, 4] or [C, 4, 4], got {tuple(c2w.shape)}")
    flip = torch.tensor(_GL_TO_CV, device=c2w.device, dtype=c2w.dtype)
    rot = c2w[:, :3, :3] * flip  # columns scaled: camera axes y, z flipped
    trans = c2w[:, :3, 3:4]
    rot_inv = rot.transpose(1, 2)
    viewmat = torch.zeros(c2w.shape[0], 4, 4, device=c2w.device, dtype=c2w.dtype)
    viewmat[:, :3, :3] = rot_inv
    viewmat[:, :3, 3:4] = -torch.bmm(rot_inv, trans)
    viewmat[:, 3, 3] = 1.0
    return viewmat


def c2w_from_viewmat(viewmat: Tensor) -> Tensor:
    """OpenCV world-to-camera ``[C, 4, 4]`` -> OpenGL camera-to-world ``[C, 3, 4]`` (inverse of :func:`viewmat_from_c2w`)."""
    rot_inv = viewmat[:, :3, :3]
    rot = rot_inv.transpose(1, 2)
    trans = -torch.bmm(rot, viewmat[:, :3, 3:4])
    flip = torch.tensor(_GL_TO_CV, device=viewmat.device, dtype=viewmat.dtype)
    return torch.cat([rot * flip, trans], dim=-1)
