"""Held-out geometry metrics of the recon ablation, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import torch

from pepeseg3d_ns.recon.ablation import boundary_band, depth_metrics, masked_psnr


def test_boundary_band_of_a_square():
    ids = np.zeros((8, 8), dtype=np.int64)
    ids[2:5, 2:5] = 3
    band = boundary_band(ids, 1).numpy()
    # every pixel with a differently labelled 8-neighbour: the 5x5 ring around and including the square's
    # border, minus the square's single interior pixel (3, 3)
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:6, 1:6] = True
    expected[3, 3] = False
    assert (band == expected).all()
    wide = boundary_band(ids, 2).numpy()
    assert wide[0:7, 0:7].all() and not wide[7].any() and wide[3, 3]
    assert not boundary_band(np.ones((4, 4), dtype=np.int64), 1).any()
    assert not boundary_band(ids, 0).any()


def test_depth_metrics_known_values():
    gt = torch.full((4, 4), 2.0)
    gt[:, 2:] = 4.0
    pred = gt * 1.1
    valid = torch.ones(4, 4, dtype=torch.bool)
    m = depth_metrics(pred, gt, valid)
    assert math.isclose(m["absrel"], 0.1, rel_tol=1e-6)
    assert math.isclose(m["inv_r"], 1.0, rel_tol=1e-6)  # a scaled copy is perfectly correlated
    assert m["n"] == 16
    flipped = gt.flip(1)  # near where far should be
    assert depth_metrics(flipped, gt, valid)["inv_r"] < -0.99
    valid[:, :2] = False
    assert depth_metrics(pred, gt, valid)["n"] == 8
    assert math.isnan(depth_metrics(pred, gt, torch.zeros(4, 4, dtype=torch.bool))["absrel"])


def test_masked_psnr():
    gt = torch.zeros(2, 2, 3)
    pred = gt.clone()
    pred[0, 0] = 0.1  # mse 0.01 on that pixel
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    assert math.isclose(masked_psnr(pred, gt, mask), 20.0, rel_tol=1e-6)
    assert math.isclose(masked_psnr(pred, gt), 10 * math.log10(400), rel_tol=1e-6)
