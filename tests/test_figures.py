"""The labelled grid behind every figure (preview.png, demo_comparison.png, the decomposition sheet)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pepeseg3d_ns.data.preview import save_grid


def _rows(n_rows=2, n_cols=3, h=40, w=40):
    rng = np.random.default_rng(0)
    return [np.concatenate([np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(n_cols)], axis=1)
            for _ in range(n_rows)]


def test_labels_sit_in_a_band_above_unchanged_content(tmp_path):
    rows = _rows()
    plain = np.asarray(Image.open(save_grid(rows, tmp_path / "plain.png", scale=2)))
    assert plain.shape == (2 * 80, 3 * 80, 3)  # no labels asked: the content alone
    img = np.asarray(Image.open(save_grid(rows, tmp_path / "l.png", scale=2, title="a title",
                                          columns=["image", "render", "depth"])))
    band_h = img.shape[0] - plain.shape[0]
    assert band_h > 10 and img.shape[1] == plain.shape[1]
    assert np.array_equal(img[band_h:], plain)
    band = img[:band_h]
    assert (band == 255).all(-1).mean() > 0.5
    for j in range(3):  # one label centred over every column
        assert (band[band_h // 2:, j * 80:(j + 1) * 80] < 100).all(-1).any(), j


def test_a_long_label_wraps_inside_its_column(tmp_path):
    rows = _rows()
    short = np.asarray(Image.open(save_grid(rows, tmp_path / "s.png", columns=["a", "b", "c"])))
    long = np.asarray(Image.open(save_grid(rows, tmp_path / "w.png",
                                           columns=["a", "SAM masks (simulated), medium", "c"])))
    assert long.shape[0] > short.shape[0] and long.shape[1] == short.shape[1]
    band = long[: long.shape[0] - 80]
    # the wrapped label stays in its own (middle) column: the outer columns hold only their one-letter labels
    assert (band[:, :40] < 100).all(-1).sum() < (band[:, 40:80] < 100).all(-1).sum()
