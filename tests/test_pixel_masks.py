"""Per-pixel mask sets (priors/pixel_masks.py) and the training path built on them (contrast/sampling.py ``set_*``):
the same masks, labels, pair targets, omega, covered pixels and hard pairs as the dense reference functions, and
draws with the intended distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from pepeseg3d_ns.contrast import dense_reference as R
from pepeseg3d_ns.contrast import sampling as S
from pepeseg3d_ns.priors import pixel_masks as pmod
from pepeseg3d_ns.priors.masks import MaskSet
from pepeseg3d_ns.priors.pixel_masks import PixelMasks

NAN = float("nan")


def random_masks(seed: int, h: int = 20, w: int = 24, m: int = 40):
    """Nested SAM-like masks: rectangles, children inside earlier masks, a few free overlapping blobs, one empty
    mask, pixel (0, 0) in no mask; scales grow with area (coarse grid: ties), a few NaN (unknown)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.zeros(m, h, w, dtype=torch.bool)
    for k in range(m):
        if k < 4 or k % 9 == 0:  # top level / free blobs
            y0, x0 = int(torch.randint(0, h - 2, (1,), generator=g)), int(torch.randint(0, w - 2, (1,), generator=g))
            y1, x1 = y0 + int(torch.randint(2, h, (1,), generator=g)), x0 + int(torch.randint(2, w, (1,), generator=g))
            masks[k] = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        else:
            parent = int(torch.randint(0, k, (1,), generator=g))
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            ry, rx = 1 + 4 * float(torch.rand(1, generator=g)), 1 + 5 * float(torch.rand(1, generator=g))
            masks[k] = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & masks[parent]
    masks[m // 2] = False  # an empty mask
    masks[:, 0, 0] = False  # a pixel in no mask
    areas = masks.flatten(1).sum(1)
    scales = torch.round(areas.float() / max(int(areas.max()), 1) * 8) / 8  # ties on purpose
    scales[torch.randperm(m, generator=g)[:4]] = NAN
    return masks, scales, areas


SEEDS = [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# the representation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_round_trip_is_lossless(seed):
    masks, _, areas = random_masks(seed, m=40 if seed % 2 else 90)  # <= 64 masks: exact keys; more: hashed keys
    pm = PixelMasks.from_dense(masks)
    assert torch.equal(pm.to_dense(), masks)
    assert torch.equal(pm.mask_area, areas)
    assert int(pm.set_area.sum()) == masks.shape[1] * masks.shape[2] and bool((pm.set_area > 0).all())
    # every set is a distinct list of masks; pixel (0, 0) is the set of no mask
    rows = [tuple(r[r >= 0].tolist()) for r in pm.set_masks]
    assert len(set(rows)) == len(rows) and rows[int(pm.pixel_set[0])] == ()
    # the pixels listed by set are a permutation, grouped by set
    assert torch.equal(torch.sort(pm.set_pixels.long()).values, torch.arange(masks[0].numel()))
    for c in range(pm.num_sets):
        px = pm.set_pixels[pm.set_start[c] : pm.set_start[c + 1]].long()
        assert bool((pm.pixel_set[px] == c).all())
    # the disk form: four arrays, lossless
    arrays = pm.to_arrays()
    assert set(arrays) == {"shape", "pixel_set", "set_masks", "mask_area"}
    again = PixelMasks.from_arrays(arrays)
    assert torch.equal(again.to_dense(), masks) and torch.equal(again.pixel_set, pm.pixel_set)
    # from the packed MaskSet directly (what the datamanager does)
    assert torch.equal(PixelMasks.from_maskset(MaskSet.from_dense(masks)).pixel_set, pm.pixel_set)


def test_hash_collisions_fall_back_to_an_exact_sort(monkeypatch):
    """With a degenerate hash (every pixel collides) the verification catches it and the result is unchanged."""
    masks, _, _ = random_masks(5, m=90)
    ref = PixelMasks.from_dense(masks)
    monkeypatch.setattr(pmod, "_FNV_PRIME", np.uint64(0))
    bad = PixelMasks.from_dense(masks)
    assert torch.equal(bad.pixel_set, ref.pixel_set) and torch.equal(bad.to_dense(), masks)


def test_no_masks_and_bad_arrays():
    pm = PixelMasks.from_dense(torch.zeros(0, 5, 7, dtype=torch.bool))
    assert pm.num_masks == 0 and pm.num_sets == 1 and pm.to_dense().shape == (0, 5, 7)
    good = PixelMasks.from_dense(random_masks(0)[0]).to_arrays()
    for key, value, match in [
        ("pixel_set", good["pixel_set"][:-1], "entries"),
        ("pixel_set", np.full_like(good["pixel_set"], 10**6), "outside"),
        ("set_masks", good["set_masks"][:, ::-1].copy(), "ascending"),
        ("mask_area", good["mask_area"] + 1, "disagrees"),
        ("set_masks", np.concatenate([good["set_masks"], good["set_masks"][:1]]), "twice|no pixel"),
    ]:
        with pytest.raises(ValueError, match=match):
            PixelMasks.from_arrays({**good, key: value}, source="cache/img.npz")
    with pytest.raises(ValueError, match="cache/img.npz.*missing"):
        PixelMasks.from_arrays({"shape": good["shape"]}, source="cache/img.npz")


def test_contains_matches_dense_membership():
    masks, _, _ = random_masks(1)
    pm = PixelMasks.from_dense(masks)
    pix = torch.arange(masks[0].numel())
    ids = torch.arange(-1, masks.shape[0])
    got = pm.contains(pm.sets_of(pix)[:, None], ids[None, :])
    assert torch.equal(got[:, 1:], masks.flatten(1).t()) and not bool(got[:, 0].any())  # -1 is never contained


# ----------------------------------------------------------------------------------------------------------------
# the training path equals the dense reference
# ----------------------------------------------------------------------------------------------------------------


def _case(seed):
    masks, scales, areas = random_masks(seed, m=(40, 150, 64, 129, 70)[seed % 5])  # 1 to 3 words of 64 masks
    pm = PixelMasks.from_dense(masks)
    g = torch.Generator().manual_seed(100 + seed)
    pix = torch.randperm(masks[0].numel(), generator=g)[:150]
    pix[0] = 0  # the pixel in no mask
    return masks, scales, areas, pm, pix, g


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_targets_omega_covered_equal_the_dense_path(seed):
    masks, scales, areas, pm, pix, g = _case(seed)
    member = R.membership(masks, pix)
    sm = S.gather_sampled(pm, pix, scales)
    # membership and covered set
    assert torch.equal(pm.contains(sm.sets[:, None], torch.arange(masks.shape[0])[None, :]), member)
    usable = torch.isfinite(scales) & (areas > 0)
    assert torch.equal(sm.count > 0, (member & usable).any(1))
    assert torch.equal(S.covered_pixels(pm, scales), (masks & usable[:, None, None]).any(0))
    assert not bool(sm.count[0])
    # omega (eq. 7) over the sampled pixels: identical
    assert torch.equal(S.set_pixel_weights(sm), R.pixel_weights(member, areas, scales))
    # active labels and the pair targets G (positive / hard / valid) at random scales, ties s == s_M included
    k = 3000
    i = torch.randint(0, pix.numel(), (k,), generator=g)
    j = torch.randint(0, pix.numel(), (k,), generator=g)
    s = torch.cat([torch.rand(k // 2, generator=g), scales[torch.randint(0, scales.numel(), (k - k // 2,), generator=g)]])
    s = torch.nan_to_num(s, nan=0.5)
    ref = R.pair_targets(member, scales, i, j, s, areas)
    got = S.set_pair_targets(pm, sm, i, j, s)
    for key in ("positive", "hard", "valid", "label_i", "label_j"):
        assert torch.equal(got[key], ref[key]), key
    assert torch.equal(got["label_i"], R.active_labels(member, scales, s, i, areas))
    assert 0 < int(ref["hard"].sum()) < int(ref["positive"].sum()) < int(ref["valid"].sum())  # every case occurs


def test_pair_targets_chunking_does_not_change_them(monkeypatch):
    masks, scales, areas, pm, pix, g = _case(2)
    sm = S.gather_sampled(pm, pix, scales)
    i, j = torch.randint(0, 150, (500,), generator=g), torch.randint(0, 150, (500,), generator=g)
    s = torch.rand(500, generator=g)
    whole = S.set_pair_targets(pm, sm, i, j, s)
    monkeypatch.setattr(S, "PAIR_CHUNK", 37)
    parts = S.set_pair_targets(pm, sm, i, j, s)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.parametrize("seed", SEEDS)
def test_pair_draw_equals_the_dense_draw(seed):
    """Same generator state -> the same pairs (and hard pairs) as ``sample_pairs`` on the dense membership."""
    masks, scales, areas, pm, pix, _ = _case(seed)
    member = R.membership(masks, pix)
    sm = S.gather_sampled(pm, pix, scales)
    for hf in (0.0, 0.25):
        a = R.sample_pairs(member, scales, 400, hard_fraction=hf, generator=torch.Generator().manual_seed(seed),
                           mask_areas=areas)
        i, j, s, t = S.set_sample_pairs(pm, sm, 400, hard_fraction=hf, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], i) and torch.equal(a[1], j) and torch.equal(a[2], s)
        ref = R.pair_targets(member, scales, i, j, s, areas)
        assert all(torch.equal(t[k], ref[k]) for k in ref)
        assert bool(t["valid"].all())


def test_pair_draw_with_fewer_than_two_covered_pixels_is_all_invalid():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 1] = True
    pm = PixelMasks.from_dense(masks)
    scales = torch.tensor([0.5, NAN])
    for pix in (torch.tensor([0, 5, 3]), torch.tensor([0, 3, 2])):  # one covered pixel, then none
        sm = S.gather_sampled(pm, pix, scales)
        i, j, s, t = S.set_sample_pairs(pm, sm, 50, generator=torch.Generator().manual_seed(0))
        assert i.shape == (50,) and not bool(t["valid"].any()) and not bool(t["positive"].any())


@pytest.mark.parametrize("seed", SEEDS)
def test_draw_weights_equal_the_dense_probabilities(seed):
    masks, scales, areas, pm, _, _ = _case(seed)
    covered = (masks & (torch.isfinite(scales) & (areas > 0))[:, None, None]).any(0).flatten()
    per_pixel = lambda w: w[pm.pixel_set.long()]  # noqa: E731
    for mix in (0.0, 0.5, 1.0):
        dense = R.mask_balanced_probabilities(masks, scales, mix)
        assert torch.allclose(per_pixel(S.set_draw_weights(pm, scales, "mask", mix)), dense, rtol=1e-12, atol=0)
    idx = torch.nonzero(covered).flatten()
    omega = torch.zeros(covered.numel())
    omega[idx] = R.pixel_weights(masks.flatten(1)[:, idx].t(), areas, scales)
    assert torch.equal(per_pixel(S.set_draw_weights(pm, scales, "omega")).float(), omega)
    assert torch.equal(per_pixel(S.set_draw_weights(pm, scales, "uniform")) > 0, covered)


# ----------------------------------------------------------------------------------------------------------------
# distributions of the draws
# ----------------------------------------------------------------------------------------------------------------


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    assert int(counts[~keep].sum()) == 0, "drew a pixel of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def test_single_draws_follow_the_mask_balanced_law():
    """One pixel per draw: its set's frequency matches ``area(c) * w(c)`` (chi-square, p = 0.001); against the
    uniform law the same counts are rejected (the test has power)."""
    masks, scales, areas = random_masks(3, h=16, w=16, m=24)
    pm = PixelMasks.from_dense(masks)
    w = S.set_draw_weights(pm, scales, "mask", 1.0)
    g = torch.Generator().manual_seed(0)
    n = 6000
    sets = torch.stack([pm.sets_of(S.draw_pixels(pm, w, 1, g)[0])[0] for _ in range(n)])
    counts = torch.bincount(sets, minlength=pm.num_sets).double()
    law = (w * pm.set_area.double())
    stat, df = _chi2(counts, n * law / law.sum())
    assert stat < chi2.ppf(0.999, df), (stat, df)
    uni = (w > 0).double() * pm.set_area.double()
    stat_u, df_u = _chi2(counts, n * uni / uni.sum())
    assert stat_u > chi2.ppf(0.999, df_u), "the uniform law should be rejected"


def test_mask_first_route_gives_every_mask_an_equal_share():
    """Disjoint masks of 1, 4, 16 and 64 pixels, mix = 1: each gets a quarter of the draws whatever its area."""
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 2:4, 2:4] = True
    masks[2, 10:14, 0:4] = True
    masks[3, 0:8, 8:16] = True
    assert int(masks.sum(0).max()) == 1
    pm = PixelMasks.from_dense(masks)
    w = S.set_draw_weights(pm, torch.tensor([0.1, 0.2, 0.4, 0.9]), "mask", 1.0)
    g = torch.Generator().manual_seed(1)
    n = 4000
    pix = torch.stack([S.draw_pixels(pm, w, 1, g)[0][0] for _ in range(n)])
    hit = masks.flatten(1)[:, pix].sum(1).double()
    stat, df = _chi2(hit, torch.full((4,), n / 4.0, dtype=torch.float64))
    assert stat < chi2.ppf(0.999, df), hit.tolist()


def test_draws_without_replacement_match_torch_multinomial():
    """``n`` distinct pixels: inclusion frequencies equal those of ``torch.multinomial(w, n, replacement=False)``
    within 4.5 binomial standard deviations."""
    masks, scales, _ = random_masks(4, h=6, w=6, m=10)
    pm = PixelMasks.from_dense(masks)
    w = S.set_draw_weights(pm, scales, "mask", 0.5)
    wp = w[pm.pixel_set.long()]
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    trials, n = 3000, 5
    ours, theirs = torch.zeros(36), torch.zeros(36)
    for _ in range(trials):
        pix, ok = S.draw_pixels(pm, w, n, g1)
        assert pix.unique().numel() == n and bool(ok.all())
        ours[pix] += 1
        theirs[torch.multinomial(wp, n, replacement=False, generator=g2)] += 1
    p = (ours + theirs) / (2 * trials)
    sd = torch.sqrt(p * (1 - p) * 2 / trials).clamp(min=1e-3)
    assert float(((ours - theirs).abs() / trials / sd).max()) < 4.5


def test_fewer_covered_pixels_than_draws_are_flagged():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :1, :3] = True
    pm = PixelMasks.from_dense(masks)
    pix, ok = S.draw_pixels(pm, S.set_draw_weights(pm, torch.tensor([0.5]), "uniform"), 10)
    assert pix.unique().numel() == 10 and int(ok.sum()) == 3
    assert set(pix[ok].tolist()) == {0, 1, 2} and not bool(masks.flatten()[pix[~ok]].any())


def test_uniform_pixel_inside_a_mask_or_set():
    masks, _, areas = random_masks(2)
    pm = PixelMasks.from_dense(masks)
    g = torch.Generator().manual_seed(0)
    m = int(torch.argmax(areas * (areas < 60)))  # a mid-sized mask spread over several sets
    n = 40 * int(areas[m])
    pix = pm.sample_in_masks(torch.full((n,), m), torch.rand(n, generator=g))
    counts = torch.bincount(pix, minlength=masks[0].numel()).double()
    inside = masks[m].flatten()
    stat, df = _chi2(counts, torch.where(inside, n / float(areas[m]), 0.0).double())
    assert stat < chi2.ppf(0.999, df)
    # every mask: draws land inside it
    every = torch.nonzero(areas > 0).flatten().repeat(50)
    got = pm.sample_in_masks(every, torch.rand(every.numel(), generator=g))
    assert bool(masks.flatten(1)[every, got].all())
    c = int(pm.pixel_set[5])
    in_set = pm.sample_in_sets(torch.full((500,), c), torch.rand(500, generator=g))
    assert bool((pm.pixel_set[in_set] == c).all())
