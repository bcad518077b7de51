"""Priors attached to training batches by PepeDatamanager."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig, downscale_prior_batch
from pepeseg3d_ns.data.dataparser import PepeDataParserConfig
from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError
from pepeseg3d_ns.priors.cli import Priors
from pepeseg3d_ns.priors.compute import datamanager_images
from pepeseg3d_ns.priors.masks import MaskSet
from pepeseg3d_ns.priors.pixel_masks import PixelMasks


@pytest.fixture(scope="module")
def scene_with_priors(tmp_path_factory) -> Path:
    scene = tmp_path_factory.mktemp("attach") / "tabletop"
    generate_scene(SynthConfig(scene="tabletop", output_dir=scene, n_views=8, resolution=48, n_init_points=500), progress=False)
    Priors(data=scene, progress=False, preview=False).main()
    return scene


def _datamanager(data: Path, **kwargs):
    cfg = PepeDatamanagerConfig(data=data, dataparser=PepeDataParserConfig(data=data), **kwargs)
    return cfg.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)


def test_batches_carry_this_images_priors(scene_with_priors):
    dm = _datamanager(scene_with_priors, priors="require")
    cache = PriorCache.open(scene_with_priors / "pepe_priors")
    keys = [im.key for im in datamanager_images(dm)]
    assert dm.prior_keys == keys
    for step in range(3):
        camera, batch = dm.next_train(step)
        pri = cache.load(keys[camera.metadata["cam_idx"]])
        pm = batch["pixel_masks"]
        assert isinstance(pm, PixelMasks) and (pm.height, pm.width) == (48, 48) and pm.num_masks > 3
        masks = pm.to_dense()
        assert torch.equal(masks, torch.from_numpy(pri.masks.to_dense()))
        assert torch.equal(pm.mask_area, masks.flatten(1).sum(1))
        assert pm.pixel_set.shape == (48 * 48,) and pm.nbytes() < masks.numel()  # compact: under a byte a pixel-mask
        assert "sam_masks" not in batch and "prior_masks" not in batch  # no dense stack, no packed copy per step
        assert batch["depth_prior"].shape == (48, 48, 1) and batch["depth_prior"].dtype == torch.float32
        np.testing.assert_allclose(batch["depth_prior"][..., 0].numpy(), pri.depth, rtol=1e-6)
    # the image cache holds the packed masks and the per-pixel sets, built once per image, not dense tensors
    assert all(isinstance(d["prior_masks"], MaskSet) for d in dm.cached_train)
    assert all(isinstance(d["pixel_masks"], PixelMasks) for d in dm.cached_train)
    assert all("sam_masks" not in d for d in dm.cached_train)


def test_priors_follow_camera_res_scale_factor(scene_with_priors, tmp_path):
    """Rescaled images are other pixels, so other entries: "auto" computes them at the rescaled size (never a
    resampled copy of the full-size masks); "require" names the command with the same flag."""
    copy = tmp_path / "copy"
    shutil.copytree(scene_with_priors, copy)
    with pytest.raises(PriorCacheError, match="--camera-res-scale-factor 0.5"):
        _datamanager(copy, priors="require", camera_res_scale_factor=0.5)
    dm = _datamanager(copy, priors="auto", camera_res_scale_factor=0.5)
    _, batch = dm.next_train(0)
    assert batch["image"].shape[:2] == (24, 24)
    assert (batch["pixel_masks"].height, batch["pixel_masks"].width) == (24, 24)
    assert batch["depth_prior"].shape == (24, 24, 1)


def test_downscale_prior_batch_matches_image_pooling():
    pm = PixelMasks.from_dense(torch.ones(1, 8, 8, dtype=torch.bool))
    batch = {"pixel_masks": pm, "depth_prior": torch.arange(64.0).reshape(8, 8, 1)}
    out = downscale_prior_batch(batch, 4)
    assert out["pixel_masks"] is pm  # masks stay at full resolution (refinement reads them at scaled coordinates)
    assert out["depth_prior"].shape == (2, 2, 1)
    assert out["depth_prior"][0, 0, 0].item() == pytest.approx(np.arange(64.0).reshape(8, 8)[:4, :4].mean())
    assert downscale_prior_batch(batch, 1) is batch


def test_missing_cache_require_names_the_command(scene_with_priors, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(scene_with_priors, bare, ignore=shutil.ignore_patterns("pepe_priors"))
    with pytest.raises(PriorCacheError, match="pepeseg3d priors --data"):
        _datamanager(bare, priors="require")
    dm = _datamanager(bare, priors="off")
    _, batch = dm.next_train(0)
    assert "pixel_masks" not in batch and dm.prior_keys is None


def test_evaluation_and_viewer_need_no_priors(scene_with_priors, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(scene_with_priors, bare, ignore=shutil.ignore_patterns("pepe_priors"))
    for mode in ("test", "inference"):
        cfg = PepeDatamanagerConfig(data=bare, dataparser=PepeDataParserConfig(data=bare), priors="require")
        dm = cfg.setup(device="cpu", test_mode=mode, world_size=1, local_rank=0)
        assert dm.prior_keys is None
    assert not (bare / "pepe_priors").exists()


def test_changed_image_gets_its_own_priors(scene_with_priors, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scene_with_priors, copy)
    img = sorted((copy / "images").glob("*.png"))[2]
    from PIL import Image

    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    with pytest.raises(PriorCacheError, match="1 of .* training images have no usable perception priors"):
        _datamanager(copy, priors="require")
    before = set(PriorCache.open(copy / "pepe_priors").keys())
    dm = _datamanager(copy, priors="auto")  # simulated priors for the changed image
    after = set(PriorCache.open(copy / "pepe_priors").keys())
    assert len(after - before) == 1 and set(dm.prior_keys) <= after and (after - before) <= set(dm.prior_keys)
