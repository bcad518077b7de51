"""The paper's settings as one switch (pepeseg3d_ns/paper.py) and the loss normalisations it selects, on
hand-made inputs whose answer is known."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pepeseg3d_ns.contrast import losses as L
from pepeseg3d_ns.contrast import sampling as S
from pepeseg3d_ns.paper import (DEFAULT_GATE_LR, PAPER_CONTRAST_MODEL, PAPER_CONTRAST_PIPELINE,
                                PAPER_DEFAULT_CONTRAST_MODEL, PAPER_DEFAULT_CONTRAST_PIPELINE, PAPER_DEFAULT_RECON_MODEL,
                                PAPER_GATE_LR, PAPER_RECON_MODEL, apply_paper_settings)
from pepeseg3d_ns.priors.pixel_masks import PixelMasks


def test_lm_normalisations():
    """Three valid pairs, weights 1, 2, 7, per-pair terms 1 (positive, cos 0), 0 (positive, cos 1), 0.5 (negative,
    cos 0.5); a fourth pair is invalid. Weighted average: (1 + 0 + 3.5) / 10 = 0.45; eq. 8's mean: 4.5 / 3 = 1.5."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = torch.tensor([0.5, math.sqrt(0.75)])
    fi = torch.stack([e0, e0, e0, e0])
    fj = torch.stack([e1, e0, half, e1])
    positive = torch.tensor([True, True, False, True])
    weight = torch.tensor([1.0, 2.0, 7.0, 100.0])
    valid = torch.tensor([True, True, True, False])
    assert L.scale_contrastive_loss(fi, fj, positive, weight, valid).item() == pytest.approx(0.45)
    assert L.scale_contrastive_loss(fi, fj, positive, weight, valid, normalise="mean").item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="normalise"):
        L.scale_contrastive_loss(fi, fj, positive, weight, valid, normalise="sum")


def test_lc_normalisations():
    """Four pixels, one centroid e0: cosines 1, 0.95, 0.5, 0.99 (tau 0.9), the last one not valid. Confident:
    (0 + 0.05) / 2; eq. 5 over all valid pixels: 0.05 / 3."""
    angles = torch.tensor([0.0, math.acos(0.95), math.acos(0.5), math.acos(0.99)])
    feats = torch.stack([angles.cos(), angles.sin()], dim=1)
    c = torch.tensor([[1.0, 0.0]])
    valid = torch.tensor([True, True, True, False])
    assert L.centroid_pull_loss(feats, c, 0.9, valid).item() == pytest.approx(0.025, abs=1e-6)
    assert L.centroid_pull_loss(feats, c, 0.9, valid, normalise="all").item() == pytest.approx(0.05 / 3, abs=1e-6)
    assert L.centroid_pull_loss(feats, c, 0.9, None, normalise="all").item() == pytest.approx(0.06 / 4, abs=1e-6)


def _half_covered():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True  # 16 px
    masks[1, :4, :] = True  # 32 px: the top half; the bottom half is in no mask
    return PixelMasks.from_dense(masks), torch.tensor([0.2, 0.6])


def test_pixel_region_image_draws_everywhere_and_lm_still_pairs_covered_pixels():
    pm, scales = _half_covered()
    covered_w = S.set_draw_weights(pm, scales, "uniform")
    image_w = S.set_draw_weights(pm, scales, "uniform", region="image")
    per_pixel = lambda w: w.index_select(0, pm.pixel_set.long())  # noqa: E731
    assert int((per_pixel(covered_w) > 0).sum()) == 32 and int((per_pixel(image_w) > 0).sum()) == 64
    for mode in ("omega", "mask"):  # every pixel drawable, covered ones at least as likely as uncovered
        w = per_pixel(S.set_draw_weights(pm, scales, mode, region="image"))
        assert bool((w > 0).all()) and w[:32].min() >= w[32:].max()
    g = torch.Generator().manual_seed(0)
    pix, ok = S.draw_pixels(pm, image_w, 48, generator=g)
    assert bool(ok.all()) and int((pix >= 32).sum()) >= 16  # at least 16 of the 48 come from the uncovered half
    sm = S.gather_sampled(pm, pix, scales)
    i, j, s, t = S.set_sample_pairs(pm, sm, 256, generator=g)
    covered = sm.count > 0
    assert bool((covered[i] & covered[j])[t["valid"]].all()) and int(t["valid"].sum()) > 200


def _contrast_config():
    from pepeseg3d_ns.methods import pepe_contrast

    return copy.deepcopy(pepe_contrast.config)


