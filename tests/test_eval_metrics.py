"""Segmentation metrics on hand-made masks whose answers are known (pepeseg3d_ns.eval.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pepeseg3d_ns.eval.metrics import (
    SegmentationScores,
    boundary_band,
    boundary_iou,
    erode,
    iou,
    mask_boundary,
    pixel_accuracy,
)


def square(size=40, top=10, left=10, side=10) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top: top + side, left: left + side] = True
    return m


# ------------------------------------------------------------------------------------------ IoU / accuracy
def test_iou_of_offset_squares():
    gt = square()
    assert iou(gt, gt) == 1.0
    # shifted 2 px right: overlap 10 x 8 = 80, union 200 - 80 = 120
    assert iou(square(left=12), gt) == pytest.approx(80 / 120)
    # shifted 3 down and 2 right: overlap 7 x 8 = 56, union 144
    assert iou(square(top=13, left=12), gt) == pytest.approx(56 / 144)
    # disjoint
    assert iou(square(left=25), gt) == 0.0


def test_pixel_accuracy_counts_foreground_and_background():
    gt = square()
    pred = square(top=13, left=12)
    wrong = 2 * (100 - 56)  # symmetric difference
    assert pixel_accuracy(pred, gt) == pytest.approx(1 - wrong / 1600)
    assert pixel_accuracy(~gt, gt) == 0.0
    assert pixel_accuracy(gt, gt) == 1.0


def test_missing_prediction_and_empty_masks_are_nan_free():
    gt = square()
    empty = np.zeros_like(gt)
    assert iou(None, gt) == 0.0
    assert boundary_iou(None, gt) == 0.0
    assert pixel_accuracy(None, gt) == pytest.approx(1 - 100 / 1600)  # all-background prediction
    # both empty: exactly right
    assert iou(empty, empty) == 1.0 and boundary_iou(empty, empty) == 1.0 and pixel_accuracy(empty, empty) == 1.0
    # a missing prediction stays 0 even where the truth is empty
    assert iou(None, empty) == 0.0 and boundary_iou(None, empty) == 0.0 and pixel_accuracy(None, empty) == 1.0
    # only one side empty
    assert iou(empty, gt) == 0.0 and iou(gt, empty) == 0.0
    assert boundary_iou(empty, gt) == 0.0 and boundary_iou(gt, empty) == 0.0
    for v in (iou(empty, gt), boundary_iou(gt, empty), pixel_accuracy(empty, gt)):
        assert np.isfinite(v)


def test_torch_and_01_inputs_match_numpy():
    gt, pred = square(), square(top=13, left=12)
    for p, g in ((torch.from_numpy(pred), torch.from_numpy(gt)), (pred.astype(np.uint8), gt.astype(np.float32))):
        assert iou(p, g) == pytest.approx(56 / 144)
        assert pixel_accuracy(p, g) == pytest.approx(pixel_accuracy(pred, gt))
        assert boundary_iou(p, g) == pytest.approx(boundary_iou(pred, gt))


def test_bad_inputs_raise_clear_errors():
    gt = square()
    with pytest.raises(ValueError, match="shapes differ"):
        iou(square(size=30), gt)
    with pytest.raises(ValueError, match="2-D"):
        iou(gt[None], gt)
    with pytest.raises(ValueError, match="only 0/1"):
        iou(gt * 0.7, gt)
    with pytest.raises(ValueError, match="empty"):
        iou(np.zeros((0, 4), bool), np.zeros((0, 4), bool))
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        iou([[True]], gt)


# ------------------------------------------------------------------------------------------ boundary
def test_boundary_band_from_image_diagonal():
    assert boundary_band(48, 48) == 1  # 0.02 * 67.9 = 1.36
    assert boundary_band(100, 100) == 3  # 2.83
    assert boundary_band(3, 4) == 1  # 0.1 -> at least 1
    assert boundary_band(300, 400) == 10  # 0.02 * 500
    assert boundary_band(728, 986) == 25  # LERF-Mask figurines size: 0.02 * 1225.6 = 24.5 -> 25
    with pytest.raises(ValueError):
        boundary_band(0, 5)


def test_erosion_by_hand():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True  # 5 x 5 square
    want = np.zeros((7, 7), bool)
    want[2:5, 2:5] = True
    np.testing.assert_array_equal(erode(m, 1), want)
    want2 = np.zeros((7, 7), bool)
    want2[3, 3] = True
    np.testing.assert_array_equal(erode(m, 2), want2)
    assert not erode(m, 3).any()
    # the image border counts as background: a full image erodes from its edges
    full = np.ones((5, 5), bool)
    np.testing.assert_array_equal(erode(full, 1), np.pad(np.ones((3, 3), bool), 1))
    np.testing.assert_array_equal(erode(full, 0), full)
    # boundary of the 5x5 square with band 1 is its 16-pixel ring
    ring = mask_boundary(m, 1)
    assert ring.sum() == 16 and not ring[2:5, 2:5].any() and ring[1, 1:6].all() and ring[1:6, 5].all()
    # a single-row mask (not square) keeps nothing after eroding
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert not erode(line, 1).any()
    np.testing.assert_array_equal(mask_boundary(line, 1), line)


def test_boundary_iou_of_shifted_squares_by_hand():
    gt = square()  # rows 10..19, cols 10..19; ring of 36 pixels with band 1
    pred = square(left=11)  # cols 11..20
    # shared ring pixels: top and bottom rows at cols 11..19 -> 18; union 36 + 36 - 18 = 54
    assert boundary_iou(pred, gt, band=1) == pytest.approx(18 / 54)
    assert boundary_iou(gt, gt, band=1) == 1.0
    # default band on a 40x40 image: round(0.02 * 56.6) = 1
    assert boundary_iou(pred, gt) == pytest.approx(18 / 54)


def test_boundary_matches_padded_iterated_3x3_erosion():
    """Reference: pad one zero pixel, erode `band` times with a 3x3 kernel (OpenCV), crop, subtract."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for trial in range(6):
        h, w = rng.integers(20, 60, size=2)
        m = np.zeros((h, w), np.uint8)
        for _ in range(4):  # a few rectangles, some touching the border
            t, l = rng.integers(-5, h), rng.integers(-5, w)
            m[max(t, 0): t + rng.integers(3, 25), max(l, 0): l + rng.integers(3, 25)] = 1
        for band in (1, 2, 4):
            padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
            er = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=band)[1: h + 1, 1: w + 1]
            np.testing.assert_array_equal(mask_boundary(m.astype(bool), band), (m - er) > 0, err_msg=f"{trial} {band}")


