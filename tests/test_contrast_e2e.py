"""pepe-contrast end to end on CPU: a short pepe-recon run, then a short pepe-contrast run on its frozen geometry;
losses fall, the checkpoint reloads through ns-eval's loader, the query API and `pepeseg3d segment` work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
from tb_logs import scalars

pytestmark = pytest.mark.slow

MIOU_MARGIN = {"parts": 0.0, "objects": 0.0, "groups": 0.0}
"""How far each level's mIoU must be above the better trivial predictor (reference bbox, all foreground)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nerfstudio.scripts.train import train_loop

    from pepeseg3d_ns.recipes import make_config, make_contrast_config
    from pepeseg3d_ns.priors.cli import Priors

    scene = tmp_path_factory.mktemp("scene") / "tabletop"
    generate_scene(SynthConfig(scene="tabletop", output_dir=scene, n_views=12, resolution=48, n_init_points=2000),
                   progress=False)
    Priors(data=scene, progress=False, preview=False).main()
    out = tmp_path_factory.mktemp("runs")
    recon = make_config(scene, out, steps=200, device="cpu")
    recon.save_config()
    train_loop(local_rank=0, world_size=1, config=recon)
    recon_cfg = recon.get_base_dir() / "config.yml"
    contrast = make_contrast_config(recon_cfg, out, steps=120, device="cpu")
    contrast.data = contrast.pipeline.datamanager.data = None  # no --data: taken from the recon run
    contrast.logging.steps_per_log = 5
    contrast.eval_at_end = "all"  # the final all-views evaluation with label propagation (test_ns_eval_cli)
    contrast.save_config()
    train_loop(local_rank=0, world_size=1, config=contrast)
    return scene, recon_cfg, contrast.get_base_dir() / "config.yml"


