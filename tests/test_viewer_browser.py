"""End to end in a real browser: `ns-viewer --load-config` on a tiny pepe-recon run, opened in headless Chromium
(tests/browser.py). Needs Debian's chromium and the playwright package (`bash scripts/install_system_deps.sh`):
without them these tests fail when CI is set and skip otherwise.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from browser import open_viewer, require_browser

pytestmark = pytest.mark.slow

TRAIN_STEPS = 60
VIEWPORT = (1200, 800)


@pytest.fixture(scope="module")
def browser_ready():
    require_browser()


@pytest.fixture(scope="module")
def tiny_recon_run(browser_ready, tmp_path_factory) -> Path:
    """A 48 px, 8-view tabletop scene with simulated priors and 60 CPU steps of pepe-recon; returns its
    config.yml. Trained in-process through the Trainer (nerfstudio.scripts.train's import alone costs ~10 s)."""
    import torch

    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
    from pepeseg3d_ns.recipes import make_config
    from pepeseg3d_ns.priors.cli import Priors

    scene = tmp_path_factory.mktemp("viewer_scene") / "tabletop"
    generate_scene(SynthConfig(scene="tabletop", output_dir=scene, n_views=8, resolution=48, n_init_points=1500), progress=False)
    Priors(data=scene, progress=False, preview=False).main()
    config = make_config(scene, tmp_path_factory.mktemp("viewer_runs"), steps=TRAIN_STEPS, device="cpu")
    config.pipeline.model.warmup_length = 20
    config.pipeline.model.refine_every = 20
    config.logging.local_writer.enable = False
    config.save_config()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    path = config.get_base_dir() / "config.yml"
    assert path.is_file() and list((path.parent / "nerfstudio_models").glob("step-*.ckpt"))
    return path


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_output_type_rgb_and_depth_render_differently(tiny_recon_run, tmp_path):
    with open_viewer(tiny_recon_run, log_path=tmp_path / "viewer.log", env={"CUDA_VISIBLE_DEVICES": ""},
                     viewport=VIEWPORT) as (server, page):
        # a lower render resolution keeps the CPU render quick; also exercises the slider helper
        page.set_slider("Max res", 256)
        assert page.get_slider("Max res") == 256
        rgb = page.wait_for_render()
        assert page.dropdown_value("Output type") == "rgb"
        options = page.dropdown_options("Output type")
        assert {"rgb", "depth", "accumulation"} <= set(options), options
        page.screenshot(tmp_path / "viewer_rgb.png")

        page.select_dropdown("Output type", "depth")
        depth = page.wait_for_change(rgb)
        page.screenshot(tmp_path / "viewer_depth.png")
        # the server reacted: depth is one channel, so the colormap dropdown now offers real colormaps
        assert "turbo" in page.dropdown_options("Colormap")

        page.select_dropdown("Output type", "rgb")
        rgb_again = page.wait_for_change(depth)

    for name, img in (("rgb", rgb), ("depth", depth)):
        assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 300, (name, img.shape)
        assert img.std() > 5.0, f"{name} viewport is (nearly) uniform: std {img.std():.2f}"
    assert _mean_abs_diff(rgb, depth) > 10.0
    # switching back gives the rgb picture again (same camera, deterministic render), far closer than depth is
    assert _mean_abs_diff(rgb, rgb_again) < 0.5 * _mean_abs_diff(rgb, depth)
    # depth is shown through a colormap (turbo): its channels vary, it is not a grey ramp
    assert depth.reshape(-1, 3).std(axis=0).max() > 5.0


def test_canvas_click_reaches_the_server(tiny_recon_run, tmp_path):
    """A model-side button registers a click callback (ViewerControl.register_pointer_cb); a click on the canvas
    arrives as a ViewerClick whose screen_pos is the clicked canvas pixel, normalised, and whose ray projects to
    the same pixel of the viewer camera (tests/browser.py: attach_click_probe)."""
    with open_viewer(tiny_recon_run, log_path=tmp_path / "viewer.log", env={"CUDA_VISIBLE_DEVICES": ""},
                     viewport=VIEWPORT, click_probe=True) as (server, page):
        page.wait_for_render(full_resolution=False)
        assert page.get_text("Last click") == "none"
        _, _, w, h = page.canvas_box()
        page.click_canvas(w * 0.25, h * 0.5)  # no pointer callback registered yet: the client sends nothing
        time.sleep(1.0)
        assert page.get_text("Last click") == "none"
        page.press_button("Listen for click")
        x, y = round(w * 0.3), round(h * 0.6)
        # the server's "enable pointer" message reaches the client asynchronously: click until a value arrives
        deadline_clicks = 20
        for _ in range(deadline_clicks):
            page.click_canvas(x, y)
            try:
                page._poll(lambda: page.get_text("Last click") != "none", "the click", timeout_s=1.5)
                break
            except TimeoutError:
                continue
        text = page.get_text("Last click")
        assert text != "none", f"no click reached the server after {deadline_clicks} clicks"
        event = json.loads(text)

    sx, sy = event["screen_pos"]
    assert abs(sx - (x + 0.5) / w) < 0.01 and abs(sy - (y + 0.5) / h) < 0.01, (event, (x, y, w, h))
    assert abs(np.linalg.norm(event["direction"]) - 1.0) < 1e-3
    iw, ih = event["image_size"]
    assert abs(iw / ih - w / h) < 0.02  # the viewer camera has the canvas' aspect ratio
    # screen_pos * (W, H) and the ray projected with get_camera's intrinsics name the same pixel
    assert np.allclose(event["pixel_from_ray"], event["pixel_from_screen_pos"], atol=1.0), event
