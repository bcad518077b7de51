"""Boundary-guided refinement: selection of the Gaussians to split, on hand-made scenes."""

from __future__ import annotations

import math

import pytest
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


def _render(params, res=64):
    from pepeseg3d_ns.render import rasterize

    K = torch.tensor([[[60.0, 0, res / 2], [0, 60.0, res / 2], [0, 0, 1]]])
    img, _, _ = rasterize(params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]).squeeze(-1),
                          torch.ones(params["means"].shape[0], 1), torch.eye(4)[None], K, res, res)
    return img[0, ..., 0]


def test_split_children_cover_the_parent_and_reindex_optimizer_state():
    from pepeseg3d_ns.recon.refine import split_along_major_axis

    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.tensor([[0.0, 0.0, 3.0], [0.6, 0.6, 3.0]])),
        "scales": torch.nn.Parameter(torch.log(torch.tensor([[0.25, 0.05, 0.05], [0.05, 0.05, 0.05]]))),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])),
        "opacities": torch.nn.Parameter(torch.logit(torch.tensor([[0.2], [0.2]]))),
        "features_dc": torch.nn.Parameter(torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])),
    })
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    for p in params.values():  # one optimizer step so Adam has moments to re-index
        p.grad = torch.ones_like(p)
    for o in optimizers.values():
        o.step()
    state = {"grad2d": torch.tensor([5.0, 7.0]), "count": torch.tensor([1.0, 2.0])}
    parent_mean = params["means"][0].detach().clone()
    parent_scales = params["scales"][0].detach().exp()
    kept_mean = params["means"][1].detach().clone()
    before = _render(params)
    n = split_along_major_axis(params, optimizers, state, torch.tensor([True, False]))
    assert n == 1 and params["means"].shape == (3, 3)
    # kept Gaussian first, then the two children along x (the longest axis), half the std there
    assert torch.equal(params["means"][0], kept_mean)
    offset = parent_scales[0] * math.sqrt(3) / 2
    c1, c2 = params["means"][1].detach(), params["means"][2].detach()
    assert torch.allclose((c1 + c2) / 2, parent_mean, atol=1e-6)  # symmetric about the parent
    assert (c1 - c2).norm().item() == pytest.approx(2 * offset.item(), rel=1e-5)
    assert abs((c1 - c2)[0].item()) > 0.99 * (c1 - c2).norm().item()  # along the longest (x) axis
    expected_scales = parent_scales * torch.tensor([0.5, 1.0, 1.0])
    assert torch.allclose(params["scales"][1:].exp(), expected_scales.expand(2, 3), atol=1e-6)
    assert torch.equal(params["features_dc"][1], params["features_dc"][2])
    assert state["grad2d"].tolist() == [7.0, 5.0, 5.0]
    for k, p in params.items():
        st = optimizers[k].state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg"][1:].abs().sum() == 0 and st["exp_avg"][0].abs().sum() > 0
        assert optimizers[k].param_groups[0]["params"][0] is p
    after = _render(params)
    # the pair keeps the parent's mass, centre and spread; pixel-wise it differs only in the profile's shape
    xs = torch.arange(64.0) + 0.5
    for img in (before, after):
        assert img.sum() > 1
    assert after.sum().item() == pytest.approx(before.sum().item(), rel=0.05)
    mean_b = (before.sum(0) * xs).sum() / before.sum()
    mean_a = (after.sum(0) * xs).sum() / after.sum()
    assert abs(mean_a - mean_b) < 0.3
    var_b = (before.sum(0) * (xs - mean_b) ** 2).sum() / before.sum()
    var_a = (after.sum(0) * (xs - mean_a) ** 2).sum() / after.sum()
    assert var_a.item() == pytest.approx(var_b.item(), rel=0.08)
    # two half-width children 1.7 sigma apart make a two-humped profile: pixel-wise they differ from the parent
    # by about a third of its mass (0.32 here), while mass, centre and spread match
    assert (after - before).abs().sum() / before.sum() < 0.35


