"""SPIn-NeRF / LERF-Mask dataparsers and the ground-truth mask index, on tiny folders built from a synthetic scene.

The fixtures write the real layouts (LLFF ``images/*.JPG`` + ``images_4/*.png`` + ``poses_bounds.npy``, COLMAP
text/binary models, MVSeg masks, the inpainting set's ``label/`` folder, LERF-Mask ``images_train`` /
``test_mask``) from :mod:`pepeseg3d_ns.data.synthetic`, whose cameras and object maps are the known answer.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

from pepeseg3d_ns.data.benchmarks import (
    LerfMaskDataParserConfig,
    SpinNerfDataParserConfig,
    colmap_to_opengl,
    llff_to_opengl,
    pair_by_stem_or_order,
    split_every_nth,
)
from pepeseg3d_ns.data.dataparser import PepeDataParserConfig, read_ply_points
from pepeseg3d_ns.data.gt_masks import BINARY_LEVEL, GtMasks, read_binary_mask, resize_nearest
from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene, intrinsics, load_gt_masks, load_hierarchy

N_VIEWS = 12
RES = 48
FACTOR = 4
FULL = RES * FACTOR


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    d = generate_scene(SynthConfig(output_dir=tmp_path_factory.mktemp("synth") / "tabletop", n_views=N_VIEWS,
                                   resolution=RES, n_init_points=300), progress=False)
    meta = json.loads((d / "transforms.json").read_text())
    stems = [Path(f["file_path"]).stem for f in meta["frames"]]
    c2w = np.array([f["transform_matrix"] for f in meta["frames"]], dtype=np.float64)
    names = {r["name"]: r["id"] for r in load_hierarchy(d)["objects"]}
    return {"dir": d, "stems": stems, "c2w": c2w, "names": names}


def _object_map(synth, i: int, name: str) -> np.ndarray:
    return load_gt_masks(synth["dir"], synth["stems"][i], "objects") == synth["names"][name]


def _rgb(synth, i: int) -> np.ndarray:
    return np.array(Image.open(synth["dir"] / "images" / f"{synth['stems'][i]}.png"))


def _upsample(a: np.ndarray, k: int = FACTOR) -> np.ndarray:
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def _poses_bounds(c2w: np.ndarray, full: int, focal: float) -> np.ndarray:
    """LLFF rows from OpenGL c2w: columns [down, right, backwards, centre, hwf] + near/far."""
    rows = []
    for m in c2w:
        mat = np.stack([-m[:3, 1], m[:3, 0], m[:3, 2], m[:3, 3], [full, full, focal]], axis=1)  # [3, 5]
        rows.append(np.concatenate([mat.reshape(-1), [0.1, 20.0]]))
    return np.array(rows)


def _write_colmap(model_dir: Path, c2w: np.ndarray, names: list, size: int, f: float, points, binary: bool):
    model_dir.mkdir(parents=True, exist_ok=True)
    cams = {1: colmap_io.Camera(id=1, model="PINHOLE", width=size, height=size,
                                params=np.array([f, f, size / 2.0, size / 2.0]))}
    images = {}
    for i, (m, name) in enumerate(zip(c2w, names)):
        cv = m.copy()
        cv[:3, 1:3] *= -1  # OpenGL -> OpenCV camera axes
        w2c = np.linalg.inv(cv)
        images[i + 1] = colmap_io.Image(id=i + 1, qvec=colmap_io.rotmat2qvec(w2c[:3, :3]), tvec=w2c[:3, 3],
                                        camera_id=1, name=name, xys=np.zeros((0, 2)),
                                        point3D_ids=np.zeros((0,), dtype=np.int64))
    pts = {}
    xyz, rgb = points
    for j in range(len(xyz)):
        pts[j + 1] = colmap_io.Point3D(id=j + 1, xyz=xyz[j].astype(np.float64), rgb=rgb[j], error=0.5,
                                       image_ids=np.array([1]), point2D_idxs=np.array([0]))
    colmap_io.write_model(cams, images, pts, str(model_dir), ext=".bin" if binary else ".txt")


def _save(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def spin(synth, tmp_path_factory) -> Path:
    """SPIn-NeRF / MVSeg layout: images/IMG_*.JPG (192 px), images_4/IMG_*.png (48 px), poses_bounds.npy,
    sparse/0 (text), MVSeg masks at full resolution (object 'mug', 0/255) and images_4/label (0/1, views >= 4)."""
    d = tmp_path_factory.mktemp("spin") / "scene"
    fx = intrinsics(RES)[0]
    names = [f"IMG_{i:04d}" for i in range(N_VIEWS)]
    for i, n in enumerate(names):
        _save(d / "images" / f"{n}.JPG", _upsample(_rgb(synth, i)))
        _save(d / "images_4" / f"{n}.png", _rgb(synth, i))
        m = _object_map(synth, i, "mug")
        _save(d / "masks" / f"{n}.png", _upsample(m.astype(np.uint8) * 255))
        if i >= 4:
            _save(d / "images_4" / "label" / f"{n}.png", m.astype(np.uint8))
    np.save(d / "poses_bounds.npy", _poses_bounds(synth["c2w"], FULL, FACTOR * fx))
    _write_colmap(d / "sparse" / "0", synth["c2w"], [f"{n}.JPG" for n in names], FULL, FACTOR * fx,
                  read_ply_points(synth["dir"] / "sparse_pc.ply"), binary=False)
    return d


@pytest.fixture(scope="module")
def lerf(synth, tmp_path_factory) -> Path:
    """LERF-Mask layout: images/ (48 px), images_train/ (all but views 2, 5, 9), sparse/0 (binary),
    test_mask/<k>/{mug,plate}.png, object_mask/ (ignored)."""
    d = tmp_path_factory.mktemp("lerf") / "figurines"
    test = (2, 5, 9)
    for i, st in enumerate(synth["stems"]):
        _save(d / "images" / f"{st}.jpg", _rgb(synth, i))
        if i not in test:
            _save(d / "images_train" / f"{st}.jpg", _rgb(synth, i))
    for k, i in enumerate(test):
        _save(d / "test_mask" / str(k) / "mug.png", _object_map(synth, i, "mug").astype(np.uint8) * 255)
        plate = _object_map(synth, i, "plate").astype(np.uint8) * 255
        _save(d / "test_mask" / str(k) / "plate.png", np.stack([plate, 0 * plate, 0 * plate], -1))  # red RGB
    (d / "object_mask").mkdir()
    _write_colmap(d / "sparse" / "0", synth["c2w"], [f"{s}.jpg" for s in synth["stems"]], RES, intrinsics(RES)[0],
                  read_ply_points(synth["dir"] / "sparse_pc.ply"), binary=True)
    return d


def _registered(name: str):
    from nerfstudio.plugins.registry_dataparser import discover_dataparsers

    parsers, descriptions = discover_dataparsers()
    assert name in parsers and descriptions[name]
    return parsers[name]


def _parse(name: str, split: str, **kw):
    cfg = dataclasses.replace(_registered(name), **kw)  # never mutate the registry's shared instance
    return cfg.setup().get_dataparser_outputs(split)


def _undo(out, c2w_ns: torch.Tensor) -> np.ndarray:
    """World-frame OpenGL c2w [N, 4, 4] from parser cameras (inverse of dataparser_transform and scale)."""
    t = out.dataparser_transform.double().numpy()
    s = float(out.dataparser_scale)
    r_inv = t[:3, :3].T
    res = []
    for m in c2w_ns.double().numpy():
        w = np.eye(4)
        w[:3, :3] = r_inv @ m[:3, :3]
        w[:3, 3] = r_inv @ (m[:3, 3] / s - t[:3, 3])
        res.append(w)
    return np.stack(res)


# ------------------------------------------------------------------------------------------ registration
def test_registered_and_light_imports():
    assert isinstance(_registered("spinnerf"), SpinNerfDataParserConfig)
    assert isinstance(_registered("lerf-mask"), LerfMaskDataParserConfig)
    # nerfstudio imports the registry module while building its parser list: it (and what it imports from this
    # package) may only import light modules -- no datamanager, model, nerfstudio.configs.dataparser_configs
    # (circular), SAM or transformers. Checked statically on the import statements, so it stays fast.
    import ast

    import pepeseg3d_ns.data as pkg

    allowed = ("__future__", "dataclasses", "pathlib", "typing", "numpy", "torch", "PIL",
               "nerfstudio.cameras", "nerfstudio.data.dataparsers.base_dataparser", "nerfstudio.data.scene_box",
               "nerfstudio.data.utils.colmap_parsing_utils", "nerfstudio.utils.rich_utils",
               "nerfstudio.plugins.registry_dataparser", "pepeseg3d_ns.data.benchmarks", "pepeseg3d_ns.data.gt_masks",
               "pepeseg3d_ns.data.validate")  # validate: numpy, os, warnings and pepeseg3d_ns.errors only
    root = Path(pkg.__file__).parent
    for name in ("dataparser_configs.py", "benchmarks.py", "gt_masks.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [[a.name] for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from x import y`: x or x.y must be allowed
                mods = [[node.module, f"{node.module}.{a.name}"] for a in node.names]
            else:
                continue
            for options in mods:
                ok = any(m == a or m.startswith(a + ".") for m in options for a in allowed)
                assert ok, f"{name} imports {options[-1]}"


# ------------------------------------------------------------------------------------------ pure helpers
def test_llff_and_colmap_conventions_by_hand():
    # camera at (1, 2, 3) looking along world -y, up = +z: right = -x... use look-at by hand
    right, up, back = np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), np.array([0, 1.0, 0])
    row = np.concatenate([np.stack([-up, right, back, [1, 2, 3], [30, 40, 50]], 1).reshape(-1), [0.5, 9]])
    c2w, hwf, bounds = llff_to_opengl(row[None])
    np.testing.assert_allclose(c2w[0, :3], np.stack([right, up, back, [1, 2, 3]], 1))
    np.testing.assert_allclose(hwf[0], [30, 40, 50])
    np.testing.assert_allclose(bounds[0], [0.5, 9])
    with pytest.raises(ValueError, match=r"\[N, 17\]"):
        llff_to_opengl(np.zeros((3, 15)))
    # COLMAP identity pose: camera at origin, OpenCV axes = world axes -> OpenGL y/z flipped
    np.testing.assert_allclose(colmap_to_opengl([1, 0, 0, 0], [0, 0, 0]), np.diag([1.0, -1, -1, 1]))
    # translation: w2c t = -R c
    np.testing.assert_allclose(colmap_to_opengl([1, 0, 0, 0], [-1, -2, -3])[:3, 3], [1, 2, 3])


def test_split_and_pairing_rules():
    tr, ev = split_every_nth(12, 8)
    assert ev.tolist() == [0, 8] and tr.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    full = [Path(f"images/IMG_{i}.JPG") for i in (3, 1, 2)]
    full.sort(key=lambda p: p.name)
    small_same = sorted([Path(f"images_4/IMG_{i}.png") for i in (2, 3, 1)], key=lambda p: p.name)
    paired, how = pair_by_stem_or_order(full, small_same)
    assert how == "stem" and [p.stem for p in paired] == [p.stem for p in full]
    small_renamed = [Path(f"images_4/image{i:03d}.png") for i in range(3)]
    paired, how = pair_by_stem_or_order(full, small_renamed)
    assert how == "sorted order" and paired == small_renamed
    with pytest.raises(ValueError, match="IMG_3"):
        pair_by_stem_or_order(full, small_renamed[:2])


def test_resize_nearest_and_binarisation(tmp_path):
    a = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(resize_nearest(a, (2, 2)), [[5, 7], [13, 15]])
    np.testing.assert_array_equal(resize_nearest(a[:2, :2], (4, 4)), [[0, 0, 1, 1]] * 2 + [[4, 4, 5, 5]] * 2)
    m = np.array([[0, 1], [1, 0]], np.uint8)
    Image.fromarray(m).save(tmp_path / "01.png")  # 0/1 label
    Image.fromarray(m * 255).save(tmp_path / "0255.png")
    Image.fromarray(np.array([[0, 127], [128, 255]], np.uint8)).save(tmp_path / "gray.png")  # > 127
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "01.png"), m.astype(bool))
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "0255.png"), m.astype(bool))
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "gray.png"), [[False, False], [True, True]])
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "red.png"), [[False, True], [False, False]])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_binary_mask(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------------ SPIn-NeRF
@pytest.mark.parametrize("pose_source", ["poses_bounds", "colmap"])
def test_spinnerf_mvseg_cameras_splits_masks(spin, synth, pose_source):
    kw = dict(data=spin, masks_dir=Path("masks"), object_name="mug", pose_source=pose_source)
    train = _parse("spinnerf", "train", **kw)
    test = _parse("spinnerf", "test", **kw)
    assert len(train.image_filenames) == 10 and len(test.image_filenames) == 2
    assert [p.name for p in test.image_filenames] == ["IMG_0000.png", "IMG_0008.png"]
    assert all(p.parent.name == "images_4" for p in train.image_filenames)
    # poses: undoing the parser's normalisation gives the generator's cameras back
    for out, idx in ((train, [i for i in range(N_VIEWS) if i % 8]), (test, [0, 8])):
        np.testing.assert_allclose(_undo(out, out.cameras.camera_to_worlds), synth["c2w"][idx], atol=2e-4)
        fx, _, cx, cy = intrinsics(RES)
        assert torch.allclose(out.cameras.fx, torch.tensor(fx)) and torch.allclose(out.cameras.fy, torch.tensor(fx))
        assert torch.allclose(out.cameras.cx, torch.tensor(cx)) and torch.allclose(out.cameras.cy, torch.tensor(cy))
        assert (out.cameras.width == RES).all() and (out.cameras.height == RES).all()
        # nerfstudio's own normalisation: camera centres within [-1, 1] with one at the boundary
    allc = torch.cat([train.cameras.camera_to_worlds[:, :3, 3], test.cameras.camera_to_worlds[:, :3, 3]])
    assert allc.abs().max().item() == pytest.approx(1.0, abs=1e-5)
    # seed points from sparse/0 map into the same normalised frame as the cameras
    xyz, rgb = read_ply_points(synth["dir"] / "sparse_pc.ply")
    t, s = test.dataparser_transform, test.dataparser_scale
    want = (torch.cat([torch.from_numpy(xyz), torch.ones(len(xyz), 1)], 1) @ t.T) * s
    assert torch.allclose(test.metadata["points3D_xyz"], want, atol=1e-4)
    assert torch.equal(test.metadata["points3D_rgb"], torch.from_numpy(rgb))
    # ground truth: every view of both splits, at the rendered size, equal to the generator's object map
    for out, idx in ((train, [i for i in range(N_VIEWS) if i % 8]), (test, [0, 8])):
        gt: GtMasks = out.metadata["gt_masks"]
        assert gt.dataset == "spinnerf-mvseg" and gt.objects == ["mug"] and gt.levels == [BINARY_LEVEL]
        assert gt.views_of("mug") == list(range(len(idx)))
        for j, i in enumerate(idx):
            m = gt.load(j, "mug", size=(RES, RES))
            assert m.dtype == bool and m.shape == (RES, RES)
            np.testing.assert_array_equal(m, _object_map(synth, i, "mug"))
        assert gt.load(0, "mug").shape == (FULL, FULL)  # file size when no size is given
        assert gt.load(0, "mug", size=(24, 24)).shape == (24, 24)
    assert _object_map(synth, 8, "mug").any()
    assert "paired with images/ by stem" in test.metadata["gt_masks"].describe()


def test_spinnerf_inpainting_set(spin, synth):
    kw = dict(data=spin, object_free_views=4)
    train = _parse("spinnerf", "train", **kw)
    test = _parse("spinnerf", "val", **kw)
    # views 0..3 are the "object-free" test views: left out; scene = views 4..11, eval = scene index 0 (view 4)
    assert [p.name for p in test.image_filenames] == ["IMG_0004.png"]
    assert [p.name for p in train.image_filenames] == [f"IMG_{i:04d}.png" for i in range(5, 12)]
    np.testing.assert_allclose(_undo(test, test.cameras.camera_to_worlds), synth["c2w"][[4]], atol=2e-4)
    gt = test.metadata["gt_masks"]
    assert gt.dataset == "spinnerf-inpainting" and gt.objects == ["object"]
    np.testing.assert_array_equal(gt.load(0, "object", size=(RES, RES)), _object_map(synth, 4, "mug"))
    assert "first 4 sorted images are the object-free test views" in gt.describe()
    assert train.metadata["gt_masks"].views_of("object") == list(range(7))


def test_spinnerf_renamed_downscaled_images_pair_by_order(spin, synth, tmp_path):
    d = tmp_path / "renamed"
    shutil.copytree(spin, d, ignore=shutil.ignore_patterns("label"))
    for i, f in enumerate(sorted((d / "images_4").glob("*.png"))):
        f.rename(f.with_name(f"image{i:03d}.png"))
    out = _parse("spinnerf", "test", data=d, masks_dir=d / "masks", object_name="mug")
    assert [p.name for p in out.image_filenames] == ["image000.png", "image008.png"]
    np.testing.assert_allclose(_undo(out, out.cameras.camera_to_worlds), synth["c2w"][[0, 8]], atol=2e-4)
    # masks are named after images/ (IMG_*), matched through the pairing
    np.testing.assert_array_equal(out.metadata["gt_masks"].load(1, "mug", (RES, RES)), _object_map(synth, 8, "mug"))
    assert "by sorted order" in out.metadata["gt_masks"].describe()


def test_spinnerf_errors_list_every_offender(spin, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(spin, d)
    (d / "masks" / "IMG_0008.png").unlink()  # eval view without mask
    (d / "masks" / "IMG_0003.png").rename(d / "masks" / "IMG_003.png")  # misnamed
    shutil.copy(d / "masks" / "IMG_0001.png", d / "masks" / "IMG_9999.png")  # matches no image
    with pytest.raises(ValueError) as err:
        _parse("spinnerf", "test", data=d, masks_dir=Path("masks"))
    msg = str(err.value)
    assert "IMG_003.png" in msg and "IMG_9999.png" in msg and "IMG_0008" in msg
    # a train view without mask is allowed and reported
    (d / "masks" / "IMG_003.png").unlink()
    (d / "masks" / "IMG_9999.png").unlink()
    shutil.copy(d / "masks" / "IMG_0001.png", d / "masks" / "IMG_0008.png")
    out = _parse("spinnerf", "train", data=d, masks_dir=Path("masks"))
    gt = out.metadata["gt_masks"]
    assert len(gt.files) == 9 and "IMG_0003.png" in gt.describe()
    # pose count differs from image count
    np.save(d / "poses_bounds.npy", np.load(d / "poses_bounds.npy")[:-1])
    with pytest.raises(ValueError, match="11 camera rows .* 12 images"):
        _parse("spinnerf", "train", data=d, masks_dir=Path("masks"), pose_source="poses_bounds")
    # COLMAP model missing an image
    (d / "poses_bounds.npy").unlink()
    (d / "images_4" / "IMG_0005.png").rename(d / "images_4" / "IMG_0012.png")
    (d / "images" / "IMG_0005.JPG").rename(d / "images" / "IMG_0012.JPG")
    with pytest.raises(ValueError, match=r"IMG_0012\.JPG.*IMG_0005\.JPG"):
        _parse("spinnerf", "train", data=d, masks_dir=Path("masks"))
    # missing folders / files
    with pytest.raises(FileNotFoundError, match="images_8"):
        _parse("spinnerf", "train", data=d, downscale_factor=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _parse("spinnerf", "train", data=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nomasks"):
        _parse("spinnerf", "train", data=d, masks_dir=Path("nomasks"))


def test_spinnerf_inpainting_label_missing_for_eval_view(spin, tmp_path):
    d = tmp_path / "inp"
    shutil.copytree(spin, d)
    # a label of an object-free view (left out of the scene) is ignored, and said so
    shutil.copy(d / "images_4" / "label" / "IMG_0005.png", d / "images_4" / "label" / "IMG_0001.png")
    gt = _parse("spinnerf", "test", data=d, object_free_views=4).metadata["gt_masks"]
    assert "1 label(s) of object-free views ignored: IMG_0001.png" in gt.describe()
    (d / "images_4" / "label" / "IMG_0004.png").unlink()
    with pytest.raises(ValueError, match="IMG_0004"):
        _parse("spinnerf", "test", data=d, object_free_views=4)
    with pytest.raises(FileNotFoundError, match="gt_source=none"):
        shutil.rmtree(d / "images_4" / "label")
        _parse("spinnerf", "test", data=d)
    out = _parse("spinnerf", "test", data=d, gt_source="none")
    assert out.metadata["gt_masks"].levels == []


# ------------------------------------------------------------------------------------------ LERF-Mask
def test_lerf_mask_split_cameras_masks(lerf, synth):
    train = _parse("lerf-mask", "train", data=lerf)
    test = _parse("lerf-mask", "test", data=lerf)
    assert [p.stem for p in test.image_filenames] == [synth["stems"][i] for i in (2, 5, 9)]
    assert len(train.image_filenames) == N_VIEWS - 3
    np.testing.assert_allclose(_undo(test, test.cameras.camera_to_worlds), synth["c2w"][[2, 5, 9]], atol=2e-4)
    fx = intrinsics(RES)[0]
    assert torch.allclose(test.cameras.fx, torch.tensor(fx)) and (test.cameras.width == RES).all()
    gt = test.metadata["gt_masks"]
    assert gt.dataset == "lerf-mask" and gt.objects == ["mug", "plate"]
    for k, i in enumerate((2, 5, 9)):
        np.testing.assert_array_equal(gt.load(k, "mug", (RES, RES)), _object_map(synth, i, "mug"))
        np.testing.assert_array_equal(gt.load(k, "plate", (RES, RES)), _object_map(synth, i, "plate"))
    assert gt.index_of(f"{synth['stems'][5]}.jpg") == 1
    assert "object_mask/ ignored" in gt.describe()
    assert train.metadata["gt_masks"].levels == [] and "test views only" in train.metadata["gt_masks"].describe()
    assert "points3D_xyz" in train.metadata


def test_lerf_mask_errors(lerf, tmp_path):
    d = tmp_path / "lerf_broken"
    shutil.copytree(lerf, d)
    shutil.rmtree(d / "test_mask" / "1")
    shutil.copytree(d / "test_mask" / "0", d / "test_mask" / "7")
    with pytest.raises(ValueError) as err:
        _parse("lerf-mask", "test", data=d)
    msg = str(err.value)
    assert "7/" in msg and "1 (frame_00005.jpg)" in msg
    shutil.rmtree(d / "test_mask")
    with pytest.raises(FileNotFoundError, match="test_mask"):
        _parse("lerf-mask", "test", data=d)
    shutil.rmtree(d / "images_train")
    with pytest.raises(FileNotFoundError, match="images_train"):
        _parse("lerf-mask", "train", data=d)


# ------------------------------------------------------------------------------------------ synthetic + index
def test_synthetic_scene_gt_masks(synth):
    out = PepeDataParserConfig(data=synth["dir"]).setup().get_dataparser_outputs("test")
    gt: GtMasks = out.metadata["gt_masks"]
    assert gt.dataset == "synthetic" and gt.levels == ["parts", "objects", "groups"]
    stems = [Path(p).stem for p in out.image_filenames]
    mug = str(synth["names"]["mug"])
    for j, st in enumerate(stems):
        i = synth["stems"].index(st)
        np.testing.assert_array_equal(gt.load(j, mug, level="objects"), _object_map(synth, i, "mug"))
        ids = set(np.unique(load_gt_masks(synth["dir"], st, "parts")).tolist()) - {0}
        assert set(int(x) for x in gt.level_ids["parts"][j]) == ids
    assert mug in gt.objects_at("objects")
    assert gt.views_of(mug, "objects") == [j for j, st in enumerate(stems)
                                           if _object_map(synth, synth["stems"].index(st), "mug").any()]
    assert gt.load(0, mug, size=(24, 24), level="objects").shape == (24, 24)
    with pytest.raises(KeyError, match="levels"):
        gt.load(0, mug, level="rooms")
    with pytest.raises(KeyError):
        gt.load(0, "mug")  # no binary masks in a synthetic scene


def test_gt_masks_pickle_yaml_and_validation(spin, tmp_path):
    gt = _parse("spinnerf", "test", data=spin, masks_dir=Path("masks"), object_name="mug").metadata["gt_masks"]
    back = pickle.loads(pickle.dumps(gt))
    assert back == gt
    np.testing.assert_array_equal(back.load(1, "mug", (RES, RES)), gt.load(1, "mug", (RES, RES)))
    yaml.dump(gt)  # config saving would not choke on it (metadata is not in config.yml anyway)
    with pytest.raises(ValueError, match="out of range"):
        GtMasks("x", "test", ["a.png"], objects=["o"], files={3: {"o": tmp_path / "m.png"}})
    with pytest.raises(ValueError, match="missing from objects"):
        GtMasks("x", "test", ["a.png"], objects=["o"], files={0: {"p": tmp_path / "m.png"}})
    with pytest.raises(KeyError, match="no ground-truth mask"):
        gt.load(0, "cup")


# ------------------------------------------------------------------------------------------ through the whole method


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["spinnerf", "lerf-mask"])
def test_benchmark_folders_through_priors_both_stages_and_ns_eval(layout, spin, lerf, tmp_path):
    """A SPIn-NeRF (MVSeg) and a LERF-Mask folder, no transforms.json: `pepeseg3d priors` (tiny random SAM and
    Depth-Anything through the real loaders), pepe-recon, pepe-contrast (its dataparser taken from the recon run)
    and ns-eval, which writes the segmentation keys."""
    import os
    import subprocess
    import sys

    pytest.importorskip("segment_anything")
    from pepeseg3d_ns.priors.tiny_models import build_tiny_depth_anything, build_tiny_sam

    bindir = Path(sys.executable).parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}

    def run(*cmd):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, (cmd[:3], proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    data = spin if layout == "spinnerf" else lerf
    parser = ["spinnerf", "--masks-dir", "masks", "--object-name", "mug"] if layout == "spinnerf" else ["lerf-mask"]
    sources = ["--sam-checkpoint", build_tiny_sam(tmp_path / "sam"), "--depth-model",
               build_tiny_depth_anything(tmp_path / "da"), "--points-per-side", "4", "--pred-iou-thresh", "0",
               "--stability-score-thresh", "0", "--min-mask-region-area", "0", "--device", "cpu"]
    run(bindir / "pepeseg3d", "priors", "--data", data, *sources, *parser)
    out = tmp_path / "out"
    common = ["--machine.device-type", "cpu", "--vis", "tensorboard", "--output-dir", out, "--timestamp", "t",
              "--pipeline.model.compute-lpips", "False"]
    run(bindir / "ns-train", "pepe-recon", "--data", data, "--max-num-iterations", 60, *common, *parser)
    recon = next(out.glob("*/pepe-recon/t/config.yml"))
    run(bindir / "ns-train", "pepe-contrast", "--pipeline.model.recon-checkpoint", recon, "--max-num-iterations", 30,
        *common)
    contrast = next(out.glob("*/pepe-contrast/t/config.yml"))
    result = tmp_path / "eval.json"
    run(bindir / "ns-eval", "--load-config", contrast, "--output-path", result)
    metrics = json.loads(result.read_text())["results"]
    for key in ("psnr", "miou", "macc", "mbiou"):
        assert key in metrics and np.isfinite(metrics[key]), sorted(metrics)
    assert 0.0 <= metrics["miou"] <= 1.0
    names = {o for per in metrics["segmentation"]["per_object"].values() for o in per}
    assert any("mug" in n for n in names), names


def test_lerf_mask_distorted_ground_truth_follows_the_undistorted_view(lerf, tmp_path):
    """An OPENCV camera with k1 = -0.3: nerfstudio undistorts and crops the evaluation images; the datamanager
    warps the ground-truth masks the same way, so a mask has the size of its view and is the warped file (not the
    file resized), and label propagation reads them at the cameras' undistorted size."""
    from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig
    from pepeseg3d_ns.data.undistort import MaskWarp

    d = tmp_path / "lerf_distorted"
    shutil.copytree(lerf, d)
    cams, images, points = colmap_io.read_model(str(d / "sparse" / "0"), ext=".bin")
    c = cams[1]
    fx, fy, cx, cy = c.params[:4] if c.model == "PINHOLE" else (c.params[0], c.params[0], c.params[1], c.params[2])
    cams[1] = colmap_io.Camera(id=1, model="OPENCV", width=c.width, height=c.height,
                               params=np.array([fx, fy, cx, cy, -0.3, 0.0, 0.0, 0.0]))
    colmap_io.write_model(cams, images, points, str(d / "sparse" / "0"), ext=".bin")
    parser = dataclasses.replace(_registered("lerf-mask"), data=d)
    dm = PepeDatamanagerConfig(data=d, dataparser=parser).setup(device="cpu", test_mode="test", world_size=1,
                                                                   local_rank=0)
    cached = dm.cached_eval
    gt = dm.eval_dataset._dataparser_outputs.metadata["gt_masks"]
    assert sorted(gt.warps) == [0, 1, 2]
    differ = 0
    for k in range(3):
        h, w = cached[k]["image"].shape[:2]
        assert (h, w) != (RES, RES)  # cropped by the undistortion
        assert (int(dm.eval_dataset.cameras.height[k]), int(dm.eval_dataset.cameras.width[k])) == (h, w)
        assert isinstance(gt.warps[k], MaskWarp)
        for obj in ("mug", "plate"):
            mask = gt.load(k, obj, (h, w))
            raw = read_binary_mask(gt.files[k][obj])
            np.testing.assert_array_equal(mask, gt.warps[k](raw))
            differ += int((mask != resize_nearest(raw, (h, w))).sum())
    assert differ > 20  # the warp moved boundary pixels (the resized file would be misaligned there)
