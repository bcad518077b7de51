"""Synthetic scenes, the dataset: :class:`SynthConfig`, :func:`generate_scene` (renders every view and writes the
nerfstudio folder with its ground truth, layout in :mod:`pepeseg3d_ns.data.synthetic`) and the loaders of that
ground truth."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from pepeseg3d_ns.data.synthetic.render import camera_poses, intrinsics, render_view
from pepeseg3d_ns.data.synthetic.scene import FOV_DEG, LEVELS, Scene
from pepeseg3d_ns.data.synthetic.scenes import SCENES, build_scene
from pepeseg3d_ns.plyio import write_vertex_ply

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    scene: str = "tabletop"  # key of SCENES
    output_dir: Path = Path("scenes/tabletop")
    n_views: int = 40
    resolution: int = 128  # image width = height = resolution
    seed: int = 0
    n_init_points: int = 6000  # size of the SfM-like initial point cloud
    point_noise: float = 0.01  # std of gaussian noise on init points, in scene units (metres)
    overwrite: bool = False
    detail: float = 0.0  # contrast of a fine (~1.5 cm) world-space grain on every surface, 0 = none: gives SfM features
    eval_interval: Optional[int] = None  # hold out every N-th view (0, N, 2N, ...) in transforms.json; None: parser's split


def _level_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables part id -> object id and object id -> group id (index 0 = background)."""
    p2o = np.zeros(len(scene.parts) + 1, dtype=np.int32)
    for e in scene.parts:
        p2o[e.id] = e.parent
    o2g = np.zeros(len(scene.objects) + 1, dtype=np.int32)
    for e in scene.objects:
        o2g[e.id] = e.parent
    return p2o, o2g


def _entity_sizes(scene: Scene) -> dict[str, dict[int, float]]:
    """Bounding-box diagonal (metres) of every part/object/group."""
    p2o, o2g = _level_maps(scene)
    boxes: dict[str, dict[int, list]] = {lvl: {} for lvl in LEVELS}
    for prim in scene.primitives:
        if prim.part == 0:
            continue
        lo, hi = prim.aabb()
        ids = {"parts": prim.part, "objects": int(p2o[prim.part]), "groups": int(o2g[p2o[prim.part]])}
        for lvl, i in ids.items():
            cur = boxes[lvl].get(i)
            boxes[lvl][i] = [lo, hi] if cur is None else [np.minimum(cur[0], lo), np.maximum(cur[1], hi)]
    return {lvl: {i: round(float(np.linalg.norm(b[1] - b[0])), 4) for i, b in v.items()} for lvl, v in boxes.items()}


def _hierarchy_json(scene: Scene) -> dict:
    sizes = _entity_sizes(scene)
    out: dict = {"scene": scene.name, "levels": list(LEVELS), "background_id": 0}
    for lvl, ents in zip(LEVELS, (scene.parts, scene.objects, scene.groups)):
        rows = [{"id": 0, "name": "background", "parent": None if lvl == "groups" else 0, "size_m": None}]
        for e in ents:
            rows.append({"id": e.id, "name": e.name, "parent": e.parent, "size_m": sizes[lvl].get(e.id)})
        out[lvl] = rows
    return out


def _save_png16(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(arr.astype(np.uint16))).save(path)