def test_near_surface_fraction_applies_to_the_candidates():
    """lambda_close picks among the Gaussians crossing a boundary, not among all visible ones."""
    n = 10
    depths = torch.arange(n, dtype=torch.float32) + 1.0  # gap to the rendered depth (1.0) = index
    means2d = torch.full((n, 2), 2.5)
    radii = torch.ones(n, dtype=torch.int32)
    rendered = torch.ones(4, 4)
    cand = torch.zeros(n, dtype=torch.bool)
    cand[5:] = True
    out = near_surface(depths, means2d, radii, rendered, fraction=0.2, candidates=cand)
    assert out.nonzero().flatten().tolist() == [5]  # 20 % of 5 candidates = 1, the nearest of them
    assert near_surface(depths, means2d, radii, rendered, fraction=0.2).nonzero().flatten().tolist() == [0, 1]
    assert not near_surface(depths, means2d, radii, rendered, 0.5, candidates=torch.zeros(n, dtype=torch.bool)).any()


def test_near_surface_max_count_caps_the_nearest():
    n = 10
    depths = torch.arange(n, dtype=torch.float32) + 1.0
    means2d = torch.full((n, 2), 2.5)
    radii = torch.ones(n, dtype=torch.int32)
    out = near_surface(depths, means2d, radii, torch.ones(4, 4), fraction=0.5, max_count=2)
    assert out.nonzero().flatten().tolist() == [0, 1]
    assert not near_surface(depths, means2d, radii, torch.ones(4, 4), fraction=0.5, max_count=0).any()


def _random_gaussians(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.rand(n, generator=g) * (w + 8) - 4, torch.rand(n, generator=g) * (h + 8) - 4], 1)
    conics = torch.stack([conic_from(0.3 + 3 * float(torch.rand(1, generator=g)), 0.3 + float(torch.rand(1, generator=g)),
                                     float(torch.rand(1, generator=g)) * math.pi) for _ in range(n)])
    return means, conics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_boundary_test_equals_the_dense_one(seed):
    """Samples in different mask sets <=> the segment crosses the boundary of some mask (random nested masks,
    segments running off the image, pixels in no mask)."""
    from pepeseg3d_ns.priors.pixel_masks import PixelMasks
    from pepeseg3d_ns.recon.refine import crosses_set_boundary
    from test_pixel_masks import random_masks

    masks, _, _ = random_masks(seed, h=30, w=40, m=35)
    pm = PixelMasks.from_dense(masks)
    means, conics = _random_gaussians(600, 30, 40, seed)
    dense = crosses_mask_boundary(means, conics, masks)
    got = crosses_set_boundary(means, conics, pm.pixel_set.view(30, 40))
    assert torch.equal(got, dense)
    assert 50 < int(dense.sum()) < 550  # both outcomes are well represented
    # a baseline that ignores the masks (all one set) crosses nothing
    assert not crosses_set_boundary(means, conics, torch.zeros(30, 40, dtype=torch.int32)).any()


def test_set_boundary_at_a_downscaled_render_reads_the_full_resolution_masks():
    """Rendered at 1/2 resolution, the samples are looked up at twice their coordinates: the same answer as the
    dense test of the same Gaussians expressed in full-resolution pixels."""
    from pepeseg3d_ns.priors.pixel_masks import PixelMasks
    from pepeseg3d_ns.recon.refine import crosses_set_boundary
    from test_pixel_masks import random_masks

    masks, _, _ = random_masks(4, h=32, w=40, m=30)
    pm = PixelMasks.from_dense(masks)
    means, conics = _random_gaussians(500, 16, 20, 4)  # render-resolution coordinates
    got = crosses_set_boundary(means, conics, pm.pixel_set.view(32, 40), scale=2.0)
    assert torch.equal(got, crosses_mask_boundary(means * 2, conics / 4, masks))
    assert not torch.equal(got, crosses_set_boundary(means, conics, pm.pixel_set.view(32, 40)))  # scale matters


def test_only_visible_gaussians_are_tested():
    from pepeseg3d_ns.recon.refine import visible_gaussians

    radii = torch.tensor([3, 0, 2, 5, 1], dtype=torch.int32)
    depths = torch.tensor([2.0, 2.0, -1.0, 0.5, 0.0])
    assert visible_gaussians(radii, depths).tolist() == [0, 3]