# ------------------------------------------------------------------------------------------ accumulator
def test_scores_average_per_object_then_over_objects():
    gt = square()
    s = SegmentationScores(band=1)
    s.add("duck", "mask", 0, gt, gt)  # iou 1
    s.add("duck", "mask", 1, square(left=12), gt)  # iou 2/3
    s.add("apple", "mask", 0, None, gt)  # missing prediction: iou 0
    s.add("3", "objects", "frame_00001", square(top=13, left=12), gt)  # iou 56/144
    out = s.summary()
    duck = out["per_object"]["mask"]["duck"]
    assert duck["n_views"] == 2 and duck["iou"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["per_object"]["mask"]["apple"]["iou"] == 0.0
    assert out["per_object"]["mask"]["apple"]["acc"] == pytest.approx(1 - 100 / 1600)
    # object mean, not view mean: (0.8333 + 0) / 2 for level "mask"
    assert out["per_level"]["mask"]["miou"] == pytest.approx((1 + 2 / 3) / 4)
    assert out["per_level"]["mask"]["n_objects"] == 2 and out["per_level"]["mask"]["n_views"] == 3
    assert out["per_level"]["objects"]["miou"] == pytest.approx(56 / 144)
    assert out["overall"]["miou"] == pytest.approx(((1 + 2 / 3) / 2 + 0 + 56 / 144) / 3)
    # boundary rings (band 1, 36 px each): shift (0, 2) shares 16 px -> 16/56; shift (3, 2) shares 2 px -> 2/70
    assert out["per_object"]["mask"]["duck"]["biou"] == pytest.approx((1 + 16 / 56) / 2)
    assert out["overall"]["mbiou"] == pytest.approx(((1 + 16 / 56) / 2 + 0.0 + 2 / 70) / 3)
    assert out["overall"]["n_objects"] == 3 and out["overall"]["n_views"] == 4
    json.dumps(out)  # plain floats / ints
    assert len(s.records()) == 4 and s.records()[2]["iou"] == 0.0
    for level in out["per_level"].values():
        assert all(np.isfinite(v) for v in level.values())


def test_scores_errors():
    s = SegmentationScores()
    with pytest.raises(ValueError, match="no scores"):
        s.summary()
    s.add("a", "mask", 0, square(), square())
    with pytest.raises(ValueError, match="already added"):
        s.add("a", "mask", 0, square(), square())
    s.add("a", "parts", 0, square(), square())  # same object name at another level is another object
    assert s.summary()["overall"]["n_objects"] == 2
