"""pepe-contrast pixel/pair sampling on hand-made mask hierarchies and images whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.contrast.dense_reference import (
    active_labels,
    mask_balanced_probabilities,
    membership,
    pair_targets,
    pixel_weights,
    sample_pairs,
)
from pepeseg3d_ns.contrast.perception import normalise_depth, perception_pairs, radius_px
from pepeseg3d_ns.contrast.sampling import mask_rank

NAN = float("nan")

# A nested hierarchy on 8 sampled pixels (rows 0..7):
#   mask 0 "group"  : pixels 0..6   scale 0.9  area 70
#   mask 1 "object" : pixels 0..4   scale 0.6  area 50
#   mask 2 "part A" : pixels 0, 1   scale 0.2  area 20
#   mask 3 "part B" : pixels 2, 3   scale 0.3  area 20
#   mask 4 unknown  : pixel 7       scale NaN  area 10   (absent: pixel 7 is in no usable mask)
# pixel 4 is in the object but in no part; pixels 5, 6 are in the group only.


def _hierarchy():
    member = torch.zeros(8, 5, dtype=torch.bool)
    member[0:7, 0] = True
    member[0:5, 1] = True
    member[0:2, 2] = True
    member[2:4, 3] = True
    member[7, 4] = True
    scales = torch.tensor([0.9, 0.6, 0.2, 0.3, NAN])
    areas = torch.tensor([70.0, 50.0, 20.0, 20.0, 10.0])
    return member, scales, areas


def _pairs_from(rows):
    """Symmetric [8, 8] bool matrix with True at the listed (a, b) pairs."""
    m = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in rows:
        m[a, b] = m[b, a] = True
    return m


def _all_pairs(n=8):
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return i.flatten(), j.flatten()


def _clique(nodes):
    return [(a, b) for a in nodes for b in nodes if a < b]


def test_membership_reads_masks_at_flat_indices():
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)
    masks[0, 0, :] = True  # top row
    masks[1, :, 2] = True  # right column
    masks[2, 1, 1] = True  # pixel (1, 1)
    pix = torch.tensor([0, 2, 4, 5, 3])  # (0,0) (0,2) (1,1) (1,2) (1,0)
    expected = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(membership(masks, pix), expected)
    assert membership(masks[:0], pix).shape == (5, 0)
    with pytest.raises(ValueError, match="pix"):
        membership(masks, torch.tensor([6]))
    with pytest.raises(ValueError, match="masks"):
        membership(masks[0], pix)


def test_pixel_weights_small_masks_weigh_more_range_1_to_10():
    member, scales, areas = _hierarchy()
    w = pixel_weights(member, areas, scales)
    # raw = 1 / mean area: pixels 0-3 -> 1/46.67 (max -> 10), pixel 4 -> 1/60, pixels 5, 6 -> 1/70 (min -> 1)
    # pixel 4: 1 + 9 * (1/60 - 1/70) / (3/140 - 1/70) = 1 + 9 / 3 = 4; pixel 7 in no usable mask -> 0
    assert torch.allclose(w, torch.tensor([10.0, 10, 10, 10, 4, 1, 1, 0]))
    covered = w > 0
    assert w[covered].min().item() == 1.0 and w[covered].max().item() == 10.0
    # without scales the NaN mask counts: pixel 7 (area 10, the smallest) now weighs most
    w2 = pixel_weights(member, areas)
    assert w2[7].item() == 10.0 and w2[5].item() == 1.0 and w2[0] > w2[4] > w2[5]
    # all equal -> all 1; nothing covered -> all 0
    assert torch.equal(pixel_weights(member[:, 2:3], areas[2:3]), torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(pixel_weights(member[:, :0], areas[:0]), torch.zeros(8))
    with pytest.raises(ValueError, match="mask_areas"):
        pixel_weights(member, areas[:3])
    with pytest.raises(ValueError, match="> 0"):
        pixel_weights(member, torch.tensor([70.0, 0.0, 20, 20, 10]))


def test_mask_balanced_probabilities_give_each_mask_an_equal_share():
    """10x10 image: mask 0 covers all 100 px, mask 1 a 2x2 corner (4 px), mask 2 (NaN scale) another corner.
    Mask-first route: 1/2 * (1/100 + 1/4) = 0.13 inside the corner, 1/2 * 1/100 = 0.005 elsewhere, so the 4-pixel
    mask gets 52 % of the draws (uniform: 4 %)."""
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0] = True
    masks[1, :2, :2] = True
    masks[2, 8:, 8:] = True
    scales = torch.tensor([0.9, 0.1, NAN])
    corner = masks[1].flatten()
    p = mask_balanced_probabilities(masks, scales, mix=1.0)
    assert p.shape == (100,) and p.dtype == torch.float64
    assert torch.allclose(p[corner], torch.full((4,), 0.13, dtype=torch.float64))
    assert torch.allclose(p[~corner], torch.full((96,), 0.005, dtype=torch.float64))
    assert math.isclose(float(p[corner].sum()), 0.52) and math.isclose(float(p.sum()), 1.0)
    # mix 0 is uniform over the covered pixels; mix 0.5 halfway between
    assert torch.allclose(mask_balanced_probabilities(masks, scales, mix=0.0), torch.full((100,), 0.01, dtype=torch.float64))
    half = mask_balanced_probabilities(masks, scales, mix=0.5)
    assert math.isclose(float(half[corner].sum()), 0.5 * 0.04 + 0.5 * 0.52)
    # pixels in no usable mask are never drawn; the NaN-scale mask counts for nothing
    only = mask_balanced_probabilities(masks[1:], scales[1:], mix=1.0)
    assert torch.allclose(only[corner], torch.full((4,), 0.25, dtype=torch.float64)) and float(only[~corner].abs().sum()) == 0
    assert float(mask_balanced_probabilities(masks[2:], scales[2:]).sum()) == 0
    assert mask_balanced_probabilities(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0)).shape == (16,)
    with pytest.raises(ValueError, match="mix"):
        mask_balanced_probabilities(masks, scales, mix=1.5)
    with pytest.raises(ValueError, match="masks"):
        mask_balanced_probabilities(masks[0], scales)


def test_active_labels_on_nested_hierarchy():
    member, scales, areas = _hierarchy()
    rows = torch.arange(8)
    expected = {
        0.1: [2, 2, 3, 3, 1, 0, 0, -1],  # below every scale: parts, the object for pixel 4, the group for 5, 6
        0.25: [1, 1, 3, 3, 1, 0, 0, -1],  # between part A (0.2) and part B (0.3)
        0.45: [1, 1, 1, 1, 1, 0, 0, -1],  # between the parts and the object
        0.75: [0, 0, 0, 0, 0, 0, 0, -1],  # between the object and the group
        0.95: [-1] * 8,  # above every scale
    }
    for s, lab in expected.items():
        assert active_labels(member, scales, s, rows, areas).tolist() == lab, s
    # per-row scales, repeated rows; s_M == s counts (s_M >= s)
    got = active_labels(member, scales, torch.tensor([0.2, 0.21, 0.6, 0.61]), torch.tensor([0, 0, 4, 4]))
    assert got.tolist() == [2, 1, 1, 0]


def test_active_label_ties_smallest_area_then_lowest_index():
    member = torch.ones(1, 3, dtype=torch.bool)
    scales = torch.tensor([0.5, 0.5, 0.5])
    assert active_labels(member, scales, 0.1, torch.tensor([0]), torch.tensor([30.0, 10.0, 10.0])).item() == 1
    assert active_labels(member, scales, 0.1, torch.tensor([0])).item() == 0
    assert mask_rank(torch.tensor([0.5, 0.1, 0.5, NAN]), torch.tensor([5.0, 9.0, 1.0, 1.0])).tolist() == [2, 0, 1, 3]


def test_pair_targets_hand_matrices():
    member, scales, areas = _hierarchy()
    i, j = _all_pairs()
    valid_expected = torch.zeros(8, 8, dtype=torch.bool)
    valid_expected[:7, :7] = True
    valid_expected.fill_diagonal_(False)  # i != j; pixel 7 is in no usable mask
    cases = {
        # s: (positive pairs, hard pairs)
        0.1: ([(0, 1), (2, 3), (5, 6)], [(0, 1), (2, 3), (5, 6)]),
        # label 1 for {0, 1, 4}; part A (0.2 < s) also groups (0, 1), so (0, 1) is positive but not hard
        0.25: ([(0, 1), (0, 4), (1, 4), (2, 3), (5, 6)], [(0, 4), (1, 4), (2, 3), (5, 6)]),
        0.45: (
            _clique(range(5)) + [(5, 6)],
            [p for p in _clique(range(5)) if p not in [(0, 1), (2, 3)]] + [(5, 6)],
        ),
        0.75: (_clique(range(7)), [p for p in _clique(range(7)) if p not in _clique(range(5))]),
        # above every scale: no labels, but everything inside the group is grouped by a finer mask
        0.95: (_clique(range(7)), []),
    }
    for s, (pos, hard) in cases.items():
        t = pair_targets(member, scales, i, j, torch.full((64,), s), areas)
        assert torch.equal(t["valid"].reshape(8, 8), valid_expected), s
        assert torch.equal(t["positive"].reshape(8, 8), _pairs_from(pos)), s
        assert torch.equal(t["hard"].reshape(8, 8), _pairs_from(hard)), s
        assert not bool((t["hard"] & ~t["positive"]).any())


def test_sample_pairs_oversamples_hard_pairs_and_is_deterministic():
    member, scales, _ = _hierarchy()
    n = 4000

    def hard_rate(hf, seed=0):
        g = torch.Generator().manual_seed(seed)
        i, j, s = sample_pairs(member, scales, n, hard_fraction=hf, generator=g)
        t = pair_targets(member, scales, i, j, s)
        assert i.shape == j.shape == s.shape == (n,)
        assert bool(t["valid"].all()) and bool((s >= 0).all()) and bool((s < 1).all())
        return t["hard"].float().mean().item()

    base, over = hard_rate(0.0), hard_rate(0.25)
    # natural rate r -> about r + 0.25 (1 - r) when the pool has enough hard candidates
    assert over > base + 0.1, f"hard fraction {over:.3f} with hard_fraction=0.25 vs {base:.3f} uniform"
    assert over == pytest.approx(base + 0.25 * (1 - base), abs=0.04), f"{over:.3f} vs base {base:.3f}"
    assert hard_rate(0.5) > over
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_pairs(member, scales, 50, generator=g1)
    b = sample_pairs(member, scales, 50, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # pixel 7 (no usable mask) is never drawn
    assert not bool(((a[0] == 7) | (a[1] == 7)).any())


def test_sample_pairs_edge_cases():
    member, scales, _ = _hierarchy()
    i, j, s = sample_pairs(member[:, 2:3], scales[2:3], 10, generator=torch.Generator().manual_seed(0))
    assert set(zip(i.tolist(), j.tolist())) <= {(0, 1), (1, 0)}  # only two covered pixels
    i, j, s = sample_pairs(member[:1], scales, 10)  # one covered pixel: no pair possible
    assert i.numel() == j.numel() == s.numel() == 0
    with pytest.raises(ValueError, match="hard_fraction"):
        sample_pairs(member, scales, 10, hard_fraction=1.5)
    with pytest.raises(ValueError, match="candidate_factor"):
        sample_pairs(member, scales, 10, candidate_factor=0)
    with pytest.raises(ValueError, match="mask_scales"):
        sample_pairs(member, scales[:2], 10)


def test_radius_grows_with_scale():
    r = radius_px(torch.linspace(0, 1, 11), 64, 48)
    assert r[0].item() == 2 and r[-1].item() == 12  # r_max = 0.25 * min(64, 48)
    assert bool((r[1:] >= r[:-1]).all()) and r[-1] > r[0]
    assert radius_px(0.5, 4, 4).item() >= 1
    assert radius_px(0.0, 4, 4, r_min=0).item() == 1  # at least 1 px


def _two_regions(h=16, w=16, split=8):
    image = torch.zeros(h, w, 3)
    image[:, :split] = torch.tensor([0.9, 0.1, 0.1])
    image[:, split:] = torch.tensor([0.1, 0.2, 0.8])
    depth = torch.full((h, w), 1.0)
    depth[:, split:] = 5.0
    return image, depth


def test_perception_pairs_within_region_similar_across_border_dissimilar():
    h, w, split = 16, 16, 8
    image, depth = _two_regions(h, w, split)
    pix = torch.arange(h * w).repeat(4)
    g = torch.Generator().manual_seed(0)
    out = perception_pairs(image, depth, pix, 0.5, generator=g)
    q = out.q
    px, qx = pix % w, q % w
    py, qy = pix // w, q // w
    assert bool((q != pix).all())
    assert bool(((px - qx).abs() <= out.radius).all() and ((py - qy).abs() <= out.radius).all())
    same = (px < split) == (qx < split)
    assert int((~same).sum()) > 50  # the test does see border-crossing pairs
    assert torch.equal(out.sim, same) and torch.equal(out.dis, ~same)
    # scale/shift of the depth prior changes nothing
    out2 = perception_pairs(image, 30.0 * depth - 7.0, pix, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out2.q, q) and torch.equal(out2.sim, out.sim) and torch.equal(out2.dis, out.dis)
    assert torch.allclose(out2.theta_d, out.theta_d, atol=1e-5)
    # thresholds: zero in flat windows, k * sigma with sigma = |a - b| sqrt(f (1 - f)) on border windows
    anchor = torch.tensor([3 * w + 7])  # (3, 7): radius 4 window covers x in [3, 11] -> 5 left, 4 right columns
    o = perception_pairs(image, depth, anchor, 0.5, radius_fn=lambda s, H, W: torch.full_like(s, 4).long())
    f = 5 / 9
    col = (torch.tensor([0.9, 0.1, 0.1]) - torch.tensor([0.1, 0.2, 0.8])).norm()
    d = normalise_depth(depth)
    assert o.theta_c.item() == pytest.approx(col.item() * (f * (1 - f)) ** 0.5, rel=1e-5)
    assert o.theta_d.item() == pytest.approx((d[0, 15] - d[0, 0]).abs().item() * (f * (1 - f)) ** 0.5, rel=1e-5)
    inner = perception_pairs(image, depth, torch.tensor([0]), 0.0)  # r = 2 at (0, 0): left region only
    assert inner.theta_c.item() == 0.0 and inner.theta_d.item() == 0.0 and bool(inner.sim.all())


def test_perception_pairs_need_both_cues():
    h, w, split = 16, 16, 8
    image, depth = _two_regions(h, w, split)
    flat_depth = torch.ones(h, w)  # colour differs across the border, depth does not
    pix = torch.arange(h * w)
    out = perception_pairs(image, flat_depth, pix, 0.5, generator=torch.Generator().manual_seed(1))
    same = (pix % w < split) == (out.q % w < split)
    assert torch.equal(out.sim, same)  # flat depth is similar everywhere; colour decides similarity
    assert not bool(out.dis.any())  # never dissimilar in depth -> never "dis"
    with pytest.raises(ValueError, match="depth_prior"):
        perception_pairs(image, depth[:4], pix, 0.5)
    with pytest.raises(ValueError, match="image"):
        perception_pairs(image[..., :2], depth, pix, 0.5)


def test_perception_radius_grows_with_scale():
    image, depth = _two_regions(64, 64, 32)
    pix = torch.full((200,), 32 * 64 + 32)
    small = perception_pairs(image, depth, pix, 0.0, generator=torch.Generator().manual_seed(0))
    large = perception_pairs(image, depth, pix, 1.0, generator=torch.Generator().manual_seed(0))
    assert small.radius.max() < large.radius.min()

    def spread(o):
        return ((o.q % 64 - 32).abs().max(), (o.q // 64 - 32).abs().max())

    assert max(spread(small)) <= 2 and max(spread(large)) > 8


def _reference_targets(member, scales, areas, i, j, s):
    """Direct transcription of the definitions, one pair at a time (python loops)."""
    M = member.shape[1]
    usable = [m for m in range(M) if math.isfinite(scales[m].item())]

    def label(p, sk):
        cands = [m for m in usable if member[p, m] and scales[m].item() >= sk]
        return min(cands, key=lambda m: (scales[m].item(), areas[m].item(), m)) if cands else -1

    out = {"positive": [], "hard": [], "valid": [], "label_i": [], "label_j": []}
    for a, b, sk in zip(i.tolist(), j.tolist(), s.tolist()):
        valid = a != b and any(member[a, m] for m in usable) and any(member[b, m] for m in usable)
        la, lb = label(a, sk), label(b, sk)
        same = la == lb and la >= 0
        finer = any(member[a, m] and member[b, m] and scales[m].item() < sk for m in usable)
        out["valid"].append(valid)
        out["positive"].append(valid and (same or finer))
        out["hard"].append(valid and same and not finer)
        out["label_i"].append(la)
        out["label_j"].append(lb)
    return out


def test_pair_targets_match_brute_force_on_random_overlapping_masks():
    g = torch.Generator().manual_seed(7)
    P, M, K = 40, 12, 400
    member = torch.rand(P, M, generator=g) < 0.3
    # coarse grid of scales -> many ties (broken by area, then index); two unknown scales
    scales = torch.randint(0, 5, (M,), generator=g).double() / 4
    scales[[3, 8]] = NAN
    areas = torch.randint(1, 4, (M,), generator=g).double()
    i = torch.randint(0, P, (K,), generator=g)
    j = torch.randint(0, P, (K,), generator=g)
    s = torch.randint(0, 9, (K,), generator=g).double() / 8  # hits s == s_M exactly
    got = pair_targets(member, scales, i, j, s, areas)
    ref = _reference_targets(member, scales, areas, i, j, s)
    for key, val in ref.items():
        assert got[key].tolist() == val, key
    assert active_labels(member, scales, s, i, areas).tolist() == ref["label_i"]
    assert 0 < sum(ref["hard"]) < sum(ref["positive"]) < sum(ref["valid"])  # all cases occur
