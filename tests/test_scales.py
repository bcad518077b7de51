"""Mask scales on hand-made geometry whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pepeseg3d_ns.priors.scales import ScaleMap, backproject, depth_inliers, mask_sizes, remove_isolated_pixels


def square_view(res: int, side: float = 0.6, depth: float = 2.0, f_scale: float = 1.0):
    """A fronto-parallel square of ``side`` metres centred on the optical axis at z = ``depth``, seen by a
    ``res`` px camera with focal length ``res * f_scale``; background at z = 10. Returns mask, depth, K."""
    f = res * f_scale
    K = torch.tensor([[f, 0, res / 2], [0, f, res / 2], [0, 0, 1.0]], dtype=torch.float64)
    u = torch.arange(res, dtype=torch.float64) + 0.5
    x = (u - res / 2) / f * depth  # metric coordinate of each pixel centre on the square's plane
    inside_1d = x.abs() < side / 2
    mask = inside_1d[:, None] & inside_1d[None, :]
    z = torch.where(mask, torch.full((res, res), depth, dtype=torch.float64), torch.full((res, res), 10.0, dtype=torch.float64))
    return mask, z, K


def test_backproject_pixel_centres():
    K = torch.tensor([[100.0, 0, 50], [0, 200.0, 25], [0, 0, 1]])
    pts = backproject(torch.full((50, 100), 2.0), K)
    assert pts.shape == (50, 100, 3)
    torch.testing.assert_close(pts[25, 50], torch.tensor([0.5 / 100 * 2, 0.5 / 200 * 2, 2.0]))
    torch.testing.assert_close(pts[0, 0], torch.tensor([(0.5 - 50) / 100 * 2, (0.5 - 25) / 200 * 2, 2.0]))


def test_planar_square_has_expected_size():
    side = 0.6
    mask, depth, K = square_view(128, side=side)
    size = mask_sizes(mask[None], depth, K)[0].item()
    # uniform square: std along each in-plane axis = side / sqrt(12), zero along z
    expected = 2 * math.sqrt(2 * side**2 / 12)
    assert size == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("low_res, tol", [(128, 0.03), (64, 0.05)])
def test_size_invariant_to_downscaling(low_res, tol):
    """Same square at 256 px and at 2x / 4x fewer pixels: sizes agree up to pixel discretisation (the square
    is 77 px wide at 256 px but only 19-20 px at 64 px, where whole pixels add ~4 % to its extent)."""
    mask, depth, K = square_view(256)
    full = mask_sizes(mask[None], depth, K)[0]
    mask, depth, K = square_view(low_res)
    small = mask_sizes(mask[None], depth, K)[0]
    assert small.item() == pytest.approx(full.item(), rel=tol)


def test_isolated_boundary_pixels_do_not_count():
    mask, depth, K = square_view(96)
    clean = mask_sizes(mask[None], depth, K)[0]
    noisy = mask.clone()
    noisy[2, 2] = True  # a stray pixel on the background, 8 m further away
    noisy[5, 40:42] = True  # a 2-pixel spur
    assert remove_isolated_pixels(noisy[None])[0, 2, 2].item() is False
    torch.testing.assert_close(mask_sizes(noisy[None], depth, K)[0], clean)
    # without either clean-up the stray pixels would inflate the size a lot; the depth-outlier step alone
    # (min_neighbors=0) also removes them, since they lie 8 m behind the square
    assert mask_sizes(noisy[None], depth, K, min_neighbors=0, outlier_k=None)[0] > 1.5 * clean
    assert mask_sizes(noisy[None], depth, K, min_neighbors=0)[0] == pytest.approx(clean.item(), rel=0.02)


def test_mask_bleeding_onto_the_background_keeps_the_object_size():
    """A mask dilated by 3 px past the square's border takes a ring of background 8 m behind: the ring (32 % of
    the mask's pixels) is dropped as depth outliers, so the size stays within 15 % of the clean mask's (the ring's
    in-plane extent is gone with it); with the depth-outlier step off it is several times larger."""
    mask, depth, K = square_view(96)
    clean = mask_sizes(mask[None], depth, K)[0]
    bled = torch.nn.functional.max_pool2d(mask[None, None].float(), 7, stride=1, padding=3)[0, 0] > 0
    assert 0.25 < float((bled & ~mask).sum() / bled.sum()) < 0.4
    robust = mask_sizes(bled[None], depth, K)[0]
    assert robust == pytest.approx(clean.item(), rel=0.15)
    assert mask_sizes(bled[None], depth, K, outlier_k=None)[0] > 4 * clean


def test_depth_inliers_keep_continuous_depth_and_flat_masks():
    """A ramp of depths (a plane seen at a grazing angle) loses nothing; a flat mask (MAD 0) keeps everything
    within 1 % of its depth and drops a pixel 50 % behind."""
    ramp = torch.linspace(1.0, 4.0, 200)
    sel = torch.ones(1, 200, dtype=torch.bool)
    assert depth_inliers(sel, ramp).all()
    flat = torch.full((200,), 2.0)
    flat[7] = 2.01
    flat[9] = 3.0
    keep = depth_inliers(sel, flat)[0]
    assert keep.sum() == 199 and not keep[9] and keep[7]
    # rows are independent and pixels outside a row's mask stay out
    two = torch.stack([sel[0], torch.arange(200) < 100])
    out = depth_inliers(two, flat)
    assert out[1, 100:].sum() == 0 and out[1, :100].sum() == 99


def test_invalid_depth_and_tiny_masks():
    mask, depth, K = square_view(64)
    valid = torch.ones_like(mask)
    valid[:, :32] = False  # left half has no depth
    half = mask_sizes(mask[None], depth, K, valid=valid)[0]
    full = mask_sizes(mask[None], depth, K)[0]
    assert half < full  # only the right half of the square counts
    one_px = torch.zeros(1, 64, 64, dtype=torch.bool)
    one_px[0, 10, 10] = True
    assert torch.isnan(mask_sizes(one_px, depth, K)[0])
    with pytest.raises(ValueError, match="resize"):
        mask_sizes(mask[None], depth[:32], K)


def test_sizes_chunked_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 32, 32, generator=g) > 0.3
    depth = 1 + torch.rand(32, 32, generator=g, dtype=torch.float64)
    K = torch.tensor([[30.0, 0, 16], [0, 30.0, 16], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(mask_sizes(masks, depth, K, chunk=7), mask_sizes(masks, depth, K, chunk=64))


def test_scale_map_is_the_empirical_cdf():
    sizes = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0])
    smap = ScaleMap.fit(sizes)
    s = smap(sizes)
    assert s[0].item() == pytest.approx(0.0) and s[-1].item() == pytest.approx(1.0)
    assert s[4].item() == pytest.approx(0.5)
    assert torch.all(s[1:] >= s[:-1])
    # outside the fitted range: clamped; NaN passes through; round trip through a dict
    assert smap(torch.tensor([1e-4, 50.0])).tolist() == pytest.approx([0.0, 1.0])
    assert torch.isnan(smap(torch.tensor([float("nan")])))[0]
    again = ScaleMap.from_dict(smap.to_dict())
    torch.testing.assert_close(again(sizes), s)


def test_scale_map_with_ties_and_errors():
    smap = ScaleMap.fit(np.array([0.3, 0.3, 0.3, 1.0]))
    s = smap(torch.tensor([0.3, 1.0]))
    assert s[1].item() == pytest.approx(1.0) and 0.0 <= s[0].item() <= 1.0
    const = ScaleMap.fit(np.array([0.5, 0.5]))
    assert torch.isfinite(const(torch.tensor([0.5]))).all()
    with pytest.raises(ValueError, match="finite"):
        ScaleMap.fit(np.array([np.nan]))


def test_scene_scales_order_the_synthetic_hierarchy(tmp_path):
    """With ground-truth depth and clean simulated masks, groups come out larger than their objects and
    objects larger than their parts, and one object's size agrees across views."""
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene, intrinsics, load_gt_depth, load_hierarchy
    from pepeseg3d_ns.priors.cache import PriorCache, load_image_rgb
    from pepeseg3d_ns.priors.compute import PriorImage, compute_priors
    from pepeseg3d_ns.priors.scales import SceneScales, compute_scene_scales
    from pepeseg3d_ns.priors.simulated import SimulatedDepthSource, SimulatedSamSource

    scene = generate_scene(SynthConfig(scene="tabletop", output_dir=tmp_path / "s", n_views=6, resolution=64, n_init_points=200), progress=False)
    images = [PriorImage(p.stem, load_image_rgb(p)) for p in sorted((scene / "images").glob("*.png"))]
    cache = PriorCache.open(scene / "pepe_priors", create=True)
    compute_priors(cache, images, SimulatedSamSource(scene, severity=0.0, background=False), SimulatedDepthSource(scene),
                   progress=False)
    stems = [im.stem for im in images]
    masks = [cache.load(im.key).masks for im in images]
    fx, fy, cx, cy = intrinsics(64)
    K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]], dtype=torch.float64)

    def gt_depth(i):
        return torch.from_numpy(load_gt_depth(scene, stems[i])).double(), K, None

    result = compute_scene_scales(masks, [im.key for im in images], gt_depth, source={"depth": "ground truth"},
                                  progress=False)
    by_label = {}
    for i in range(len(stems)):
        labels = masks[i].meta["labels"]
        for label, size in zip(labels, result.sizes[i]):
            for name in label.split("|"):  # a mask shared by two levels counts for both
                by_label.setdefault(name, []).append(size)
    median = {k: np.nanmedian(v) for k, v in by_label.items() if np.isfinite(v).any()}
    hierarchy = load_hierarchy(scene)
    levels = ("parts", "objects", "groups")
    for child, parent in zip(levels[:-1], levels[1:]):
        pairs = [
            (median[f"{child}:{e['id']}"], median[f"{parent}:{e['parent']}"])
            for e in hierarchy[child]
            if e["id"] != 0 and f"{child}:{e['id']}" in median and f"{parent}:{e['parent']}" in median
        ]
        assert len(pairs) >= 4, (child, pairs)
        assert np.mean([c <= p * 1.02 for c, p in pairs]) >= 0.9, (child, pairs)
        assert np.mean([c < p for c, p in pairs]) >= 0.5, (child, pairs)
    table = [np.array(v) for k, v in by_label.items() if k.startswith("objects") and len(v) >= 3]
    assert table, "some object should be seen in 3+ views"
    spreads = [np.nanstd(v) / np.nanmean(v) for v in table]
    assert np.median(spreads) < 0.35
    state = result.to_state()  # what the pepe-contrast checkpoint stores
    again = SceneScales.from_state(torch.load(_round_trip(state, tmp_path), weights_only=True))
    assert again.keys == result.keys and again.source == result.source
    for i in range(len(stems)):
        np.testing.assert_allclose(again.sizes[i], result.sizes[i])
        np.testing.assert_allclose(again.scales(i), result.scales(i))


def _round_trip(obj, folder):
    path = folder / "state.pt"
    torch.save(obj, path)
    return path
