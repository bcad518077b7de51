"""Boundary-guided refinement: selection of the Gaussians to split, on hand-made scenes."""

from __future__ import annotations

import math

import torch

from pepeseg3d_ns.recon.refine import crosses_mask_boundary, major_axes, near_surface


def conic_from(sx: float, sy: float, angle: float) -> torch.Tensor:
    """Upper-triangle inverse covariance of a 2D Gaussian with std devs (sx, sy) rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, -s], [s, c]])
    cov = R @ torch.diag(torch.tensor([sx * sx, sy * sy])) @ R.T
    inv = torch.linalg.inv(cov)
    return torch.tensor([inv[0, 0], inv[0, 1], inv[1, 1]])


def test_major_axis_of_rotated_ellipse():
    conics = torch.stack([conic_from(4.0, 1.0, 0.0), conic_from(4.0, 1.0, math.pi / 2), conic_from(3.0, 0.5, math.pi / 4),
                          conic_from(2.0, 2.0, 0.3)])
    d, sigma = major_axes(conics)
    assert torch.allclose(d[0].abs(), torch.tensor([1.0, 0.0]), atol=1e-5)
    assert torch.allclose(d[1].abs(), torch.tensor([0.0, 1.0]), atol=1e-5)
    assert torch.allclose(d[2].abs(), torch.full((2,), 1 / math.sqrt(2)), atol=1e-5)
    assert torch.allclose(sigma[:3], torch.tensor([4.0, 4.0, 3.0]), atol=1e-4)
    assert abs(sigma[3].item() - 2.0) < 1e-4  # isotropic: any direction, the right size
    assert torch.allclose(d.norm(dim=-1), torch.ones(4))


def test_straddling_gaussian_crosses_inside_one_does_not():
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, :, :20] = True  # left half
    means = torch.tensor([[20.0, 20.0], [4.0, 20.0], [20.0, 20.0], [30.0, 5.0]])
    conics = torch.stack([
        conic_from(3.0, 0.5, 0.0),  # centred on the edge, long axis across it -> crosses
        conic_from(3.0, 0.5, 0.0),  # inside the mask, segment runs off the image edge -> no
        conic_from(3.0, 0.5, math.pi / 2),  # on the edge but its long axis runs along it -> no
        conic_from(2.0, 2.0, 0.0),  # entirely outside -> no
    ])
    assert crosses_mask_boundary(means, conics, masks).tolist() == [True, False, False, False]
    # several masks: crossing any one of them counts; chunking does not change the result
    more = torch.cat([torch.zeros(3, 40, 40, dtype=torch.bool), masks])
    assert crosses_mask_boundary(means, conics, more, chunk=1).tolist() == [True, False, False, False]
    assert crosses_mask_boundary(means, conics, masks[:0]).tolist() == [False] * 4


def test_near_surface_keeps_the_closest_fraction():
    rendered = torch.full((10, 10), 2.0)
    means = torch.tensor([[5.0, 5.0]] * 10 + [[50.0, 5.0]])  # the last one is outside the image
    depths = torch.tensor([2.0, 2.05, 2.5, 3.0, 4.0, 1.0, 5.0, 6.0, 7.0, 8.0, 2.0])
    radii = torch.ones(11, dtype=torch.int32)
    radii[9] = 0  # not visible
    sel = near_surface(depths, means, radii, rendered, fraction=0.25)
    assert sel.tolist() == [True, True, False, False, False, False, False, False, False, False, False]
    # far behind the surface is never among the closest
    assert not near_surface(depths, means, radii, rendered, fraction=0.5)[7]
    assert near_surface(depths, means, torch.zeros_like(radii), rendered).sum() == 0
