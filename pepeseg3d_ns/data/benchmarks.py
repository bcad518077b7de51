"""Dataparsers for the segmentation benchmarks: SPIn-NeRF (``spinnerf``) and LERF-Mask (``lerf-mask``).

Both put a :class:`~pepeseg3d_ns.data.gt_masks.GtMasks` into ``DataparserOutputs.metadata["gt_masks"]``
(indices = positions in that split's ``image_filenames``) and, when the scene has a COLMAP model, the sparse
points as ``points3D_xyz [P, 3] float32`` / ``points3D_rgb [P, 3] uint8`` in the normalised frame.

Camera conventions (converted here, once):

* nerfstudio / OpenGL camera-to-world: columns of the rotation are the camera's x (right), y (up) and z
  (backwards: the camera looks down ``-z``) axes in world coordinates.
* LLFF ``poses_bounds.npy``: ``[N, 17]``; each row is a ``3x5`` matrix (row-major) followed by ``near, far``.
  Columns 0-2 of the matrix are the camera's *down, right, backwards* axes in world coordinates, column 3 the
  camera centre, column 4 ``[H, W, focal]`` of the full-resolution images (principal point at the centre).
  Rows are in the sorted order of ``images/``. OpenGL c2w = ``[right, -down, backwards, centre]``.
* COLMAP: ``images.txt/bin`` hold world-to-camera ``(qvec, tvec)`` in the OpenCV camera frame (x right,
  y down, z forward); c2w = inverse, then the y and z columns are negated to get OpenGL.

World normalisation is nerfstudio's: :func:`nerfstudio.cameras.camera_utils.auto_orient_and_center_poses`
(``orientation_method``, ``center_method``), then, with ``auto_scale_poses``, a scale ``1 / max |t|`` over
all views of the scene (both splits), times ``scale_factor``. A world point ``X`` maps to
``dataparser_scale * (dataparser_transform @ [X, 1])``.

Intrinsics are scaled to the image files actually used (``images_N/`` for ``downscale_factor = N``) by the
ratio of their pixel size to the full-resolution size (``W_N / W`` and ``H_N / H``; exactly ``1 / N`` when
``images_N`` is an exact ``N``-fold reduction).

Errors never skip silently: a missing folder or file, a mask file that matches no image, an evaluation view
without a mask, or a pose count that differs from the image count stops parsing with one error listing every
offending name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Type

import numpy as np
import torch

from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils import colmap_parsing_utils as colmap_io
from nerfstudio.utils.rich_utils import CONSOLE

from pepeseg3d_ns.data.gt_masks import GtMasks

__all__ = [
    "IMAGE_EXTENSIONS",
    "SpinNerfDataParserConfig",
    "SpinNerfDataParser",
    "LerfMaskDataParserConfig",
    "LerfMaskDataParser",
    "llff_to_opengl",
    "colmap_to_opengl",
    "list_images",
    "pair_by_stem_or_order",
    "read_colmap_model",
    "split_every_nth",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""Image / mask file suffixes recognised in folders (case-insensitive)."""

_MAX_LISTED = 30


# ----------------------------------------------------------------------------------------------------------
# small helpers (pure, tested directly)
# ----------------------------------------------------------------------------------------------------------


