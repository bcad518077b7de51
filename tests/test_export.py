"""3DGS PLY export, feature PCA and overlays on hand-made inputs."""

from __future__ import annotations

import numpy as np
import torch

from pepeseg3d_ns.contrast.pca import feature_pca
from pepeseg3d_ns.export import splat_ply_properties, write_splat_ply
from pepeseg3d_ns.segment import overlay


def _params(n=5, k=3):
    g = torch.Generator().manual_seed(0)
    return {
        "means": torch.randn(n, 3, generator=g), "features_dc": torch.randn(n, 3, generator=g),
        "features_rest": torch.randn(n, k, 3, generator=g), "opacities": torch.randn(n, 1, generator=g),
        "scales": torch.randn(n, 3, generator=g), "quats": torch.randn(n, 4, generator=g),
    }


def test_ply_round_trip_layout_and_values(tmp_path):
    from plyfile import PlyData

    p = _params()
    sel = torch.tensor([True, False, True, True, False])
    assert write_splat_ply(tmp_path / "a.ply", p, sel) == 3
    v = PlyData.read(str(tmp_path / "a.ply"))["vertex"]
    assert [q.name for q in v.properties] == splat_ply_properties(3)
    assert v.count == 3
    idx = [0, 2, 3]
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), p["means"][idx].numpy(), rtol=1e-6)
    np.testing.assert_allclose(v["opacity"], p["opacities"][idx, 0].numpy(), rtol=1e-6)
    # channel-major higher SH: f_rest_0..2 are red's three coefficients
    np.testing.assert_allclose(np.stack([v[f"f_rest_{i}"] for i in range(3)], 1), p["features_rest"][idx, :, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), p["quats"][idx].numpy(), rtol=1e-6)


def test_ply_drops_non_finite_and_checks_selection(tmp_path):
    import pytest

    p = _params()
    p["means"][1, 0] = float("nan")
    assert write_splat_ply(tmp_path / "b.ply", p) == 4
    with pytest.raises(ValueError, match="selection"):
        write_splat_ply(tmp_path / "c.ply", p, torch.ones(3, dtype=torch.bool))


def test_feature_pca_separates_two_groups_deterministically():
    f = torch.zeros(4, 4, 8)
    f[:, :2, 0] = 1.0
    f[:, 2:, 1] = 1.0
    img = feature_pca(f)
    assert img.shape == (4, 4, 3) and img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img[:, :2], img[0, 0].expand(4, 2, 3))  # one group, one colour
    assert (img[0, 0] - img[0, 3]).abs().max() > 0.5  # the groups differ
    assert torch.equal(img, feature_pca(f))


def test_overlay_tints_mask_and_outline():
    rgb = np.zeros((6, 6, 3), dtype=np.float32)
    m = np.zeros((6, 6), dtype=bool)
    m[1:5, 1:5] = True
    out = overlay(rgb, m, color=(200, 0, 0), alpha=0.5)
    assert out.dtype == np.uint8
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[1, 1]) == (200, 0, 0)  # outline
    assert tuple(out[2, 2]) == (100, 0, 0)  # interior, half tinted