def test_method_registered():
    code = ("from nerfstudio.plugins.registry import discover_methods;"
            "m, _ = discover_methods(); assert 'pepe-contrast' in m and 'pepe-recon' in m; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_missing_recon_checkpoint_is_a_clear_error(tmp_path):
    from pepeseg3d_ns.contrast.model import resolve_recon_checkpoint

    with pytest.raises(ValueError, match="recon-checkpoint"):
        resolve_recon_checkpoint(None)
    with pytest.raises(FileNotFoundError, match="ns-train pepe-recon"):
        resolve_recon_checkpoint(tmp_path / "nothing" / "config.yml")


def test_losses_fall_and_schedule_scaled(runs):
    import yaml

    _, _, cfg = runs
    config = yaml.load(cfg.read_text(), Loader=yaml.Loader)
    assert config.pipeline.model.centroid_start == 84 and config.pipeline.model.centroid_every == 10
    assert config.pipeline.model.gate_warmup == 36  # 0.3 x 120 steps
    run_dir = cfg.parent
    lm = [v for _, v in scalars(run_dir, "Train Loss Dict/contrast_loss")]
    total = [v for _, v in scalars(run_dir, "Train Loss")]
    assert len(lm) >= 10 and len(total) >= 10, (lm, total)
    # Lm is noisy from view to view (each step sees another view's masks): compare the run's two ends
    first, last = np.mean(lm[:5]), np.mean(lm[-5:])
    assert last < first, f"Lm did not fall: {first:.4f} -> {last:.4f}"
    assert np.mean(total[-3:]) < 0.7 * np.mean(total[:3]), total
    assert scalars(run_dir, "Train Loss Dict/perception_loss")
    assert scalars(run_dir, "Train Loss Dict/centroid_loss"), "the centroid loss never ran"
    centroids = scalars(run_dir, "Train Metrics Dict/centroids_upper")
    assert centroids and centroids[-1][1] > 0


def test_checkpoint_reloads_with_features_centroids_and_scales(runs):
    from nerfstudio.utils.eval_utils import eval_setup

    scene, recon_cfg, cfg = runs
    _, pipeline, _, step = eval_setup(cfg, test_mode="test")
    model = pipeline.model
    assert step == 119
    assert model.gauss_features.shape == (model.num_points, 32)
    assert model.knn.shape == (model.num_points, 16)
    assert model.centroids_upper.shape[0] > 0 and len(model.bank_upper) == model.centroids_upper.shape[0]
    assert not any(p.requires_grad for p in model.gauss_params.values())
    scales = model.mask_scales  # stored in the run's checkpoint, not in the scene's cache
    assert scales is not None and "nerfstudio_models" in scales.source["checkpoint"]
    assert len(scales.keys) == len(pipeline.datamanager.train_dataset)
    assert all(np.nanmin(s) >= 0 and np.nanmax(s) <= 1 for s in scales.per_image())
    cam = pipeline.datamanager.eval_dataset.cameras[0:1]
    out = model.get_outputs_for_camera(cam)
    assert out["feature_pca"].shape == (48, 48, 3) and out["rgb"].shape == (48, 48, 3)


def test_ns_eval_cli(runs, tmp_path):
    """ns-eval's segmentation metrics: the values the run logged after its last step (a second process on the
    reloaded checkpoint), consistent with the per-object scores, and above two trivial predictors scored on the
    same (object, view) pairs: the reference mask's bounding box and all foreground."""
    import json

    from nerfstudio.utils.eval_utils import eval_setup

    from pepeseg3d_ns.eval.propagation import trivial_baseline

    _, _, cfg = runs
    out_json = tmp_path / "eval.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["ns-eval", "--load-config", str(cfg), "--output-path", str(out_json)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = json.loads(out_json.read_text())["results"]
    seg = results["segmentation"]
    assert set(seg["per_object"]) == {"parts", "objects", "groups"}
    assert all(c["reference"].startswith("train:") for c in seg["choices"])  # never an eval view
    final = json.loads((cfg.parent / "final_eval.json").read_text())["metrics"]
    for key in ("psnr", "miou", "macc", "mbiou", "miou_parts", "miou_objects", "miou_groups"):
        assert results[key] == pytest.approx(final[key], abs=1e-6), key
    for level, objs in seg["per_object"].items():
        assert results[f"miou_{level}"] == pytest.approx(np.mean([o["iou"] for o in objs.values()]), abs=1e-9)
    _, pipeline, _, _ = eval_setup(cfg, test_mode="test")
    base = {k: trivial_baseline(pipeline, k)["summary"]["per_level"] for k in ("bbox", "foreground")}
    print("MEASURED", {l: results[f"miou_{l}"] for l in ("parts", "objects", "groups")},
          {k: {l: v[l]["miou"] for l in v} for k, v in base.items()})
    for level, margin in MIOU_MARGIN.items():
        best_trivial = max(b[level]["miou"] for b in base.values())
        assert results[f"miou_{level}"] > best_trivial + margin, (level, results[f"miou_{level}"], best_trivial)


def test_decompose_cli(runs, tmp_path):
    from PIL import Image

    _, _, cfg = runs
    out = tmp_path / "dec"
    proc = subprocess.run(["pepeseg3d", "decompose", "--load-config", str(cfg), "--scales", "0.1", "0.9",
                           "--max-views", "3", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    band_h = sheet.shape[0] - 3 * 48 * 2  # 3 views x (render | s=0.1 | s=0.9) at 2x, under the title / column labels
    assert sheet.shape[1:] == (3 * 48 * 2, 3) and band_h > 10, sheet.shape
    assert (sheet[:band_h] == 255).all(-1).mean() > 0.5 and (sheet[:band_h] < 100).all(-1).any()
    assert len(list((out / "s0.1").glob("*.png"))) == 3


def test_query_api_selects_consistently(runs):
    from nerfstudio.utils.eval_utils import eval_setup

    from pepeseg3d_ns.contrast.query import query_from_pixels, render_view, segment_view, select_gaussians, similarity_map

    _, _, cfg = runs
    _, pipeline, _, _ = eval_setup(cfg, test_mode="test")
    model = pipeline.model
    view = render_view(model, pipeline.datamanager.train_dataset.cameras[0:1])
    q = query_from_pixels(view, 0.5, [(24, 30)])
    sim = similarity_map(view, 0.5, q)
    assert sim[30, 24] > 0.999  # the clicked pixel matches itself
    mask = segment_view(view, 0.5, q, threshold=0.7)
    assert mask[30, 24] and 0 < mask.sum() < 48 * 48
    sel = select_gaussians(model, 0.5, q, threshold=0.7)
    assert 0 < sel.sum() < model.num_points
    with pytest.raises(ValueError, match="outside"):
        query_from_pixels(view, 0.5, [(100, 3)])
    with pytest.raises(ValueError, match="scale"):
        query_from_pixels(view, 1.5, [(3, 3)])


def test_segment_cli_writes_ply_and_masks(runs, tmp_path):
    from plyfile import PlyData

    from pepeseg3d_ns.export import splat_ply_properties

    _, _, cfg = runs
    out = tmp_path / "seg"
    proc = subprocess.run(["pepeseg3d", "segment", "--load-config", str(cfg), "--click", "24", "30", "--click", "10", "40",
                           "--view", "1", "--scale", "0.5", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    idx = np.load(out / "selection_indices.npy")
    ply = PlyData.read(str(out / "selection.ply"))
    v = ply["vertex"]
    assert v.count == idx.size > 0
    names = [p.name for p in v.properties]
    assert names == splat_ply_properties(15)  # SH degree 3
    assert len(list((out / "masks").glob("*.png"))) == 11  # every training view
    assert (out / "overlay.png").is_file()


def test_a_copied_run_opens_without_the_priors_cache(runs, tmp_path):
    """The run folder copied elsewhere, its scene without pepe_priors/: ns-viewer's loader (eval_setup in test mode)
    and `pepeseg3d segment` open it; the mask scales come from the checkpoint."""
    import shutil

    from pepeseg3d_ns.segment import run_segment
    from pepeseg3d_ns.trainer import load_run

    scene, _, cfg = runs
    scene_copy = tmp_path / "scene"
    shutil.copytree(scene, scene_copy, ignore=shutil.ignore_patterns("pepe_priors"))
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(cfg.parent, moved)
    import yaml

    config = yaml.load((moved / "config.yml").read_text(), Loader=yaml.Loader)  # our own file, written by the fixture
    config.output_dir = tmp_path / "the_old_place_is_gone"
    config.data = config.pipeline.datamanager.data = config.pipeline.datamanager.dataparser.data = scene_copy
    (moved / "config.yml").write_text(yaml.dump(config))
    _, pipeline, ckpt, step = load_run(moved / "config.yml", test_mode="test")
    assert Path(ckpt).parent == moved / "nerfstudio_models"
    assert pipeline.model.mask_scales is not None and pipeline.datamanager.prior_keys is None
    summary = run_segment(moved / "config.yml", [(24.0, 24.0)], view=0, scale=0.8, output_dir=tmp_path / "seg",
                          all_views=False, progress=False)
    assert summary["views"] == 1 and (tmp_path / "seg" / "overlay.png").is_file()
    assert not (scene_copy / "pepe_priors").exists()
