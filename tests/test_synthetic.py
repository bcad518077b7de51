"""Tests for the procedural synthetic benchmark generator (pepeseg3d_ns.data.synthetic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pepeseg3d_ns.data.synthetic import (
    LEVELS,
    SCENES,
    SynthConfig,
    build_scene,
    generate_scene,
    intrinsics,
    load_gt_depth,
    load_gt_masks,
    load_hierarchy,
    look_at,
    render_view,
)

RES = 40
N_VIEWS = 8


def _gen(out: Path, **kw) -> Path:
    cfg = SynthConfig(output_dir=out, n_views=kw.pop("n_views", N_VIEWS), resolution=kw.pop("resolution", RES),
                      n_init_points=kw.pop("n_init_points", 800), **kw)
    return generate_scene(cfg, progress=False)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return _gen(tmp_path_factory.mktemp("synth") / "tabletop")


def _stems(scene_dir: Path) -> list[str]:
    meta = json.loads((scene_dir / "transforms.json").read_text())
    return [Path(f["file_path"]).stem for f in meta["frames"]]


def _frame_files(d: Path) -> list[Path]:
    files = sorted(d.glob("images/*.png")) + sorted(d.glob("gt/*/*.png")) + sorted(d.glob("depth/*.png"))
    return files + [d / "sparse_pc.ply", d / "transforms.json", d / "gt" / "hierarchy.json"]


# ----------------------------------------------------------------------------------------------
# layout / format
# ----------------------------------------------------------------------------------------------


def test_output_layout(scene_dir: Path):
    meta = json.loads((scene_dir / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV"
    assert meta["w"] == meta["h"] == RES
    for k in ("k1", "k2", "k3", "k4", "p1", "p2"):
        assert meta[k] == 0.0
    assert meta["ply_file_path"] == "sparse_pc.ply"
    ps = meta["pepe_synthetic"]
    assert (ps["scene"], ps["seed"], ps["n_views"], ps["resolution"], ps["version"]) == ("tabletop", 0, N_VIEWS, RES, 1)
    assert len(meta["frames"]) == N_VIEWS
    for fr in meta["frames"]:
        img = np.array(Image.open(scene_dir / fr["file_path"]))
        assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
        dpng = np.array(Image.open(scene_dir / fr["depth_file_path"]))
        assert dpng.shape == (RES, RES) and dpng.dtype == np.uint16
        stem = Path(fr["file_path"]).stem
        d = load_gt_depth(scene_dir, stem)
        assert d.dtype == np.float32 and d.shape == (RES, RES) and np.all(d > 0)
        assert np.abs(dpng.astype(np.float64) - d * 1000.0).max() <= 0.51  # mm quantisation
        c2w = np.array(fr["transform_matrix"])
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-6)
        assert c2w[2, 3] > 0  # cameras above the ground
        for lvl in LEVELS:
            m = load_gt_masks(scene_dir, stem, lvl)
            assert m.dtype == np.int32 and m.shape == (RES, RES)
        # foreground covers a sensible part of the frame
        fg = (load_gt_masks(scene_dir, stem, "parts") > 0).mean()
        assert 0.1 < fg < 0.8


def test_point_cloud_ply(scene_dir: Path):
    raw = (scene_dir / "sparse_pc.ply").read_bytes()
    head, body = raw.split(b"end_header\n", 1)
    assert b"binary_little_endian" in head and b"element vertex 800" in head
    rec = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    assert len(rec) == 800
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], 1)
    assert np.all(np.isfinite(xyz))
    assert (xyz[:, 2] > 0.05).mean() > 0.5  # mostly object points, some ground
    assert np.linalg.norm(xyz, axis=1).max() > 5.0  # some dome points
    rgb = np.stack([rec["red"], rec["green"], rec["blue"]], 1)
    assert rgb.std() > 10


def test_point_cloud_reader(scene_dir: Path):
    from pepeseg3d_ns.data.dataparser import read_ply_points

    xyz, rgb = read_ply_points(scene_dir / "sparse_pc.ply")
    assert xyz.shape == (800, 3) and xyz.dtype == np.float32
    assert rgb is not None and rgb.dtype == np.uint8 and rgb.std() > 5


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


def test_determinism(scene_dir: Path, tmp_path: Path):
    again = _gen(tmp_path / "again")
    a, b = _frame_files(scene_dir), _frame_files(again)
    assert [p.relative_to(scene_dir) for p in a] == [p.relative_to(again) for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.relative_to(scene_dir)

    other = _gen(tmp_path / "other", seed=1)
    img_a = (scene_dir / "images" / "frame_00000.png").read_bytes()
    img_o = (other / "images" / "frame_00000.png").read_bytes()
    assert img_a != img_o
    m_a = load_gt_masks(scene_dir, "frame_00000", "parts")
    m_o = load_gt_masks(other, "frame_00000", "parts")
    assert not np.array_equal(m_a, m_o)


# ----------------------------------------------------------------------------------------------
# hierarchy
# ----------------------------------------------------------------------------------------------


def test_hierarchy_consistency(scene_dir: Path):
    h = load_hierarchy(scene_dir)
    assert h["levels"] == ["parts", "objects", "groups"]
    parent = {lvl: {e["id"]: e["parent"] for e in h[lvl]} for lvl in LEVELS}
    for lvl in LEVELS:
        ids = [e["id"] for e in h[lvl]]
        assert len(ids) == len(set(ids)) and 0 in ids
    p2o = np.zeros(max(parent["parts"]) + 1, np.int32)
    for k, v in parent["parts"].items():
        p2o[k] = v
    o2g = np.zeros(max(parent["objects"]) + 1, np.int32)
    for k, v in parent["objects"].items():
        o2g[k] = v
    assert p2o[0] == 0 and o2g[0] == 0
    assert set(p2o[1:]) <= set(parent["objects"]) - {0}
    assert set(o2g[1:]) <= set(parent["groups"]) - {0}

    seen = {lvl: set() for lvl in LEVELS}
    for stem in _stems(scene_dir):
        parts = load_gt_masks(scene_dir, stem, "parts")
        objs = load_gt_masks(scene_dir, stem, "objects")
        grps = load_gt_masks(scene_dir, stem, "groups")
        np.testing.assert_array_equal(p2o[parts], objs)
        np.testing.assert_array_equal(o2g[objs], grps)
        assert set(np.unique(parts)) <= set(parent["parts"])
        for lvl, m in zip(LEVELS, (parts, objs, grps)):
            seen[lvl] |= set(np.unique(m).tolist())
    n = {lvl: len(seen[lvl] - {0}) for lvl in LEVELS}
    assert n["parts"] > n["objects"] > n["groups"] > 1
    # the default layout is meant to be rich: 3+ groups, 6+ objects, 12+ parts (declared)
    assert len(h["groups"]) - 1 >= 3 and len(h["objects"]) - 1 >= 6 and len(h["parts"]) - 1 >= 12
    assert n["groups"] >= 3 and n["objects"] >= 6 and n["parts"] >= 10


@pytest.mark.parametrize("name", sorted(SCENES))
def test_all_layouts_hierarchy(name: str):
    scene = build_scene(name, seed=3)
    assert len(scene.groups) >= 3 and len(scene.objects) >= 6 and len(scene.parts) >= 12
    obj_ids = {o.id for o in scene.objects}
    grp_ids = {g.id for g in scene.groups}
    assert all(p.parent in obj_ids for p in scene.parts)
    assert all(o.parent in grp_ids for o in scene.objects)
    used = {pr.part for pr in scene.primitives}
    assert used == {p.id for p in scene.parts} | {0}  # every part has geometry
    # very different physical scales
    sizes = []
    for p in scene.parts:
        prims = [pr for pr in scene.primitives if pr.part == p.id]
        lo = np.min([pr.aabb()[0] for pr in prims], 0)
        hi = np.max([pr.aabb()[1] for pr in prims], 0)
        sizes.append(np.max(hi - lo))
    assert min(sizes) < 0.06 and max(sizes) > 0.6


# ----------------------------------------------------------------------------------------------
# geometry: poses + depth + labels
# ----------------------------------------------------------------------------------------------


def _backproject(depth: np.ndarray, c2w: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = intrinsics(depth.shape[1])
    z = depth[v, u].astype(np.float64)
    pc = np.stack([(u + 0.5 - cx) / fx * z, -(v + 0.5 - cy) / fy * z, -z, np.ones_like(z)], 1)
    return (pc @ c2w.T)[:, :3]


def _project(xyz: np.ndarray, c2w: np.ndarray, res: int):
    fx, fy, cx, cy = intrinsics(res)
    w2c = np.linalg.inv(c2w)
    pc = np.c_[xyz, np.ones(len(xyz))] @ w2c.T
    z = -pc[:, 2]
    u = fx * pc[:, 0] / z + cx
    v = -fy * pc[:, 1] / z + cy
    return u, v, z


def test_multiview_consistency(scene_dir: Path):
    meta = json.loads((scene_dir / "transforms.json").read_text())
    frames = meta["frames"]
    res = meta["w"]
    checked = agree = 0
    for a, b in [(0, 1), (1, 3), (2, 5), (4, 6)]:
        sa, sb = Path(frames[a]["file_path"]).stem, Path(frames[b]["file_path"]).stem
        ca, cb = np.array(frames[a]["transform_matrix"]), np.array(frames[b]["transform_matrix"])
        da, db = load_gt_depth(scene_dir, sa), load_gt_depth(scene_dir, sb)
        pa, pb = load_gt_masks(scene_dir, sa, "parts"), load_gt_masks(scene_dir, sb, "parts")
        # interior foreground pixels (3x3 neighbourhood has one label) of view a
        pad = np.pad(pa, 1, mode="edge")
        same = np.ones_like(pa, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                same &= pad[dy:dy + res, dx:dx + res] == pa
        v, u = np.nonzero(same & (pa > 0))
        xyz = _backproject(da, ca, u, v)
        ub, vb, zb = _project(xyz, cb, res)
        ui, vi = np.floor(ub).astype(int), np.floor(vb).astype(int)
        inside = (zb > 0) & (ui >= 0) & (vi >= 0) & (ui < res) & (vi < res)
        ui, vi, zb, lab = ui[inside], vi[inside], zb[inside], pa[v, u][inside]
        visible = np.abs(db[vi, ui] - zb) < 0.02 * zb  # depth test against view b
        checked += int(visible.sum())
        agree += int((pb[vi, ui][visible] == lab[visible]).sum())
    assert checked > 100
    assert agree / checked > 0.95


def test_sphere_depth_analytic():
    scene = build_scene("tabletop", seed=0)
    ball_part = next(p.id for p in scene.parts if p.name == "snowball/snowball")
    ball = next(pr for pr in scene.primitives if pr.part == ball_part)
    c, r = ball.center, float(ball.size[0])
    el, az = math.radians(30), math.radians(-60)
    eye = c + 0.6 * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    res = 33  # odd: the centre pixel's ray goes exactly through the look-at point
    c2w = look_at(eye, c)
    out = render_view(scene, c2w, res, ss=1)
    mid = res // 2
    assert out["part"][mid, mid] == ball_part
    assert out["depth"][mid, mid] == pytest.approx(np.linalg.norm(eye - c) - r, abs=1e-5)

    # every pixel labelled as the ball: independent ray/sphere solution, z-depth (not ray length)
    fx, fy, cx, cy = intrinsics(res)
    v, u = np.nonzero(out["part"] == ball_part)
    assert len(u) > 50
    dc = np.stack([(u + 0.5 - cx) / fx, -(v + 0.5 - cy) / fy, -np.ones(len(u))], 1)
    dw = (dc / np.linalg.norm(dc, axis=1, keepdims=True)) @ c2w[:3, :3].T
    oc = eye - c
    b = dw @ oc
    t = -b - np.sqrt(b * b - (oc @ oc - r * r))
    z_expected = t * (dw @ -c2w[:3, 2])
    np.testing.assert_allclose(out["depth"][v, u], z_expected, rtol=1e-5, atol=1e-5)
    assert np.all(out["depth"][v, u] <= t + 1e-6)  # z-depth <= ray length


# ----------------------------------------------------------------------------------------------
# nerfstudio
# ----------------------------------------------------------------------------------------------


def test_nerfstudio_dataparser(scene_dir: Path):
    dp = pytest.importorskip("nerfstudio.data.dataparsers.nerfstudio_dataparser")
    outputs = dp.NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == math.ceil(N_VIEWS * 0.9)
    assert outputs.metadata["depth_filenames"] is not None
    assert len(outputs.metadata["depth_filenames"]) == len(outputs.image_filenames)
    assert outputs.metadata["depth_unit_scale_factor"] == pytest.approx(1e-3)
    cams = outputs.cameras
    assert int(cams.width[0]) == RES and int(cams.height[0]) == RES
    assert float(cams.fx[0]) == pytest.approx(intrinsics(RES)[0])
    all_out = dp.NerfstudioDataParserConfig(data=scene_dir, eval_mode="all").setup().get_dataparser_outputs("train")
    assert len(all_out.image_filenames) == N_VIEWS


def test_nerfstudio_dataparser_points(scene_dir: Path):
    # our parser reads ply_file_path with plyfile (nerfstudio's needs open3d, which needs libusb)
    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

    cfg = PepeDataParserConfig(data=scene_dir)
    outputs = cfg.setup().get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == math.ceil(N_VIEWS * 0.9)
    assert "points3D_xyz" in outputs.metadata and "points3D_rgb" in outputs.metadata
    assert tuple(outputs.metadata["points3D_xyz"].shape) == (800, 3)
    assert tuple(outputs.metadata["points3D_rgb"].shape) == (800, 3)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_unknown_scene(tmp_path: Path):
    with pytest.raises(ValueError) as ei:
        generate_scene(SynthConfig(scene="moonbase", output_dir=tmp_path / "x"), progress=False)
    msg = str(ei.value)
    assert "moonbase" in msg
    for name in SCENES:
        assert name in msg
    assert not (tmp_path / "x" / "transforms.json").exists()


def test_existing_output(tmp_path: Path):
    out = _gen(tmp_path / "s", n_views=2, resolution=16, n_init_points=50)
    with pytest.raises(FileExistsError):
        _gen(out, n_views=2, resolution=16, n_init_points=50)
    # overwrite=True regenerates and removes stale frames
    _gen(out, n_views=1, resolution=16, n_init_points=50, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["frame_00000.png"]
    assert len(json.loads((out / "transforms.json").read_text())["frames"]) == 1


def test_other_layouts_render(tmp_path: Path):
    for name in sorted(SCENES):
        if name == "tabletop":
            continue
        out = _gen(tmp_path / name, scene=name, n_views=3, resolution=24, n_init_points=60)
        objs = set()
        for stem in _stems(out):
            objs |= set(np.unique(load_gt_masks(out, stem, "objects")).tolist())
        assert len(objs - {0}) >= 3


# ----------------------------------------------------------------------------------------------
# benchmark protocol: held-out split, the hallway scene, entity widths
# ----------------------------------------------------------------------------------------------


def test_eval_interval_split_in_transforms(tmp_path: Path):
    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

    out = _gen(tmp_path / "s", n_views=10, resolution=16, n_init_points=50, eval_interval=4)
    meta = json.loads((out / "transforms.json").read_text())
    held = [f"images/frame_{i:05d}.png" for i in (0, 4, 8)]
    assert meta["test_filenames"] == meta["val_filenames"] == held
    assert len(meta["train_filenames"]) == 7 and not set(held) & set(meta["train_filenames"])
    assert meta["pepe_synthetic"]["eval_interval"] == 4
    # nerfstudio reads the lists whatever its eval_mode says
    parser = PepeDataParserConfig(data=out, eval_mode="fraction").setup()
    test = parser.get_dataparser_outputs("test")
    assert [p.name for p in test.image_filenames] == [Path(h).name for h in held]
    assert len(parser.get_dataparser_outputs("train").image_filenames) == 7
    assert test.metadata["gt_masks"].image_names == [Path(h).name for h in held]
    with pytest.raises(ValueError, match="eval_interval"):
        _gen(tmp_path / "bad", n_views=4, eval_interval=5)
    plain = json.loads((_gen(tmp_path / "plain", n_views=3, resolution=16, n_init_points=50) / "transforms.json").read_text())
    assert "test_filenames" not in plain and "eval_interval" not in plain["pepe_synthetic"]


def test_hallway_has_thin_parts_and_same_size_siblings():
    scene = build_scene("hallway", seed=0)
    names = {p.name for p in scene.parts}
    assert {"mug_0/handle", "hat_top/brim", "hat_arm/brim", "spoon_1/handle", "book_7/cover"} <= names

    def extent(obj_name, part="cover"):
        pid = next(p.id for p in scene.parts if p.name == f"{obj_name}/{part}")
        prims = [pr for pr in scene.primitives if pr.part == pid]
        lo = np.min([pr.aabb()[0] for pr in prims], 0)
        hi = np.max([pr.aabb()[1] for pr in prims], 0)
        return hi - lo

    books = [extent(f"book_{k}") for k in range(8)]
    assert all(np.allclose(b, books[0]) for b in books)  # eight books of one size
    mugs = [extent(f"mug_{k}", "body") for k in range(3)]
    assert all(np.allclose(m, mugs[0]) for m in mugs)
    assert extent("hat_top", "brim")[2] == pytest.approx(0.01)  # a 1 cm brim
    assert extent("spoon_0", "handle")[2] == pytest.approx(0.006)


def test_entity_widths_on_a_hand_made_map(tmp_path: Path):
    from pepeseg3d_ns.data.synthetic import entity_widths

    (tmp_path / "gt" / "parts").mkdir(parents=True)
    ids = np.zeros((20, 20), np.uint16)
    ids[2:18, 3:6] = 1  # a stripe 3 px wide
    ids[5:10, 10:15] = 2  # a 5 x 5 square
    Image.fromarray(ids).save(tmp_path / "gt" / "parts" / "frame_00000.png")
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "images/frame_00000.png"}]}))
    rows = [{"id": 0, "name": "background", "parent": 0}, {"id": 1, "name": "a/stripe", "parent": 1},
            {"id": 2, "name": "a/square", "parent": 1}, {"id": 3, "name": "a/hidden", "parent": 1}]
    (tmp_path / "gt" / "hierarchy.json").write_text(json.dumps({"parts": rows}))
    w = entity_widths(tmp_path, "parts")
    assert w["a/stripe"]["median"] == 3.0 and w["a/square"]["median"] == 5.0
    assert w["a/stripe"]["views"] == 1 and "a/hidden" not in w


def test_scene_preview_is_labelled(scene_dir: Path, tmp_path: Path):
    from pepeseg3d_ns.data.preview import scene_preview

    png = scene_preview(scene_dir, tmp_path / "preview.png", views=(0, 3, 6), scale=2)
    img = np.asarray(Image.open(png).convert("RGB"))
    content_h = 3 * RES * 2
    assert img.shape[1] == 5 * RES * 2  # image | GT depth | parts | objects | groups
    band_h = img.shape[0] - content_h
    assert band_h > 10, "no title / column labels above the grid"
    band = img[:band_h]
    assert (band == 255).all(-1).mean() > 0.5 and (band < 100).all(-1).any()  # white band with dark text
    # every column carries a label: dark pixels in each fifth of the band's bottom (label) lines
    labels = band[band_h // 2:]
    for j in range(5):
        assert (labels[:, j * RES * 2:(j + 1) * RES * 2] < 100).all(-1).any(), f"column {j} has no label"
    # the content below is unchanged: the first view's image, enlarged 2x
    rgb = np.asarray(Image.open(scene_dir / "images" / "frame_00000.png").convert("RGB"))
    assert np.array_equal(img[band_h:band_h + RES * 2:2, :RES * 2:2], rgb)


def test_iou_by_width_bins_each_object_by_its_own_width(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("iou_by_width", Path(__file__).parents[1] / "scripts" / "iou_by_width.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    scene = tmp_path / "scenes" / "hand-made"
    (scene / "gt" / "parts").mkdir(parents=True)
    ids = np.zeros((30, 30), np.uint16)
    ids[2:28, 3:6] = 1  # a stripe 3 px wide
    ids[10:21, 12:23] = 2  # an 11 x 11 square
    Image.fromarray(ids).save(scene / "gt" / "parts" / "frame_00000.png")
    (scene / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "images/frame_00000.png"}]}))
    rows = [{"id": 0, "name": "background", "parent": 0}, {"id": 1, "name": "a/stripe", "parent": 1},
            {"id": 2, "name": "a/square", "parent": 1}]
    (scene / "gt" / "hierarchy.json").write_text(json.dumps({"parts": rows}))
    rec = {"row_id": "full", "scene": "hand-made",
           "per_object": {"parts": {"1": {"iou": 0.2}, "2": {"iou": 0.9}}},
           "choices": [{"level": "parts", "object": "1", "reference_iou": 0.3},
                       {"level": "parts", "object": "2", "reference_iou": 0.95}]}
    other = {**rec, "row_id": "baseline", "per_object": {"parts": {"1": {"iou": 0.7}, "2": {"iou": 0.1}}}}
    by = mod.rows_by_width([rec, other], [tmp_path / "elsewhere", tmp_path / "scenes"], "full")
    assert sorted(by["parts"]) == [(3.0, 0.2, 0.3), (11.0, 0.9, 0.95)]
    table = mod.format_tables(by)
    assert "| 3–5 px | 1 | 0.200 | 0.300 |" in table and "| > 10 px | 1 | 0.900 | 0.950 |" in table
    assert "≤ 2 px" not in table  # empty bins are left out
