"""The two-way bootstrap of the benchmark (eval/stats.py) on data whose interval is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from pepeseg3d_ns.eval.stats import bootstrap_interval

Z95 = 1.959964


def test_one_seed_half_ones_matches_the_normal_interval():
    """400 objects, half scoring 1 and half 0: the mean of a resample has sd sqrt(0.25 / 400) = 0.025, so the
    95 % interval is 0.5 +- 1.96 * 0.025 = [0.451, 0.549]."""
    x = np.array([0.0, 1.0] * 200)
    iv = bootstrap_interval(x, n_boot=20000)
    assert iv.mean == 0.5 and (iv.n_seeds, iv.n_objects) == (1, 400)
    assert iv.lo == pytest.approx(0.5 - Z95 * 0.025, abs=0.003)
    assert iv.hi == pytest.approx(0.5 + Z95 * 0.025, abs=0.003)


def test_two_way_adds_seed_and_object_variance():
    """scores[s, o] = a_s + b_o: a resample's mean is mean(a*) + mean(b*), drawn independently, so its variance
    is var(a) / S + var(b) / O. a = +-0.3 over 100 seeds (9e-4), b = 0/1 over 400 objects (6.25e-4): sd 0.0391,
    half-width 0.0765. Resampling objects only would give 0.049, seeds only 0.059."""
    a = np.array([-0.3, 0.3] * 50)
    b = np.array([0.0, 1.0] * 200)
    x = a[:, None] + b[None, :]
    iv = bootstrap_interval(x, n_boot=20000, seed=1)
    half = Z95 * np.sqrt(0.09 / 100 + 0.25 / 400)
    assert iv.mean == pytest.approx(0.5)
    assert iv.hi - iv.mean == pytest.approx(half, abs=0.004)
    assert iv.mean - iv.lo == pytest.approx(half, abs=0.004)


def test_constant_paired_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, (3, 50))
    iv = bootstrap_interval((base + 0.02) - base)
    assert iv.mean == pytest.approx(0.02) and iv.lo == pytest.approx(0.02) and iv.hi == pytest.approx(0.02)
    wide = bootstrap_interval(base)
    assert wide.hi - wide.lo > 0.05  # the rows side by side could not separate 0.02; the pairing does


def test_missing_cells_are_left_out_and_deterministic():
    x = np.array([[1.0, 0.0, np.nan], [1.0, 0.0, np.nan]])
    iv = bootstrap_interval(x)
    assert iv.mean == 0.5 and iv.n_objects == 2  # the all-missing column is dropped
    y = np.array([[1.0, 0.0, 1.0], [np.nan, 0.0, 1.0]])
    assert bootstrap_interval(y).mean == pytest.approx(3 / 5)
    assert bootstrap_interval(y, seed=3) == bootstrap_interval(y, seed=3)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(x, confidence=95)