def test_paper_exact_sets_every_listed_setting_and_only_when_asked():
    cfg = _contrast_config()
    assert apply_paper_settings(cfg) == []  # off: nothing changes
    defaults = {k: getattr(cfg.pipeline.model, k) for k in PAPER_CONTRAST_MODEL}
    assert any(defaults[k] != v for k, v in PAPER_CONTRAST_MODEL.items())  # ours differ from the paper's
    cfg.pipeline.model.paper_exact = True
    changes = apply_paper_settings(cfg)
    for k, v in PAPER_CONTRAST_MODEL.items():
        assert getattr(cfg.pipeline.model, k) == v, k
    for k, v in PAPER_CONTRAST_PIPELINE.items():
        assert getattr(cfg.pipeline, k) == v, k
    assert cfg.optimizers["scale_gate"]["optimizer"].lr == PAPER_GATE_LR
    assert len(changes) == (sum(defaults[k] != v for k, v in PAPER_CONTRAST_MODEL.items()) + len(PAPER_CONTRAST_PIPELINE)
                            + (DEFAULT_GATE_LR != PAPER_GATE_LR))
    assert apply_paper_settings(cfg) == []  # idempotent (a resumed run)
    # an option whose default is the paper's value, changed by the run, is put back too
    for k, (_, ours) in PAPER_DEFAULT_CONTRAST_MODEL.items():
        setattr(cfg.pipeline.model, k, ours)
    for k, (_, ours) in PAPER_DEFAULT_CONTRAST_PIPELINE.items():
        setattr(cfg.pipeline, k, ours)
    expected = {**PAPER_DEFAULT_CONTRAST_MODEL, **PAPER_DEFAULT_CONTRAST_PIPELINE}
    assert sorted(apply_paper_settings(cfg)) == sorted(f"{k}={p}" for k, (p, _) in expected.items())

    from pepeseg3d_ns.methods import pepe_recon

    rc = copy.deepcopy(pepe_recon.config)
    rc.pipeline.model.paper_exact = True
    for k, (_, ours) in PAPER_DEFAULT_RECON_MODEL.items():
        setattr(rc.pipeline.model, k, ours)
    apply_paper_settings(rc)
    for k, v in {**PAPER_RECON_MODEL, **{k: p for k, (p, _) in PAPER_DEFAULT_RECON_MODEL.items()}}.items():
        assert getattr(rc.pipeline.model, k) == v, k


def test_paper_exact_schedule_keeps_the_paper_values(tmp_path):
    """The schedule scaling (--max-num-iterations) must not turn the paper's gate warm-up 0 / centroid lag 0
    back into scaled values of ours."""
    from pepeseg3d_ns.schedule import scale_schedule

    cfg = _contrast_config()
    cfg.pipeline.model.paper_exact = True
    apply_paper_settings(cfg)
    cfg.max_num_iterations = 1000
    scale_schedule(cfg)
    assert cfg.pipeline.model.gate_warmup == 0 and cfg.pipeline.model.centroid_lag == 0
    assert cfg.pipeline.model.centroid_start == 700


def test_paper_exact_contrast_steps_train(tmp_path):
    """A few real pepe-contrast steps with every paper setting: all four terms finite and differentiable, and the
    pixels come from the whole view (some outside every mask)."""
    from pepeseg3d_ns.benchmarks import contrast_step as sb

    torch.manual_seed(0)
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 300), centroid_start=2, centroid_every=10,
                              centroid_worker="inline", cluster_min_size=5,
                              **{k: v for k, v in PAPER_CONTRAST_MODEL.items() if k != "centroid_lag"}, centroid_lag=0)
    cam, batch = sb.make_camera((48, 48)), sb.make_batch((48, 48), num_masks=6)  # 2304 px > 1000 drawn
    batch = {k: v for k, v in batch.items() if k not in ("sam_masks", "sam_mask_areas")}
    pm = batch["pixel_masks"]
    covered = S.covered_pixels(pm, model.gate_scales(batch["mask_scales"].float())).flatten()
    assert not bool(covered.all())  # the view has pixels in no mask
    drawn_uncovered = 0
    for step in range(4):
        model.step = step
        out = model(cam)
        pix, ok = model._sample_pixels(pm, model.gate_scales(batch["mask_scales"].float()))
        drawn_uncovered += int((~covered[pix] & ok).sum())
        losses = model.get_loss_dict(out, batch)
        sum(losses.values()).backward()
    assert set(losses) == {"contrast_loss", "perception_loss", "centroid_loss", "norm_loss"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert drawn_uncovered > 0
