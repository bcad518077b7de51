"""`pepeseg3d bench-step`: the data-path benchmark (dense masks before, per-pixel mask sets now)."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.errors import UserError

from pepeseg3d_ns.benchmarks import contrast_data as db
from pepeseg3d_ns.benchmarks.contrast_step import build_model, make_recon_checkpoint


def test_both_paths_run_on_the_same_inputs(tmp_path):
    torch.set_num_threads(1)
    folder = db.write_inputs(tmp_path / "in", (24, 32), 16)
    model, _ = build_model(make_recon_checkpoint(tmp_path / "ckpt", 20), centroid_start=10**9, gate_warmup=0)
    F = torch.nn.functional.normalize(torch.randn(24, 32, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    for path in ("dense", "sets"):
        inputs = db._read_inputs(folder, path)
        loss = db._PATHS[path](model, F, inputs, torch.Generator().manual_seed(0))
        assert loss.dim() == 0 and math.isfinite(float(loss)) and float(loss) > 0, path
        loss.backward()
        assert all(p.grad is not None for p in model.scale_gate.parameters()), path  # the losses reach the gate
        model.zero_grad(set_to_none=True)
    # the stored per-pixel sets hold the stored packed masks
    sets, dense = db._read_inputs(folder, "sets"), db._read_inputs(folder, "dense")
    assert torch.equal(sets["pixel_masks"].to_dense(), torch.from_numpy(dense["maskset"].to_dense()))


def test_markdown_and_bad_arguments():
    rows = [{"path": "dense", "width": 1008, "height": 756, "num_masks": 300, "step_s": 2.5, "peak_mib": 4000.0},
            {"path": "sets", "width": 1008, "height": 756, "num_masks": 300, "step_s": 0.05, "peak_mib": 40.0},
            {"path": "dense", "width": 256, "height": 256, "num_masks": 50, "error": "timeout"}]
    md = db.format_markdown(rows).splitlines()
    assert md[2] == "| 1008×756 | 300 | 2500.0 | 50.0 | 4000 | 40.0 | 50.0× | 100× |"
    assert md[3] == "| 256×256 | 50 | error | error | error | error | – | – |"
    with pytest.raises(ValueError, match="paths"):
        db.run_data_path_bench(paths=("sparse",))
    with pytest.raises(ValueError, match="repeats"):
        db.run_data_path_bench(repeats=0)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        db.BenchStep(resolutions=("256",)).main()
    with pytest.raises(ValueError, match="device"):
        db.run_data_path_bench(device="tpu")
    with pytest.raises(UserError, match="--breakdown"):
        db.BenchStep(breakdown=True, device="cuda").main()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            db.BenchStep(device="cuda").main()
    md = db.format_markdown([{**r, "device": "cuda"} for r in rows[:2]]).splitlines()
    assert md[0].startswith("| image (W×H) | masks | dense ms | sets ms |")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sets_path_on_cuda_in_a_fresh_process():
    rows = db.run_data_path_bench(resolutions=((48, 64),), num_masks=(12,), paths=("sets",), repeats=2, log=False,
                                  device="cuda")
    assert len(rows) == 1 and "error" not in rows[0], rows[0].get("error")
    assert rows[0]["device"] == "cuda" and rows[0]["step_s"] > 0 and rows[0]["peak_mib"] >= 0


@pytest.mark.slow
def test_tiny_benchmark_in_fresh_processes():
    rows = db.run_data_path_bench(resolutions=((32, 40),), num_masks=(8,), repeats=2, log=False)
    assert [r["path"] for r in rows] == ["dense", "sets"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert (r["height"], r["width"], r["num_masks"]) == (32, 40, 8)
        assert r["step_s"] > 0 and r["wall_s"] > 0 and r["peak_mib"] >= 0 and r["resident_mib"] > 0


def test_perception_pairs_agree_with_mains_implementation():
    """The leaner window statistics (6 integral channels written in place) give main's partners exactly and the
    same similar / dissimilar decisions, thresholds equal to float rounding."""
    from pepeseg3d_ns.contrast import perception as P

    g = torch.Generator().manual_seed(0)
    for h, w in ((40, 56), (97, 64)):
        image = torch.rand(h, w, 3, generator=g)
        image[: h // 2] = image[: h // 2].round()  # flat and two-valued windows too
        depth = torch.rand(h, w, generator=g) + torch.linspace(0, 3, w)
        pix = torch.randint(0, h * w, (3000,), generator=g)
        s = torch.rand(3000, generator=g)
        ref = db.main_perception_pairs(image, depth, pix, s, generator=torch.Generator().manual_seed(1))
        got = P.perception_pairs(image, depth, pix, s, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got.q, ref.q) and torch.equal(got.radius, ref.radius)
        assert torch.equal(got.sim, ref.sim) and torch.equal(got.dis, ref.dis)
        assert torch.allclose(got.theta_d, ref.theta_d, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.theta_c, ref.theta_c, rtol=1e-5, atol=1e-6)
        assert 0 < int(ref.sim.sum()) and 0 < int(ref.dis.sum())
