"""Schedules follow --max-num-iterations (pepeseg3d_ns.schedule)."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture()
def recon_config():
    from pepeseg3d_ns.methods import pepe_recon

    return copy.deepcopy(pepe_recon.config)


def test_reference_length_changes_nothing(recon_config):
    from pepeseg3d_ns.schedule import scale_schedule

    assert recon_config.max_num_iterations == 30000
    assert scale_schedule(recon_config) == []
    assert recon_config.pipeline.model.refine_start == 4000


def test_short_run_schedule_and_user_fields_kept(recon_config):
    from pepeseg3d_ns.schedule import scale_schedule

    recon_config.max_num_iterations = 3000
    recon_config.pipeline.model.stop_split_at = 2500  # set by the user: kept
    changes = dict((k, new) for k, _, new in scale_schedule(recon_config))
    m = recon_config.pipeline.model
    assert m.stop_split_at == 2500 and "pipeline.model.stop_split_at" not in changes
    assert (m.warmup_length, m.num_downscales, m.sh_degree_interval, m.stop_screen_size_at) == (300, 0, 375, 3000)
    assert m.refine_start == 400  # 4000 * 3000 / 30000, after the 300-step warm-up
    assert recon_config.optimizers["means"]["scheduler"].max_steps == 3000
    assert recon_config.optimizers["camera_opt"]["scheduler"].max_steps == 3000
    assert scale_schedule(recon_config) == []  # idempotent


def test_refinement_never_before_warmup(recon_config):
    from pepeseg3d_ns.schedule import scale_schedule

    recon_config.max_num_iterations = 300
    scale_schedule(recon_config)
    m = recon_config.pipeline.model
    assert m.warmup_length == 100 and m.refine_start == 100


def test_long_run_scales_proportionally(recon_config):
    from pepeseg3d_ns.schedule import scale_schedule

    recon_config.max_num_iterations = 60000
    scale_schedule(recon_config)
    m = recon_config.pipeline.model
    assert (m.warmup_length, m.stop_split_at, m.refine_start, m.reset_alpha_every) == (1000, 30000, 8000, 60)


def test_bad_length(recon_config):
    from pepeseg3d_ns.schedule import scale_schedule

    with pytest.raises(ValueError, match="positive"):
        scale_schedule(recon_config, 0)