def _edge_scene(direction_sign: float = 1.0):
    """One Gaussian 2 units in front of an identity camera (f = 100 px, 64x64, centre 32), longest axis along world
    x (std 0.1 -> 5 px); its second row is a small far-away Gaussian that is not split. Pixel sets: 0 left of
    u = 34.5, 1 right of it (the edge 2.5 px right of the centre)."""
    import importlib

    R = importlib.import_module("pepeseg3d_ns.render.rasterize")
    quat = [1.0, 0, 0, 0] if direction_sign > 0 else [0.0, 0, 0, 1.0]  # 180 deg about z flips the local x axis
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.tensor([[0.0, 0.0, 2.0], [0.5, 0.5, 4.0]])),
        "scales": torch.nn.Parameter(torch.log(torch.tensor([[0.1, 0.01, 0.01], [0.01, 0.01, 0.01]]))),
        "quats": torch.nn.Parameter(torch.tensor([quat, [1.0, 0, 0, 0]])),
        "opacities": torch.nn.Parameter(torch.logit(torch.tensor([[0.5], [0.5]]))),
    })
    viewmat = torch.eye(4)
    K = torch.tensor([[100.0, 0, 32.0], [0, 100.0, 32.0], [0, 0, 1.0]])
    _, means2d, _, conics, _ = R.project_gaussians(params["means"].detach(), params["quats"].detach(),
                                                   params["scales"].detach().exp(), viewmat[None], K[None], 64, 64)
    pixel_set = torch.zeros(64, 64, dtype=torch.int32)
    pixel_set[:, 35:] = 1
    return params, viewmat, K, means2d[0], conics[0], pixel_set


@pytest.mark.parametrize("direction_sign", [1.0, -1.0])
def test_boundary_split_children_sit_on_their_side_of_the_edge(direction_sign):
    """The paper's [4] rule: the edge 2.5 px right of the centre of a 5 px-sigma Gaussian cuts its 7 axis samples
    4 | 3 (or 3 | 4 from the other end); each child covers its side, shrunk by its share, and projects there; the
    two children span exactly the parent's +-3 sigma. The symmetric rule (our default) puts both at +-0.87 sigma
    whatever the edge."""
    import importlib

    from pepeseg3d_ns.recon.refine import boundary_fractions, split_at_boundary

    R = importlib.import_module("pepeseg3d_ns.render.rasterize")
    params, viewmat, K, means2d, conics, pixel_set = _edge_scene(direction_sign)
    f = boundary_fractions(means2d, conics, pixel_set)
    assert f[0].item() in (pytest.approx(4 / 7), pytest.approx(3 / 7))
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    n = split_at_boundary(params, optimizers, {}, torch.tensor([True, False]), f, means2d, conics, viewmat, K)
    assert n == 1 and params["means"].shape[0] == 3
    kids_x = params["means"][1:, 0].detach()
    kids_sx = params["scales"][1:, 0].detach().exp()
    # the children's +-3 sigma supports tile the parent's [-0.3, 0.3] with no gap or overlap
    lo, hi = kids_x - 3 * kids_sx, kids_x + 3 * kids_sx
    order = torch.argsort(kids_x)
    assert lo[order[0]].item() == pytest.approx(-0.3, abs=1e-5) and hi[order[1]].item() == pytest.approx(0.3, abs=1e-5)
    assert hi[order[0]].item() == pytest.approx(lo[order[1]].item(), abs=1e-5)
    # the cut lies at the edge's sample bin: world x of the boundary is 4/7 of the way from -0.3 (u = 32 + 100 x / 2)
    assert hi[order[0]].item() == pytest.approx(-0.3 + 0.6 * 4 / 7, abs=1e-5)
    # each child's centre projects into the pixel set of its side
    _, m2d, _, _, _ = R.project_gaussians(params["means"][1:].detach(), params["quats"][1:].detach(),
                                          params["scales"][1:].detach().exp(), viewmat[None], K[None], 64, 64)
    u = m2d[0, :, 0]
    assert set(pixel_set[32, u.long()].tolist()) == {0, 1}
    # the symmetric split, for contrast, ignores where the edge is
    from pepeseg3d_ns.recon.refine import split_along_major_axis

    p2, *_ = _edge_scene(direction_sign)
    split_along_major_axis(p2, {k: torch.optim.Adam([p], lr=1e-3) for k, p in p2.items()}, {},
                           torch.tensor([True, False]))
    assert sorted(p2["means"][1:, 0].abs().tolist()) == pytest.approx([0.1 * 3 ** 0.5 / 2] * 2, abs=1e-6)
