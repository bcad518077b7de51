"""A user's own photos, end to end: lens-distorted photos -> ns-process-data (COLMAP) -> priors -> pepe-recon ->
pepe-contrast -> a click with `pepeseg3d segment`; and the same photos past 1600 px (nerfstudio's auto downscale).

The photos are renders of the synthetic tabletop (256 px, 24 views, with a fine surface grain for COLMAP) warped with a real OPENCV lens distortion,
with one object (the snowman) tinted magenta in a copy (its texture kept) so that its ground truth is visible in the pixels. COLMAP (Debian's,
`ns-process-data images --matching-method exhaustive`, offline) estimates the distortion, nerfstudio undistorts
and crops every image it trains on, and the priors must be of those images, pixel for pixel: a mask made from
the processed image's magenta pixels must match the ground-truth mask taken through the same distortion and
nerfstudio's undistortion. The priors of the run itself come from tiny random SAM / Depth-Anything models saved
to disk and loaded through the real loading code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RES = 256
N_VIEWS = 24
DIST = np.array([-0.12, 0.03, 0.0, 0.0])  # OpenCV (k1, k2, p1, p2) of the simulated lens
PAINTED = "snowman"
DETAIL = 0.6  # fine surface grain: without it COLMAP finds ~5 pairs with 100 inliers and its mapper often fails
BIG = 7  # 256 -> 1792 px: past nerfstudio's 1600 px, so it trains on images_2/

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
TIMES: dict = {}


def _run(cmd: list, what: str, timeout: int = 900) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=ENV)
    TIMES[what] = TIMES.get(what, 0.0) + time.perf_counter() - t0
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    return path


def _distortion_maps(K: np.ndarray, res: int):
    """For each pixel of the distorted photo, where it comes from in the pinhole render (OpenCV pixel coords)."""
    import cv2

    u, v = np.meshgrid(np.arange(res, dtype=np.float64), np.arange(res, dtype=np.float64))
    pts = np.stack([u.ravel(), v.ravel()], -1)[:, None]
    und = cv2.undistortPoints(pts, K, DIST, P=K)[:, 0]
    return und[:, 0].reshape(res, res).astype(np.float32), und[:, 1].reshape(res, res).astype(np.float32)


def _distort(img: np.ndarray, maps) -> np.ndarray:
    import cv2

    return cv2.remap(img, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("segment_anything")
    pytest.importorskip("transformers")
    from pepeseg3d_ns.priors.tiny_models import build_tiny_depth_anything, build_tiny_sam

    d = tmp_path_factory.mktemp("models")
    sam, da = build_tiny_sam(d / "sam"), build_tiny_depth_anything(d / "da")
    return ["--sam-checkpoint", sam, "--depth-model", da, "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--min-mask-region-area", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Distorted photos of the tabletop (snowman painted magenta) and their nerfstudio dataset made by COLMAP."""
    if shutil.which("colmap") is None:
        if os.environ.get("CI"):
            pytest.fail("colmap is not installed: `.ci/run` installs it with apt (scripts/install_system_deps.sh)")
        pytest.skip("colmap not installed (apt install colmap)")
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene, intrinsics, load_gt_masks, load_hierarchy

    root = tmp_path_factory.mktemp("own_photos")
    t0 = time.perf_counter()
    scene = generate_scene(SynthConfig(scene="tabletop", output_dir=root / "render", n_views=N_VIEWS, resolution=RES,
                                       detail=DETAIL), progress=False)
    TIMES["render"] = time.perf_counter() - t0
    fx, fy, cx, cy = intrinsics(RES)
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    maps = _distortion_maps(K, RES)
    oid = {r["name"]: r["id"] for r in load_hierarchy(scene)["objects"]}[PAINTED]
    folder = root / "photos"
    folder.mkdir()
    tinted, gt = {}, {}
    for p in sorted((scene / "images").glob("*.png")):
        img = np.array(Image.open(p).convert("RGB"))
        Image.fromarray(_distort(img, maps)).save(folder / f"{p.stem}.jpg", quality=95, subsampling=0)
        obj = load_gt_masks(scene, p.stem, "objects") == oid
        img[obj] = _tint(img[obj])
        tinted[p.stem] = _distort(img, maps)
        gt[p.stem] = _distort(obj.astype(np.float32), maps)  # the object in photo space (soft edge)
    data = root / "P"
    _run([_tool("ns-process-data"), "images", "--data", folder, "--output-dir", data, "--no-gpu",
          "--matching-method", "exhaustive"], "ns-process-data (COLMAP)", timeout=1500)
    meta = json.loads((data / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV" and abs(meta["k1"]) > 0.05, {k: meta.get(k) for k in ("k1", "k2")}
    # the same scene with the snowman tinted, for the alignment check: COLMAP ran on the untinted photos (a tinted
    # object a fifth of the frame leaves too few features for its initial pair at this size); ns-process-data
    # copied them to images/frame_00001.jpg ... in sorted order
    tint_data = root / "P_tinted"
    shutil.copytree(data, tint_data)
    renamed = sorted(p.name for p in (data / "images").iterdir())
    by_name = {}
    for name, stem in zip(renamed, sorted(tinted)):
        Image.fromarray(tinted[stem]).save(tint_data / "images" / name, quality=95, subsampling=0)
        by_name[Path(name).stem] = gt[stem]
    return {"root": root, "data": data, "tinted": tint_data, "gt": by_name}


def _tint(px: np.ndarray) -> np.ndarray:
    """``[P, 3] uint8`` pixels made magenta (fixed chroma) at 85 % of their luminance: the texture stays."""
    y = (px.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) * 0.85
    rgb = np.stack([y + 1.140 * 40, y - 0.976 * 40, y + 2.032 * 40], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _datamanager(data: Path, **kw):
    from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig
    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

    cfg = PepeDatamanagerConfig(data=data, dataparser=PepeDataParserConfig(data=data), **kw)
    return cfg.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)


class MagentaMasks:
    """A mask source of our own (Python API): one mask, the magenta pixels of the image it is given (red and blue
    both well above green)."""

    name = "magenta"
    kind = "imported"

    def signature(self) -> dict:
        return {"magenta": 1}

    def __call__(self, image, stem):
        r, g, b = (image[..., c].astype(np.int32) for c in range(3))
        return {"masks": ((r - g >= 45) & (b - g >= 45))[None]}


class FlatDepth:
    name = "flat"

    def signature(self) -> dict:
        return {"flat": 1}

    def __call__(self, image, stem):
        return np.ones(image.shape[:2], np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_priors_line_up_with_the_undistorted_images(photos, tmp_path):
    """Masks computed through the datamanager's images coincide with the ground truth taken through the lens and
    nerfstudio's undistortion (IoU >= 0.95, boundary IoU >= 0.85); the same masks computed on the raw photos and
    resampled to the trained size (what the plugin did before) are off by the undistortion: their boundary IoU is
    far lower (the object is large, so their plain IoU stays near 0.97)."""
    import torch
    from nerfstudio.data.datamanagers.full_images_datamanager import _undistort_image

    from pepeseg3d_ns.priors.cache import PriorCache
    from pepeseg3d_ns.priors.compute import compute_priors, datamanager_images
    from pepeseg3d_ns.priors.masks import MaskSet

    dm = _datamanager(photos["tinted"], priors="off")
    images = datamanager_images(dm)
    cache = PriorCache.open(tmp_path / "magenta_priors", create=True)
    compute_priors(cache, images, MagentaMasks(), FlatDepth(), progress=False)
    raw_cams = dm.train_dataparser_outputs.cameras
    from pepeseg3d_ns.eval.metrics import boundary_iou

    ious, raw_ious, bious, raw_bious = [], [], [], []
    for i, im in enumerate(images):
        cam = raw_cams[i]
        dist = cam.distortion_params.numpy()
        assert np.any(dist != 0)
        gt_photo = photos["gt"][im.stem]
        gt8 = np.repeat((gt_photo * 255).round().astype(np.uint8)[..., None], 3, -1)
        _, gt_und, _ = _undistort_image(cam.reshape(()), dist.copy(), {}, gt8, cam.get_intrinsics_matrices().numpy().copy())
        gt_mask = gt_und[..., 0] >= 128
        cached = cache.load(im.key).masks.mask(0)
        assert cached.shape == gt_mask.shape == im.hw == tuple(dm.cached_train[i]["image"].shape[:2])
        if gt_mask.sum() < 1500:
            continue
        ious.append(_iou(cached, gt_mask))
        bious.append(boundary_iou(cached, gt_mask, band=2))
        raw = MagentaMasks()(np.array(Image.open(photos["tinted"] / im.source_file).convert("RGB")), im.stem)["masks"]
        resampled = MaskSet.from_dense(raw).resized(*im.hw).mask(0)
        raw_ious.append(_iou(resampled, gt_mask))
        raw_bious.append(boundary_iou(resampled, gt_mask, band=2))
    assert len(ious) >= 5
    assert np.median(ious) >= 0.95, ious
    assert np.median(bious) >= 0.85, bious
    assert np.median(raw_bious) < 0.7 and np.median(raw_ious) < np.median(ious), (raw_bious, raw_ious)
    print(f"\nalignment on {len(ious)} views: IoU {np.median(ious):.3f} / boundary IoU {np.median(bious):.3f}; on the "
          f"raw photos resized: {np.median(raw_ious):.3f} / {np.median(raw_bious):.3f}")
    assert torch.is_tensor(dm.cached_train[0]["image"])


def _train(method: str, args: list, out: Path, steps: int, what: str) -> Path:
    _run([_tool("ns-train"), method, "--machine.device-type", "cpu", "--vis", "tensorboard", "--output-dir", out,
          "--timestamp", "run", "--max-num-iterations", steps, "--pipeline.model.compute-lpips", "False", *args],
         what, timeout=1500)
    cfgs = sorted(out.glob(f"*/{method}/run/config.yml"))
    assert len(cfgs) == 1, list(out.rglob("config.yml"))
    return cfgs[0]


def test_own_photos_end_to_end(photos, tiny_models, tmp_path):
    """The README's "Your own photos" commands, with no flag about the data: priors, both stages, a click."""
    data = photos["data"]
    _run([_tool("pepeseg3d"), "priors", "--data", data, *tiny_models], "priors (tiny SAM + DA)")
    dm = _datamanager(data, priors="require")
    assert len(dm.prior_keys) == len(dm.train_dataset)
    for d in dm.cached_train[:3]:
        assert d["prior_masks"].shape == tuple(d["image"].shape[:2]) == tuple(d["depth_prior"].shape[:2])
        assert d["image"].shape[0] < RES  # undistorted and cropped
    recon = _train("pepe-recon", ["--data", data], tmp_path / "out", 60, "pepe-recon")
    contrast = _train("pepe-contrast", ["--pipeline.model.recon-checkpoint", recon], tmp_path / "out", 30, "pepe-contrast")
    seg = tmp_path / "seg"
    proc = _run([_tool("pepeseg3d"), "segment", "--load-config", contrast, "--click", 120, 120, "--view", 0,
                 "--scale", 0.8, "--output-dir", seg, "--no-all-views"], "segment")
    assert "gaussians" in proc.stdout.lower() or list(seg.iterdir()), proc.stdout
    masks = sorted(seg.rglob("*.png"))
    assert masks and np.asarray(Image.open(masks[0])).shape[:2] == dm.cached_train[0]["image"].shape[:2]


def test_photos_past_1600px_train_on_images_2_and_the_error_names_a_working_command(photos, tiny_models, tmp_path):
    """Photos 7x larger (1792 px): nerfstudio picks downscale factor 2 (images_2/). Without priors, the error names
    a `pepeseg3d priors` command, and running that command (with the tiny models' flags) gives priors of the
    undistorted images_2/ images, at their size, and training starts."""
    from nerfstudio.process_data.process_data_utils import downscale_images

    from pepeseg3d_ns.priors.cache import PriorCacheError

    big = tmp_path / "P_big"
    (big / "images").mkdir(parents=True)
    meta = json.loads((photos["data"] / "transforms.json").read_text())
    for f in meta["frames"]:
        src = photos["data"] / f["file_path"]
        with Image.open(src) as im:
            im.convert("RGB").resize((RES * BIG, RES * BIG), Image.BICUBIC).save(big / f["file_path"], quality=92)
    for k in ("fl_x", "fl_y", "cx", "cy"):
        meta[k] *= BIG
    meta["w"], meta["h"] = RES * BIG, RES * BIG
    (big / "transforms.json").write_text(json.dumps(meta))
    shutil.copy(photos["data"] / meta["ply_file_path"], big / meta["ply_file_path"])
    downscale_images(big / "images", num_downscales=2, folder_name="images", nearest_neighbor=False, verbose=False)

    with pytest.raises(PriorCacheError) as err:
        _datamanager(big, priors="require")
    msg = str(err.value)
    assert "images_2/" in msg, msg
    cmd = re.search(r"^\s*(pepeseg3d priors .*)$", msg, re.M).group(1)
    argv = shlex.split(cmd)
    argv = [a for a in argv if a != "sam_vit_h_4b8939.pth" and a != "--sam-checkpoint"]
    _run([_tool("pepeseg3d"), *argv[1:], *[str(a) for a in tiny_models]], "the suggested priors command")
    dm = _datamanager(big, priors="require")
    h, w = dm.cached_train[0]["image"].shape[:2]
    assert RES * BIG // 2 - 40 < w <= RES * BIG // 2 and dm.cached_train[0]["prior_masks"].shape == (h, w)
    _train("pepe-recon", ["--data", big], tmp_path / "out", 5, "pepe-recon at 896 px")


@pytest.fixture(scope="module", autouse=True)
def _print_times():
    yield
    print("\nown-photos module, seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMES.items()))