def _fmt(names: Sequence[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def list_images(folder: Path, what: str = "image folder") -> List[Path]:
    """Image files directly inside ``folder`` (sub-folders ignored), sorted by file name.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: it holds no ``.png/.jpg/.jpeg`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.name)
    if not files:
        raise ValueError(f"{what} {folder} holds no image files ({'/'.join(IMAGE_EXTENSIONS)})")
    return files


def pair_by_stem_or_order(full: Sequence[Path], small: Sequence[Path]) -> Tuple[List[Path], str]:
    """Pair each full-resolution file with its downscaled counterpart.

    LLFF folders mix ``images/IMG_0001.JPG`` with ``images_4/IMG_0001.png`` (same stem, other suffix) or
    renamed ``images_4/image000.png`` (other stem). Rule, in order:

    1. the stems of both lists are the same set (and unique) -> pair by stem;
    2. otherwise, same count -> pair by sorted file name order (both lists sorted by name);
    3. otherwise -> ``ValueError`` listing the stems present on one side only.

    Args:
        full: ``[N]`` full-resolution files, sorted by name.
        small: ``[M]`` downscaled files, sorted by name.

    Returns:
        ``([N] downscaled files aligned with full, "stem" | "sorted order")``.
    """
    fs = [p.stem for p in full]
    ss = [p.stem for p in small]
    if len(set(fs)) == len(fs) and len(set(ss)) == len(ss) and set(fs) == set(ss):
        by_stem = {p.stem: p for p in small}
        return [by_stem[s] for s in fs], "stem"
    if len(full) == len(small):
        return list(small), "sorted order"
    only_full = sorted(set(fs) - set(ss))
    only_small = sorted(set(ss) - set(fs))
    raise ValueError(
        f"cannot pair {len(full)} full-resolution images ({Path(full[0]).parent}) with {len(small)} downscaled "
        f"images ({Path(small[0]).parent}): stems only in the first: [{_fmt(only_full)}]; "
        f"only in the second: [{_fmt(only_small)}]"
    )


def split_every_nth(n: int, interval: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, eval)`` int64 index arrays of ``n`` views: view ``i`` is eval iff ``i % interval == 0``."""
    if interval < 1:
        raise ValueError(f"eval_interval must be >= 1, got {interval}")
    idx = np.arange(n, dtype=np.int64)
    is_eval = idx % interval == 0
    return idx[~is_eval], idx[is_eval]


def llff_to_opengl(poses_bounds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert LLFF ``poses_bounds [N, 17]`` to OpenGL camera-to-world matrices.

    Returns:
        ``c2w [N, 4, 4] float64`` (columns right, up, backwards, centre), ``hwf [N, 3] float64``
        (full-resolution height, width, focal in pixels), ``bounds [N, 2] float64`` (near, far).
    """
    arr = np.asarray(poses_bounds, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise ValueError(f"poses_bounds must have shape [N, 17], got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("poses_bounds is empty (0 cameras)")
    mats = arr[:, :15].reshape(-1, 3, 5)
    down, right, back, centre = mats[:, :, 0], mats[:, :, 1], mats[:, :, 2], mats[:, :, 3]
    c2w = np.tile(np.eye(4), (arr.shape[0], 1, 1))
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = -down
    c2w[:, :3, 2] = back
    c2w[:, :3, 3] = centre
    return c2w, mats[:, :, 4].copy(), arr[:, 15:17].copy()


def colmap_to_opengl(qvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world ``[4, 4] float64`` of a COLMAP image (``qvec = (w, x, y, z)`` and ``tvec`` of
    its world-to-camera transform in OpenCV axes)."""
    rot = colmap_io.qvec2rotmat(np.asarray(qvec, dtype=np.float64))
    w2c = np.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = np.asarray(tvec, dtype=np.float64).reshape(3)
    c2w = np.linalg.inv(w2c)
    c2w[:3, 1:3] *= -1.0
    return c2w


def read_colmap_model(model_dir: Path) -> Tuple[dict, dict]:
    """COLMAP ``(cameras, images)`` dicts (id -> namedtuple) from ``cameras/images.txt`` or ``.bin``."""
    model_dir = Path(model_dir)
    if (model_dir / "cameras.txt").exists() and (model_dir / "images.txt").exists():
        return colmap_io.read_cameras_text(model_dir / "cameras.txt"), colmap_io.read_images_text(
            model_dir / "images.txt")
    if (model_dir / "cameras.bin").exists() and (model_dir / "images.bin").exists():
        return colmap_io.read_cameras_binary(model_dir / "cameras.bin"), colmap_io.read_images_binary(
            model_dir / "images.bin")
    raise FileNotFoundError(
        f"no COLMAP model in {model_dir}: expected cameras.txt + images.txt or cameras.bin + images.bin"
    )


def _colmap_points(model_dir: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(xyz [P, 3] float32, rgb [P, 3] uint8)`` of ``points3D.bin/txt``, or None when there is no such file."""
    if (model_dir / "points3D.bin").exists():
        pts = colmap_io.read_points3D_binary(model_dir / "points3D.bin")
    elif (model_dir / "points3D.txt").exists():
        pts = colmap_io.read_points3D_text(model_dir / "points3D.txt")
    else:
        return None
    vals = list(pts.values())
    xyz = np.array([p.xyz for p in vals], dtype=np.float32).reshape(-1, 3)
    rgb = np.array([p.rgb for p in vals], dtype=np.uint8).reshape(-1, 3)
    return xyz, rgb


def _colmap_intrinsics(cam) -> Tuple[float, float, float, float, torch.Tensor]:
    """``fx, fy, cx, cy`` and nerfstudio distortion ``[6]`` (k1, k2, k3, k4, p1, p2) of a COLMAP camera."""
    p = [float(x) for x in cam.params]
    k = dict(k1=0.0, k2=0.0, k3=0.0, k4=0.0, p1=0.0, p2=0.0)
    model = cam.model
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy = p[1], p[2]
    elif model == "PINHOLE":
        fx, fy, cx, cy = p[:4]
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, k["k1"] = p[1], p[2], p[3]
    elif model == "RADIAL":
        fx = fy = p[0]
        cx, cy, k["k1"], k["k2"] = p[1], p[2], p[3], p[4]
    elif model == "OPENCV":
        fx, fy, cx, cy = p[:4]
        k["k1"], k["k2"], k["p1"], k["p2"] = p[4], p[5], p[6], p[7]
    else:
        raise ValueError(
            f"COLMAP camera {cam.id} has model {model}; supported: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, "
            "RADIAL, OPENCV (undistort the images, e.g. with `colmap image_undistorter`)"
        )
    return fx, fy, cx, cy, camera_utils.get_distortion_params(**k)


def _image_size(path: Path) -> Tuple[int, int]:
    """``(H, W)`` of an image file (header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image {path} could not be read: {err}") from err
    return h, w


def _resolve(data: Path, p: Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(data) / p


# ----------------------------------------------------------------------------------------------------------
# shared parser machinery
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Views:
    """All views of a scene (both splits), in scene order, before the split."""

    files: List[Path]  # image files used for training/eval (downscaled when downscale_factor > 1)
    c2w: np.ndarray  # [N, 4, 4] OpenGL camera-to-world, world = source frame
    fx: np.ndarray  # [N] at the resolution of `files`
    fy: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    height: np.ndarray  # [N] int
    width: np.ndarray
    distortion: torch.Tensor  # [N, 6]
    points: Optional[Tuple[np.ndarray, np.ndarray]]  # source-frame sparse points


@dataclass
class _BenchmarkConfig(DataParserConfig):
    """Fields shared by the benchmark parsers (named like nerfstudio's colmap parser)."""

    data: Path = Path()
    """Scene folder."""
    scale_factor: float = 1.0
    """Extra scale applied to the camera centres after auto scaling."""
    scene_scale: float = 1.0
    """Half side of the scene box (after normalisation)."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """How to orient the world (nerfstudio's auto_orient_and_center_poses)."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How to centre the world."""
    auto_scale_poses: bool = True
    """Scale camera centres into [-1, 1] (over all views of both splits)."""
    colmap_path: Path = Path("sparse/0")
    """COLMAP model folder, relative to data."""
    load_3D_points: bool = True
    """Return the COLMAP points3D as points3D_xyz / points3D_rgb (seed points for splatting)."""


def _scale_intrinsics(files: Sequence[Path], full_hw: np.ndarray, k: Dict[str, np.ndarray], factor: int
                      ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """Scale full-resolution intrinsics ``k`` (fx, fy, cx, cy: ``[N]``) to the pixel size of ``files``.

    ``full_hw [N, 2]`` full-resolution sizes. Raises when a file's size is not ``full / factor`` within one
    pixel of rounding per axis (a wrong ``downscale_factor`` or mismatched folder).
    """
    hs, ws, bad = [], [], []
    for i, f in enumerate(files):
        h, w = _image_size(f)
        H, W = full_hw[i]
        if abs(h * factor - H) > factor or abs(w * factor - W) > factor:
            bad.append(f"{f.name} is {w}x{h}, expected about {W / factor:g}x{H / factor:g}")
        hs.append(h)
        ws.append(w)
    if bad:
        raise ValueError(
            f"images in {files[0].parent} do not have the full resolution / downscale_factor ({factor}): "
            + _fmt(bad)
        )
    h = np.asarray(hs, dtype=np.int64)
    w = np.asarray(ws, dtype=np.int64)
    sy, sx = h / full_hw[:, 0], w / full_hw[:, 1]
    out = {"fx": k["fx"] * sx, "cx": k["cx"] * sx, "fy": k["fy"] * sy, "cy": k["cy"] * sy}
    return h, w, out


def _colmap_views(model_dir: Path, names: Sequence[str], stems_ok: bool) -> Tuple[np.ndarray, np.ndarray,
                                                                                  Dict[str, np.ndarray],
                                                                                  torch.Tensor]:
    """Poses / full-resolution intrinsics of the images ``names`` (file names) from a COLMAP model.

    Returns ``c2w [N, 4, 4]``, ``full_hw [N, 2]``, intrinsics dict of ``[N]`` arrays, distortion ``[N, 6]``.
    Every name must be in the model; model images absent from ``names`` are an error too (the folder and the
    model disagree). With ``stems_ok`` names are matched by stem when the file names differ.
    """
    cams, imgs = read_colmap_model(model_dir)
    by_name = {im.name: im for im in imgs.values()}
    key = (lambda s: Path(s).stem) if stems_ok else (lambda s: Path(s).name)
    by_key = {key(n): im for n, im in by_name.items()}
    missing = [n for n in names if key(n) not in by_key]
    extra = sorted(n for n in by_name if key(n) not in {key(x) for x in names})
    if missing or extra:
        msg = [f"COLMAP model {model_dir} and the image folder disagree:"]
        if missing:
            msg.append(f"images without a COLMAP pose: [{_fmt(missing)}]")
        if extra:
            msg.append(f"COLMAP images with no image file: [{_fmt(extra)}]")
        raise ValueError(" ".join(msg))
    c2w, hw, fx, fy, cx, cy, dist = [], [], [], [], [], [], []
    for n in names:
        im = by_key[key(n)]
        cam = cams.get(im.camera_id)
        if cam is None:
            raise ValueError(f"COLMAP image {im.name} refers to camera {im.camera_id}, absent from {model_dir}")
        c2w.append(colmap_to_opengl(im.qvec, im.tvec))
        hw.append((cam.height, cam.width))
        f_x, f_y, c_x, c_y, d = _colmap_intrinsics(cam)
        fx.append(f_x)
        fy.append(f_y)
        cx.append(c_x)
        cy.append(c_y)
        dist.append(d)
    k = {"fx": np.array(fx), "fy": np.array(fy), "cx": np.array(cx), "cy": np.array(cy)}
    return np.stack(c2w), np.array(hw, dtype=np.float64), k, torch.stack(dist)


def _outputs(cfg: _BenchmarkConfig, views: _Views, indices: np.ndarray, gt: GtMasks) -> DataparserOutputs:
    """Normalise all views' poses (nerfstudio's way), then keep ``indices``; attach ``gt`` and points. Poses must
    be finite and not all at one position; sparse points with a NaN or inf coordinate are dropped with a warning."""
    from pepeseg3d_ns.data.validate import check_poses, finite_points

    check_poses(views.c2w, [f.name for f in views.files], Path(cfg.data), what="camera pose")
    if views.points is not None and len(views.points[0]) > 0:
        views.points = finite_points(views.points[0], views.points[1], Path(cfg.data) / cfg.colmap_path / "points3D")
    poses = torch.from_numpy(views.c2w.astype(np.float32))
    poses, transform = camera_utils.auto_orient_and_center_poses(
        poses, method=cfg.orientation_method, center_method=cfg.center_method
    )
    scale = 1.0
    if cfg.auto_scale_poses:
        biggest = float(torch.max(torch.abs(poses[:, :3, 3])))
        if biggest > 0:
            scale /= biggest
    scale *= float(cfg.scale_factor)
    poses[:, :3, 3] *= scale
    idx = torch.as_tensor(indices, dtype=torch.long)

    def sel(a: np.ndarray, dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a)[indices], dtype=dtype)

    cameras = Cameras(
        camera_to_worlds=poses[idx, :3, :4],
        fx=sel(views.fx, torch.float32)[:, None],
        fy=sel(views.fy, torch.float32)[:, None],
        cx=sel(views.cx, torch.float32)[:, None],
        cy=sel(views.cy, torch.float32)[:, None],
        width=sel(views.width, torch.int32)[:, None],
        height=sel(views.height, torch.int32)[:, None],
        distortion_params=views.distortion[idx],
        camera_type=CameraType.PERSPECTIVE,
    )
    a = float(cfg.scene_scale)
    metadata: dict = {"gt_masks": gt}
    if cfg.load_3D_points and views.points is not None and len(views.points[0]) > 0:
        xyz = torch.from_numpy(views.points[0])
        xyz = torch.cat([xyz, torch.ones_like(xyz[:, :1])], dim=-1) @ transform.T
        metadata["points3D_xyz"] = xyz * scale
        metadata["points3D_rgb"] = torch.from_numpy(views.points[1])
    return DataparserOutputs(
        image_filenames=[views.files[i] for i in indices],
        cameras=cameras,
        scene_box=SceneBox(aabb=torch.tensor([[-a, -a, -a], [a, a, a]], dtype=torch.float32)),
        dataparser_transform=transform,
        dataparser_scale=scale,
        metadata=metadata,
    )


def _split_name(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("val", "test"):
        return "eval"
    raise ValueError(f"unknown dataparser split {split!r}; expected train, val or test")


def _mask_index(mask_files: Sequence[Path], stems: Dict[str, int]) -> Tuple[Dict[int, Path], List[str]]:
    """Match mask files to views by file stem. Returns (view index -> path, names of unmatched files)."""
    out: Dict[int, Path] = {}
    bad: List[str] = []
    for f in mask_files:
        i = stems.get(f.stem)
        if i is None:
            bad.append(f.name)
        elif i in out:
            bad.append(f"{f.name} (second mask for image stem {f.stem})")
        else:
            out[i] = f
    return out, bad


# ----------------------------------------------------------------------------------------------------------
# SPIn-NeRF
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SpinNerfDataParserConfig(_BenchmarkConfig):
    """SPIn-NeRF / MVSeg scenes in the LLFF layout (``images/``, ``images_N/``, ``poses_bounds.npy`` and/or
    ``sparse/0``), with ground-truth object masks. Every ``eval_interval``-th view (``i % 8 == 0``) is the
    evaluation split, the rest train."""

    _target: Type = field(default_factory=lambda: SpinNerfDataParser)
    downscale_factor: int = 4
    """Use ``images_{N}/`` (N > 1) or ``images/`` (N = 1); intrinsics are scaled to it."""
    pose_source: Literal["auto", "poses_bounds", "colmap"] = "auto"
    """Where poses come from: auto = poses_bounds.npy when present, else the COLMAP model."""
    gt_source: Literal["auto", "mvseg", "inpainting", "none"] = "auto"
    """Ground-truth set: mvseg = one mask per image in masks_dir (matched by stem); inpainting = SPIn-NeRF
    inpainting set (``images_N/label/<stem>.png``, first ``object_free_views`` sorted images are object-free
    test views and are left out of the scene); auto = mvseg if masks_dir is set, else inpainting if the label
    folder exists, else an error; none = no ground truth (training only)."""
    masks_dir: Optional[Path] = None
    """MVSeg mask folder (relative to data or absolute): ``<stem>.png`` files for one object, or one
    sub-folder per object holding ``<stem>.png`` files."""
    object_name: str = "object"
    """Object name of a single-object mask folder / of the inpainting label."""
    label_dir: Optional[Path] = None
    """Inpainting-set label folder; default ``images_{downscale_factor}/label`` (``images/label`` for N = 1)."""
    object_free_views: int = 40
    """Inpainting set: how many of the first sorted images are the object-free test views (left out)."""
    eval_interval: int = 8
    """View i is an evaluation view iff i % eval_interval == 0 (i in sorted order of the scene's views)."""


class SpinNerfDataParser(DataParser):
    """Parser for SPIn-NeRF / MVSeg LLFF scenes (see :class:`SpinNerfDataParserConfig`).

    Ground truth in ``metadata["gt_masks"]``: every view of the split that has a mask (eval views must all
    have one; train views usually do too, and label propagation may pick a reference among them).
    """

    config: SpinNerfDataParserConfig

    def __init__(self, config: SpinNerfDataParserConfig):
        super().__init__(config)
        self.config = config

    # --------------------------------------------------------------------------------------------------
    def _gt_kind(self, data: Path, img_dir: Path) -> Tuple[str, Optional[Path]]:
        c = self.config
        label_dir = _resolve(data, c.label_dir) if c.label_dir is not None else img_dir / "label"
        if c.gt_source == "none":
            return "none", None
        if c.gt_source == "mvseg" or (c.gt_source == "auto" and c.masks_dir is not None):
            if c.masks_dir is None:
                raise ValueError("gt_source=mvseg needs masks_dir (the folder of MVSeg mask PNGs)")
            d = _resolve(data, c.masks_dir)
            if not d.is_dir():
                raise FileNotFoundError(f"masks_dir {d} does not exist")
            return "mvseg", d
        if c.gt_source == "inpainting" or (c.gt_source == "auto" and label_dir.is_dir()):
            if not label_dir.is_dir():
                raise FileNotFoundError(f"SPIn-NeRF inpainting label folder {label_dir} does not exist")
            return "inpainting", label_dir
        raise FileNotFoundError(
            f"no ground-truth masks found for {data}: set masks_dir (MVSeg annotations) or provide "
            f"{label_dir} (SPIn-NeRF inpainting set), or use gt_source=none to train without ground truth"
        )

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        c = self.config
        part = _split_name(split)
        data = Path(c.data)
        if not data.is_dir():
            raise FileNotFoundError(f"SPIn-NeRF scene folder {data} does not exist")
        if c.downscale_factor < 1:
            raise ValueError(f"downscale_factor must be >= 1, got {c.downscale_factor}")
        full_dir = data / "images"
        img_dir = full_dir if c.downscale_factor == 1 else data / f"images_{c.downscale_factor}"
        if not img_dir.is_dir():
            have = sorted(p.name for p in data.glob("images*") if p.is_dir())
            raise FileNotFoundError(
                f"{img_dir} does not exist (downscale_factor={c.downscale_factor}); image folders in {data}: {have}"
            )
        kind, gt_dir = self._gt_kind(data, img_dir)  # fail early on a missing mask folder
        notes: List[str] = []
        files = list_images(img_dir, "image folder")
        full = list_images(full_dir, "image folder") if full_dir.is_dir() and img_dir != full_dir else None
        if full is not None:
            files, how = pair_by_stem_or_order(full, files)
            notes.append(f"{img_dir.name}/ paired with images/ by {how} ({len(files)} images)")
        names = [p.name for p in (full if full is not None else files)]  # names in images/ (poses order)

        # ---- poses and full-resolution intrinsics
        pb = data / "poses_bounds.npy"
        model_dir = _resolve(data, c.colmap_path)
        source = c.pose_source
        if source == "auto":
            source = "poses_bounds" if pb.exists() else "colmap"
        if source == "poses_bounds":
            if not pb.exists():
                raise FileNotFoundError(f"{pb} does not exist (pose_source=poses_bounds)")
            try:
                arr = np.load(pb)
            except Exception as err:  # noqa: BLE001 - any numpy failure: name the file
                raise ValueError(f"{pb} is not a readable .npy file: {err}") from err
            try:
                c2w, hwf, _ = llff_to_opengl(arr)
            except ValueError as err:
                raise ValueError(f"{pb}: {err}") from err
            if len(c2w) != len(names):
                raise ValueError(
                    f"{pb} has {len(c2w)} camera rows but {img_dir} has {len(names)} images; "
                    "rows must follow the sorted image names one to one"
                )
            full_hw = hwf[:, :2].copy()
            k = {"fx": hwf[:, 2].copy(), "fy": hwf[:, 2].copy(), "cx": hwf[:, 1] / 2.0, "cy": hwf[:, 0] / 2.0}
            dist = torch.zeros((len(names), 6), dtype=torch.float32)
        elif source == "colmap":
            if not model_dir.is_dir():
                raise FileNotFoundError(f"no poses: neither {pb} nor the COLMAP model {model_dir} exists")
            c2w, full_hw, k, dist = _colmap_views(model_dir, names, stems_ok=full is None)
        else:
            raise ValueError(f"unknown pose_source {c.pose_source!r}")
        notes.append(f"poses from {'poses_bounds.npy' if source == 'poses_bounds' else model_dir}")
        if img_dir != full_dir:
            height, width, k = _scale_intrinsics(files, full_hw, k, c.downscale_factor)
        else:
            hs = [_image_size(f) for f in files]
            height = np.array([h for h, _ in hs])
            width = np.array([w for _, w in hs])
            bad = [f"{f.name} is {w}x{h}, poses say {int(W)}x{int(H)}"
                   for f, (h, w), (H, W) in zip(files, hs, full_hw) if (h, w) != (int(H), int(W))]
            if bad:
                raise ValueError(f"image sizes differ from the camera model: {_fmt(bad)}")
        points = _colmap_points(model_dir) if (c.load_3D_points and model_dir.is_dir()) else None

        # ---- ground truth: which views
        keep = np.arange(len(files))
        if kind == "inpainting":
            n_free = int(c.object_free_views)
            if not 0 <= n_free < len(files):
                raise ValueError(
                    f"object_free_views={n_free} must be in [0, {len(files)}) for {len(files)} images in {img_dir}"
                )
            keep = keep[n_free:]
            notes.append(
                f"SPIn-NeRF inpainting set: the first {n_free} sorted images are the object-free test views and "
                f"are left out; the scene is the {len(keep)} views with the object"
            )
        views = _Views(
            files=[files[i] for i in keep], c2w=c2w[keep], fx=k["fx"][keep], fy=k["fy"][keep],
            cx=k["cx"][keep], cy=k["cy"][keep], height=height[keep], width=width[keep],
            distortion=dist[torch.as_tensor(keep)], points=points,
        )
        train_idx, eval_idx = split_every_nth(len(views.files), c.eval_interval)
        indices = train_idx if part == "train" else eval_idx
        if len(indices) == 0:
            raise ValueError(f"split {split!r} of {data} is empty ({len(views.files)} views, "
                             f"eval_interval={c.eval_interval})")
        gt = self._gt_masks(kind, gt_dir, files, full, keep, eval_idx, indices, split, notes)
        if points is None and c.load_3D_points:
            gt.notes.append(f"no COLMAP points3D in {model_dir}: no seed points")
        CONSOLE.log(gt.describe())
        return _outputs(c, views, indices, gt)

    def _gt_masks(self, kind: str, gt_dir: Optional[Path], all_files: List[Path], full: Optional[List[Path]],
                  keep: np.ndarray, eval_idx: np.ndarray, indices: np.ndarray, split: str,
                  notes: List[str]) -> GtMasks:
        """Match mask files to the scene's views (by the stem of the used image or of its images/ original);
        one error listing every unmatched mask file and every eval view without a mask."""
        c = self.config
        scene_files = [all_files[i] for i in keep]
        names = [scene_files[i].name for i in indices]
        if kind == "none":
            return GtMasks("spinnerf", split, names, notes=notes + ["no ground truth (gt_source=none)"])
        assert gt_dir is not None
        stems: Dict[str, int] = {}
        originals = [full[i] for i in keep] if full is not None else scene_files
        for i, (f, g) in enumerate(zip(scene_files, originals)):
            for st in {f.stem, g.stem}:
                if stems.setdefault(st, i) != i:
                    raise ValueError(f"image stem {st} names two different views of {Path(c.data)}; "
                                     "masks cannot be matched by stem")
        problems: List[str] = []
        per_object: Dict[str, Dict[int, Path]] = {}
        if kind == "mvseg":
            subdirs = sorted(p for p in gt_dir.iterdir() if p.is_dir())
            loose = [p for p in gt_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if subdirs and loose:
                raise ValueError(f"masks_dir {gt_dir} mixes mask files with per-object sub-folders "
                                 f"({_fmt([p.name for p in subdirs])}); use one layout")
            groups = {p.name: list_images(p, "mask folder") for p in subdirs} if subdirs else {
                c.object_name: list_images(gt_dir, "mask folder")}
            dataset = "spinnerf-mvseg"
            for obj, mfiles in groups.items():
                idx, bad = _mask_index(mfiles, stems)
                problems += [f"{obj}/{b}" if subdirs else b for b in bad]
                per_object[obj] = idx
        else:
            dataset = "spinnerf-inpainting"
            mfiles = list_images(gt_dir, "label folder")
            kept = set(keep.tolist())
            free = {all_files[i].stem for i in range(len(all_files)) if i not in kept}
            ignored = [f.name for f in mfiles if f.stem in free]
            if ignored:
                notes.append(f"{len(ignored)} label(s) of object-free views ignored: {_fmt(ignored)}")
            idx, bad = _mask_index([f for f in mfiles if f.stem not in free], stems)
            problems += bad
            per_object[c.object_name] = idx
        missing = [f"{obj}: {scene_files[i].name}" for obj, idx in per_object.items()
                   for i in eval_idx.tolist() if i not in idx]
        if problems or missing:
            msg = [f"ground-truth masks in {gt_dir} do not match the images of {Path(c.data)}:"]
            if problems:
                msg.append(f"mask files matching no image: [{_fmt(problems)}]")
            if missing:
                msg.append(f"evaluation views without a mask: [{_fmt(missing)}]")
            raise ValueError(" ".join(msg))
        pos = {int(v): j for j, v in enumerate(indices.tolist())}
        files: Dict[int, Dict[str, Path]] = {}
        for obj, idx in per_object.items():
            for i, p in idx.items():
                if i in pos:
                    files.setdefault(pos[i], {})[obj] = p
        no_mask = [names[j] for j in range(len(names)) if j not in files]
        if no_mask:
            notes.append(f"{len(no_mask)} view(s) of this split have no mask: {_fmt(no_mask)}")
        return GtMasks(dataset, split, names, objects=sorted(per_object), files=files, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# LERF-Mask
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LerfMaskDataParserConfig(_BenchmarkConfig):
    """LERF-Mask scenes as released with Gaussian Grouping: ``images/``, ``images_train/`` (its file names
    are the train split), COLMAP ``sparse/0``, ``test_mask/<k>/<prompt>.png`` for the k-th test view."""

    _target: Type = field(default_factory=lambda: LerfMaskDataParser)
    downscale_factor: int = 1
    """Use ``images_{N}/`` (same file names or stems as images/) instead of images/ when N > 1."""
    train_images_path: Path = Path("images_train")
    """Folder whose file names define the train split."""
    test_mask_path: Path = Path("test_mask")
    """Ground-truth folder: ``<k>/<prompt>.png``, k = index of the test view in sorted order."""


class LerfMaskDataParser(DataParser):
    """Parser for LERF-Mask (see :class:`LerfMaskDataParserConfig`).

    Test views = images of ``images/`` whose names are not in ``images_train/``, sorted by name; every test
    view must have a ``test_mask/<k>/`` folder with at least one mask. The train split has no ground truth
    (LERF-Mask annotates only test views). ``object_mask/`` (Gaussian Grouping's training-time object ids)
    is ignored.
    """

    config: LerfMaskDataParserConfig

    def __init__(self, config: LerfMaskDataParserConfig):
        super().__init__(config)
        self.config = config

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        c = self.config
        part = _split_name(split)
        data = Path(c.data)
        if not data.is_dir():
            raise FileNotFoundError(f"LERF-Mask scene folder {data} does not exist")
        notes: List[str] = []
        full = list_images(data / "images", "image folder")
        train_names = [p.name for p in list_images(_resolve(data, c.train_images_path), "train image folder")]
        known = {p.name for p in full}
        unknown = [n for n in train_names if n not in known]
        if unknown:
            raise ValueError(f"{_resolve(data, c.train_images_path)} names images absent from "
                             f"{data / 'images'}: [{_fmt(unknown)}]")
        train_set = set(train_names)
        is_train = np.array([p.name in train_set for p in full])
        train_idx = np.nonzero(is_train)[0]
        test_idx = np.nonzero(~is_train)[0]
        if len(test_idx) == 0:
            raise ValueError(f"every image of {data / 'images'} is in {c.train_images_path}: no test views")

        files = full
        if c.downscale_factor > 1:
            d = data / f"images_{c.downscale_factor}"
            files, how = pair_by_stem_or_order(full, list_images(d, "image folder"))
            notes.append(f"{d.name}/ paired with images/ by {how}")
        elif c.downscale_factor < 1:
            raise ValueError(f"downscale_factor must be >= 1, got {c.downscale_factor}")
        model_dir = _resolve(data, c.colmap_path)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"COLMAP model folder {model_dir} does not exist")
        c2w, full_hw, k, dist = _colmap_views(model_dir, [p.name for p in full], stems_ok=False)
        height, width, k = _scale_intrinsics(files, full_hw, k, c.downscale_factor)
        points = _colmap_points(model_dir) if c.load_3D_points else None
        if (data / "object_mask").is_dir():
            notes.append("object_mask/ ignored (Gaussian Grouping's training object ids, not evaluation ground truth)")

        views = _Views(files=files, c2w=c2w, fx=k["fx"], fy=k["fy"], cx=k["cx"], cy=k["cy"], height=height,
                       width=width, distortion=dist, points=points)
        test_names = [full[i].name for i in test_idx]
        masks = self._test_masks(data, test_names)
        if part == "train":
            indices = train_idx
            names = [files[i].name for i in indices]
            gt = GtMasks("lerf-mask", split, names,
                         notes=notes + ["LERF-Mask has ground truth for the test views only"])
        else:
            indices = test_idx
            names = [files[i].name for i in indices]
            objects = sorted({o for per in masks.values() for o in per})
            gt = GtMasks("lerf-mask", split, names, objects=objects, files=masks,
                         notes=notes + [f"test views (sorted, k = index): {_fmt(test_names)}"])
        if len(indices) == 0:
            raise ValueError(f"split {split!r} of {data} is empty")
        CONSOLE.log(gt.describe())
        return _outputs(c, views, indices, gt)

    def _test_masks(self, data: Path, test_names: List[str]) -> Dict[int, Dict[str, Path]]:
        """test view index -> prompt -> mask file, with one error naming every stray / missing folder."""
        root = _resolve(data, self.config.test_mask_path)
        if not root.is_dir():
            raise FileNotFoundError(f"LERF-Mask ground-truth folder {root} does not exist")
        out: Dict[int, Dict[str, Path]] = {}
        stray: List[str] = []
        for p in sorted(root.iterdir(), key=lambda q: q.name):
            if p.is_dir() and p.name.isdigit() and int(p.name) < len(test_names):
                files = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
                if files:
                    out[int(p.name)] = {f.stem: f for f in files}
            else:
                stray.append(p.name + ("/" if p.is_dir() else ""))
        missing = [f"{k} ({test_names[k]})" for k in range(len(test_names)) if k not in out]
        if stray or missing:
            msg = [f"{root} does not match the {len(test_names)} test views of {data} "
                   f"(images not in {self.config.train_images_path}, sorted):"]
            if stray:
                msg.append(f"entries matching no test view (expected folders 0..{len(test_names) - 1}): "
                           f"[{_fmt(stray)}]")
            if missing:
                msg.append(f"test views without masks: [{_fmt(missing)}]")
            raise ValueError(" ".join(msg))
        return out