def _load_png16(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im).astype(np.int64)


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """``sparse_pc.ply``: ``x y z`` float32, ``red green blue`` uint8 (what nerfstudio's dataparser reads)."""
    xyz, rgb = np.asarray(xyz, np.float32), np.asarray(rgb, np.uint8)
    write_vertex_ply(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                            "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]},
                     comments=["pepeseg3d synthetic SfM-like points"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clear_previous(out: Path) -> None:
    """Remove files a previous run of this generator wrote (only our own file patterns)."""
    (out / "transforms.json").unlink(missing_ok=True)
    patterns = ["images/frame_*.png", "depth/frame_*.png", "gt/depth/frame_*.npy"]
    patterns += [f"gt/{lvl}/frame_*.png" for lvl in LEVELS]
    for pat in patterns:
        for f in out.glob(pat):
            f.unlink()
    for f in ("sparse_pc.ply", "gt/hierarchy.json"):
        (out / f).unlink(missing_ok=True)


def generate_scene(cfg: SynthConfig, progress: bool = True) -> Path:
    """Render ``cfg.scene`` and write a nerfstudio dataset with GT into ``cfg.output_dir``."""
    if cfg.scene not in SCENES:
        raise ValueError(f"unknown synthetic scene {cfg.scene!r}; valid choices: {', '.join(sorted(SCENES))}")
    if cfg.n_views < 1 or cfg.resolution < 4:
        raise ValueError("n_views must be >= 1 and resolution >= 4")
    if cfg.eval_interval is not None and not 2 <= cfg.eval_interval <= cfg.n_views:
        raise ValueError(f"eval_interval must be in [2, n_views={cfg.n_views}] (every N-th view held out), "
                         f"got {cfg.eval_interval}")
    out = Path(cfg.output_dir)
    if (out / "transforms.json").exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{out / 'transforms.json'} already exists (pass overwrite=True to replace it)")
        _clear_previous(out)
    for sub in ["images", "depth", "gt/depth"] + [f"gt/{lvl}" for lvl in LEVELS]:
        (out / sub).mkdir(parents=True, exist_ok=True)

    scene = build_scene(cfg.scene, cfg.seed)
    scene.detail = float(cfg.detail)
    res = int(cfg.resolution)
    poses = camera_poses(scene, cfg.n_views, np.random.default_rng([cfg.seed, 1]))
    pc_rng = np.random.default_rng([cfg.seed, 2])
    p2o, o2g = _level_maps(scene)
    fx, fy, cx, cy = intrinsics(res)

    # points per view (spread n_init_points evenly)
    per_view = np.full(cfg.n_views, cfg.n_init_points // cfg.n_views)
    per_view[: cfg.n_init_points % cfg.n_views] += 1
    pc_xyz, pc_rgb = [], []

    frames = []
    it = range(cfg.n_views)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"synth {cfg.scene}", unit="view")
    for i in it:
        stem = f"frame_{i:05d}"
        r = render_view(scene, poses[i], res)
        parts = r["part"]
        objs = p2o[parts]
        grps = o2g[objs]
        Image.fromarray(r["rgb"]).save(out / "images" / f"{stem}.png")
        mm = np.clip(np.round(r["depth"].astype(np.float64) * 1000.0), 0, 65535)
        _save_png16(out / "depth" / f"{stem}.png", mm)
        np.save(out / "gt" / "depth" / f"{stem}.npy", r["depth"].astype(np.float32))
        for lvl, m in zip(LEVELS, (parts, objs, grps)):
            _save_png16(out / "gt" / lvl / f"{stem}.png", m)
        # SfM-like points: ~75 % on objects, rest on ground / dome, from pixels this view sees
        k = int(per_view[i])
        if k > 0:
            flat = parts.reshape(-1)
            fg, bg = np.nonzero(flat > 0)[0], np.nonzero(flat == 0)[0]
            k_fg = min(len(fg), int(round(0.75 * k)))
            k_bg = k - k_fg
            sel = np.concatenate([pc_rng.choice(fg, k_fg, replace=len(fg) < k_fg) if k_fg else np.zeros(0, np.int64),
                                  pc_rng.choice(bg, k_bg, replace=len(bg) < k_bg) if k_bg else np.zeros(0, np.int64)])
            if len(sel):
                pts = r["points"].reshape(-1, 3)[sel]
                pts = pts + pc_rng.normal(0.0, cfg.point_noise, pts.shape)
                pc_xyz.append(pts)
                pc_rgb.append(r["rgb"].reshape(-1, 3)[sel])
        frames.append({
            "file_path": f"images/{stem}.png",
            "transform_matrix": [[float(round(x, 9)) for x in row] for row in poses[i]],
            "depth_file_path": f"depth/{stem}.png",
        })

    xyz = np.concatenate(pc_xyz) if pc_xyz else np.zeros((0, 3))
    rgb = np.concatenate(pc_rgb) if pc_rgb else np.zeros((0, 3), np.uint8)
    _write_ply(out / "sparse_pc.ply", xyz, rgb)
    _atomic_write_text(out / "gt" / "hierarchy.json", json.dumps(_hierarchy_json(scene), indent=1))

    transforms = {
        "camera_model": "OPENCV",
        "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": res, "h": res,
        "k1": 0.0, "k2": 0.0, "k3": 0.0, "k4": 0.0, "p1": 0.0, "p2": 0.0,
        "ply_file_path": "sparse_pc.ply",
        "pepe_synthetic": {
            "scene": cfg.scene,
            "seed": int(cfg.seed),
            "n_views": int(cfg.n_views),
            "resolution": res,
            "version": FORMAT_VERSION,
            "n_init_points": int(cfg.n_init_points),
            "point_noise": float(cfg.point_noise),
            "fov_deg": FOV_DEG,
            "up_axis": "+z",
            "depth_unit_scale_factor": 1e-3,
            "camera_distance": round(float(scene.cam_distance), 6),
            "target": [round(float(x), 6) for x in scene.target],
            "dome_radius": round(float(scene.dome_radius), 6),
        },
        "frames": frames,
    }
    if cfg.eval_interval is not None:
        # SPIn-NeRF's protocol: every N-th view (0, N, 2N, ...) held out; nerfstudio reads these lists instead of
        # its eval_mode split
        held = [f["file_path"] for i, f in enumerate(frames) if i % cfg.eval_interval == 0]
        transforms["train_filenames"] = [f["file_path"] for i, f in enumerate(frames) if i % cfg.eval_interval]
        transforms["val_filenames"] = transforms["test_filenames"] = held
        transforms["pepe_synthetic"]["eval_interval"] = int(cfg.eval_interval)
    _atomic_write_text(out / "transforms.json", json.dumps(transforms, indent=1))
    return out


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def _stem(stem: str) -> str:
    return Path(stem).stem


def load_gt_masks(scene_dir: Path, stem: str, level: str) -> np.ndarray:
    """[H, W] int32 instance ids (0 = background) of ``level`` in {"parts", "objects", "groups"}.

    ``stem`` is e.g. ``"frame_00000"`` (a path such as ``"images/frame_00000.png"`` also works).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; valid choices: {', '.join(LEVELS)}")
    return _load_png16(Path(scene_dir) / "gt" / level / f"{_stem(stem)}.png").astype(np.int32)


def load_gt_depth(scene_dir: Path, stem: str) -> np.ndarray:
    """[H, W] float32 z-depth in metres."""
    return np.load(Path(scene_dir) / "gt" / "depth" / f"{_stem(stem)}.npy").astype(np.float32)


def load_hierarchy(scene_dir: Path) -> dict:
    """Parsed ``gt/hierarchy.json``."""
    return json.loads((Path(scene_dir) / "gt" / "hierarchy.json").read_text())


def entity_widths(scene_dir: Path, level: str = "parts") -> dict[str, dict[str, float]]:
    """How many pixels across each entity of ``level`` is, over the views where it is visible.

    The width of a mask in one view is ``2 * d - 1``, where ``d`` is the largest Euclidean distance from one of its
    pixels to a pixel outside it (a stripe ``w`` px wide gives ``w`` for odd ``w``, ``w - 1`` for even ``w``,
    however long it is). Returns ``name -> {"median", "min", "max", "views"}`` (widths in pixels; ``views`` =
    number of views showing it)."""
    from scipy.ndimage import distance_transform_edt

    scene_dir = Path(scene_dir)
    names = {e["id"]: e["name"] for e in load_hierarchy(scene_dir)[level] if e["id"] != 0}
    meta = json.loads((scene_dir / "transforms.json").read_text())
    widths: dict[int, list[float]] = {i: [] for i in names}
    for fr in meta["frames"]:
        ids = load_gt_masks(scene_dir, Path(fr["file_path"]).stem, level)
        for i in np.unique(ids):
            if int(i) in widths:
                widths[int(i)].append(2.0 * float(distance_transform_edt(np.pad(ids == i, 1)).max()) - 1.0)
    return {names[i]: {"median": float(np.median(w)), "min": float(np.min(w)), "max": float(np.max(w)), "views": len(w)}
            for i, w in widths.items() if w}
