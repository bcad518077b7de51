"""pepe-contrast step benchmark: synthetic inputs, one in-process step, markdown, and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.errors import UserError

from pepeseg3d_ns.benchmarks import contrast_step as sb


def test_make_batch_masks_nest_and_scales_follow_area():
    H, W, M = 24, 40, 30
    b = sb.make_batch((H, W), num_masks=M, seed=3)
    masks = b["sam_masks"]
    assert masks.shape == (M, H, W) and masks.dtype == torch.bool
    assert b["image"].shape == (H, W, 3) and b["image"].dtype == torch.float32
    assert float(b["image"].min()) >= 0 and float(b["image"].max()) <= 1
    assert b["depth_prior"].shape == (H, W, 1) and bool((b["depth_prior"] > 0).all())
    areas = b["sam_mask_areas"]
    assert areas.dtype == torch.int64 and torch.equal(areas, masks.flatten(1).sum(1))
    assert bool((areas > 0).all())
    n_top = M // 10
    for m in range(n_top, M):  # every lower-level mask lies inside an earlier one
        assert any(bool((masks[m] & ~masks[p]).sum() == 0) for p in range(m)), m
    s = b["mask_scales"]
    assert s.shape == (M,) and s.dtype == torch.float32
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0
    assert len(set(s.tolist())) == M
    i, j = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    bigger = areas[i] > areas[j]
    assert bool((s[i] > s[j])[bigger].all())
    # deterministic
    b2 = sb.make_batch((H, W), num_masks=M, seed=3)
    assert all(torch.equal(b[k], b2[k]) for k in b if k != "pixel_masks")
    assert torch.equal(b["pixel_masks"].to_dense(), masks)  # the model's per-pixel sets hold the same masks


def test_checkpoint_is_readable_and_in_front_of_the_camera(tmp_path):
    from pepeseg3d_ns.contrast.model import load_recon_geometry
    from pepeseg3d_ns.render.cameras import viewmat_from_c2w

    ckpt = sb.make_recon_checkpoint(tmp_path, 500, sh_degree=2)
    geo, path, step = load_recon_geometry(ckpt)
    assert path == ckpt and step == 0
    assert geo["means"].shape == (500, 3) and geo["quats"].shape == (500, 4) and geo["scales"].shape == (500, 3)
    assert geo["features_rest"].shape == (500, 8, 3) and geo["opacities"].shape == (500, 1)
    assert float(geo["scales"].max()) < 0  # log standard deviations (< 1 unit)
    cam = sb.make_camera((32, 48))
    assert int(cam.height) == 32 and int(cam.width) == 48
    vm = viewmat_from_c2w(cam.camera_to_worlds)
    assert torch.allclose(vm[0], torch.eye(4), atol=1e-6)  # OpenCV camera frame == world
    z = geo["means"][:, 2]
    assert bool((z >= 2).all() and (z <= 4).all())
    K = cam.get_intrinsics_matrices()[0]
    uv = (geo["means"] @ K.T)[:, :2] / z[:, None]
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < 48) & (uv[:, 1] >= 0) & (uv[:, 1] < 32)
    assert float(inside.float().mean()) > 0.4


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        sb.make_batch((3, 3))
    with pytest.raises(ValueError, match="resolution"):
        sb.make_camera((32,))
    with pytest.raises(ValueError, match="num_masks"):
        sb.make_batch((16, 16), num_masks=0)
    with pytest.raises(ValueError, match="at least 2 Gaussians"):
        sb.make_recon_checkpoint(tmp_path, 1)
    with pytest.raises(ValueError, match="at least one value"):
        sb.run_contrast_step_bench(sizes=())
    with pytest.raises(ValueError, match="repeats"):
        sb.run_contrast_step_bench(repeats=0)
    with pytest.raises(ValueError, match="device"):
        sb.run_contrast_step_bench(device="tpu")
    with pytest.raises(ValueError, match="at least one row"):
        sb.format_markdown([])
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        sb.BenchContrast(resolutions=("128",)).main()


def test_one_step_in_process_trains_only_features_and_gate(tmp_path):
    torch.set_num_threads(1)
    model, info = sb.build_model(sb.make_recon_checkpoint(tmp_path, 300), centroid_start=10**6)
    assert info["setup_s"] > 0 and info["knn_s"] > 0 and info["knn_s"] <= info["setup_s"]
    assert model.knn.shape == (300, 16) and model.training
    opt = sb.make_optimizer(model)
    cam, batch = sb.make_camera((24, 24)), sb.make_batch((24, 24), num_masks=12)
    feats0, means0 = model.gauss_features.detach().clone(), model.gauss_params["means"].detach().clone()
    gate0 = [p.detach().clone() for p in model.scale_gate.parameters()]
    t = sb.train_step(model, opt, cam, batch, step=0)
    parts = ("forward", "loss", "backward", "optimizer")
    assert all(t[k] > 0 for k in parts)
    assert t["total"] == pytest.approx(sum(t[k] for k in parts))
    assert math.isfinite(t["loss_value"]) and t["loss_value"] > 0
    assert not torch.equal(model.gauss_features.detach(), feats0)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.scale_gate.parameters(), gate0))
    assert torch.equal(model.gauss_params["means"], means0)
    assert model.gauss_features.grad is None  # zero_grad(set_to_none=True)
    assert len(model.bank_upper) == 0  # no centroid refresh before centroid_start


def test_gate_held_during_warmup_then_trained(tmp_path):
    """``gate_warmup``: before it the losses see psi detached (features learn, the gate stays); from it on both."""
    torch.set_num_threads(1)
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 300), centroid_start=10**6, gate_warmup=2)
    opt = sb.make_optimizer(model)
    cam, batch = sb.make_camera((24, 24)), sb.make_batch((24, 24), num_masks=12)
    gate0 = [p.detach().clone() for p in model.scale_gate.parameters()]
    feats0 = model.gauss_features.detach().clone()
    for step in (0, 1):
        sb.train_step(model, opt, cam, batch, step=step)
    assert not torch.equal(model.gauss_features.detach(), feats0)
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.scale_gate.parameters(), gate0))
    sb.train_step(model, opt, cam, batch, step=2)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.scale_gate.parameters(), gate0))


def test_omega_pixel_sampling_favours_small_masks(tmp_path):
    """``pixel_sampling="omega"`` (and ``"mask"``) draws pixels with probability proportional to omega(p): a 4-pixel mask inside a
    16x16 image covered by one big mask gets omega 10 against 1, so about 10x its uniform share."""
    from pepeseg3d_ns.priors.pixel_masks import PixelMasks

    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 50), centroid_start=10**6,
                              num_sample_pixels=20, pixel_sampling="omega")
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0] = True
    masks[1, :2, :2] = True  # 4 px
    pm, scales = PixelMasks.from_dense(masks), torch.tensor([1.0, 0.1])
    small = lambda pix: int((pix < 2).sum() + ((pix >= 16) & (pix < 18)).sum())  # noqa: E731  rows 0-1, cols 0-1
    hits = {"omega": 0, "uniform": 0, "mask": 0}
    for mode in hits:
        model.config.pixel_sampling = mode
        model._sample_gen.manual_seed(0)
        for _ in range(200):
            pix, ok = model._sample_pixels(pm, scales)
            assert pix.numel() == 20 and pix.unique().numel() == 20 and bool(ok.all())
            hits[mode] += small(pix)
    # uniform: 20 * 4/256 = 0.31 small pixels per draw; omega: 20 * 40/292 = 2.7 (minus sampling without replacement)
    assert hits["uniform"] / 200 < 0.6 and hits["omega"] / 200 > 1.8, hits
    # mask-balanced (half the draws mask-first): the 4-px mask holds 26 % of the probability, 6.5 % per pixel, so
    # each of its pixels is among the 20 drawn with probability ~1 - 0.935^20 = 0.74: ~3 a draw (measured 3.1)
    assert hits["mask"] / 200 > 2.5, hits
    assert model._sample_gen.device == model.device  # draws on the model's device
    model.config.pixel_sampling = "stratified"
    with pytest.raises(ValueError, match="pixel_sampling"):
        model._sample_pixels(pm, scales)


def test_gate_scales_stretch_the_fine_end(tmp_path):
    """``scale_power`` 0.5: quantile scale 0.04 trains at s = 0.2 and 0.25 at 0.5; 0 and 1 stay put, order is kept,
    unknown (NaN) stays unknown; power 1 is the identity; a power <= 0 is refused."""
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 20), centroid_start=10**6, scale_power=0.5)
    q = torch.tensor([float("nan"), 0.0, 0.04, 0.25, 1.0])
    out = model.gate_scales(q)
    assert torch.isnan(out[0]) and torch.allclose(out[1:], torch.tensor([0.0, 0.2, 0.5, 1.0]))
    model.config.scale_power = 1.0
    assert torch.equal(model.gate_scales(q)[1:], q[1:])
    model.config.scale_power = 0.0
    with pytest.raises(ValueError, match="scale_power"):
        model.gate_scales(q)


def test_non_finite_recon_gaussians_are_dropped(tmp_path):
    from pepeseg3d_ns.contrast.model import load_recon_geometry

    ckpt = sb.make_recon_checkpoint(tmp_path, 10)
    state = torch.load(ckpt)
    state["pipeline"]["_model.gauss_params.means"][3, 1] = float("nan")
    state["pipeline"]["_model.gauss_params.quats"][7, 0] = float("inf")
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="dropping 2 of 10 Gaussians"):
        geometry, _, _ = load_recon_geometry(ckpt)
    assert all(v.shape[0] == 8 and torch.isfinite(v).all() for v in geometry.values())
    state["pipeline"]["_model.gauss_params.scales"][:] = float("nan")
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="diverged"):
        load_recon_geometry(ckpt)


def test_format_markdown_handmade_rows():
    row = {"gaussians": 50000, "height": 128, "width": 128, "threads": 1, "setup_s": 1.234, "knn_s": 0.5,
           "plain_total_s": 0.75, "plain_forward_s": 0.25, "plain_loss_s": 0.2, "plain_backward_s": 0.25,
           "plain_optimizer_s": 0.05, "lc_total_s": 0.8, "refresh_total_s": 3.5, "step_peak_mib": 41.6,
           "peak_mib": 300.2,
           "profile": {"plain": {"step: forward": 0.5, "step: loss": 0.25, "step: backward": 0.25,
                                 "knn smoothing fwd": 0.125}}}
    err = {"gaussians": 200000, "height": 256, "width": 256, "threads": 2, "error": "timeout after 10 s"}
    md = sb.format_markdown([row, err])
    lines = md.splitlines()
    assert lines[0].startswith("| Gaussians | px | threads |")
    assert lines[2] == ("| 50000 | 128×128 | 1 | 1.23 | 0.50 | **0.750** | 0.250 | 0.200 | 0.250 | 0.050 | 0.800 "
                        "| 3.50 | 42 | 300 |")
    assert lines[3] == "| 200000 | 256×256 | 2 | error: timeout after 10 s |"
    assert "| knn smoothing fwd | 0.125 (12 %) |" in md
    assert "| **step: forward** | 0.500 (50 %) |" in md
    assert "step: optimizer" not in md  # parts missing from every profile are left out


@pytest.mark.slow
def test_tiny_benchmark_in_fresh_process(tmp_path):
    out = tmp_path / "bench.md"
    rows = sb.run_contrast_step_bench(sizes=(2000,), resolutions=((32, 32),), threads=(1,), repeats=2, output=out,
                                      log=False)
    assert len(rows) == 1
    r = rows[0]
    assert "error" not in r, r.get("error")
    assert (r["gaussians"], r["height"], r["width"], r["threads"], r["torch_threads"]) == (2000, 32, 32, 1, 1)
    for kind in ("plain", "lc", "refresh"):
        parts = [r[f"{kind}_{k}_s"] for k in ("forward", "loss", "backward", "optimizer")]
        assert all(p > 0 for p in parts) and r[f"{kind}_total_s"] > 0, kind
    assert 0 < r["knn_s"] <= r["setup_s"]
    assert math.isfinite(r["peak_mib"]) and math.isfinite(r["step_peak_mib"]) and r["rss_base_mib"] > 0
    assert 0 < r["covered_px"] <= 32 * 32
    assert len(r["centroids"]) == 2
    prof = r["profile"]
    assert "centroid refresh: start" in prof["refresh"] and "centroid refresh: start" not in prof["plain"]
    assert "centroid refresh: merge" in prof["merge"]
    for part in ("knn smoothing fwd", "knn smoothing bwd", "compositing fwd", "compositing bwd", "sampling: pairs",
                 "step: backward", "step: optimizer"):
        assert prof["plain"].get(part, 0) > 0, part
    md = out.read_text()
    assert md.startswith("| Gaussians |") and "| 2000 | 32×32 | 1 |" in md and "refresh step" in md
