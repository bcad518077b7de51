"""Checks of a scene where it is read: poses, frames, paths and points, each failure one
:class:`~pepeseg3d_ns.errors.UserError` naming the file and what to fix.

Used by :class:`~pepeseg3d_ns.data.dataparser.PepeDataParser` (``transforms.json``, before nerfstudio parses it)
and by the benchmark parsers (:mod:`pepeseg3d_ns.data.benchmarks`, on the poses and points they read).

Paths that leave the dataset folder (``../x.png``, ``/abs/x.png``) are refused unless
``allow_outside_paths`` is set. nerfstudio itself follows them; we do not by default because a
``transforms.json`` is something people share: a frame pointing outside the folder makes training read,
cache (as priors) and show in the viewer files of the machine it runs on, with no sign in the scene folder.
The check is on the path as written (``..`` and absolute paths), so a symbolic link inside the folder, which
the folder's owner put there, is still followed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from pepeseg3d_ns.errors import UserError

_MAX_LISTED = 10
OUTSIDE_FLAG = "--pipeline.datamanager.dataparser.allow-outside-paths True (ns-train ... nerfstudio-data --allow-outside-paths True)"


def _listed(items: Sequence[str]) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    return head + (f" ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def path_leaves(folder: Path, relpath: str) -> bool:
    """Whether ``folder / relpath`` (as written: ``..`` components, absolute paths) lies outside ``folder``."""
    base = os.path.normpath(os.path.abspath(folder))
    target = os.path.normpath(os.path.join(base, os.path.expanduser(str(relpath))))
    return os.path.commonpath([base, target]) != base


def check_poses(c2w: np.ndarray, names: Sequence[str], source: Path, what: str = "transform_matrix") -> None:
    """``c2w [N, 3|4, 4]`` camera-to-world matrices of the views ``names`` read from ``source``: at least one view,
    every entry finite, and not every camera at the same position (which leaves no parallax and no scale)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    n = c2w.shape[0] if c2w.ndim == 3 else 0
    if n == 0:
        raise UserError(f"{source} has no views: nothing to train on")
    bad = [names[i] for i in range(n) if not np.isfinite(c2w[i]).all()]
    if bad:
        raise UserError(f"{source}: the {what} of {len(bad)} view(s) holds NaN or inf: {_listed(bad)}; fix or remove "
                        "those frames")
    centres = c2w[:, :3, 3]
    spread = float(np.abs(centres - centres.mean(0)).max())
    if spread <= 1e-9 * max(1.0, float(np.abs(centres).max())):
        c = ", ".join(f"{v:g}" for v in centres[0])
        raise UserError(
            f"{source}: {'the only view' if n == 1 else f'all {n} views'} {'has its' if n == 1 else 'have the'} camera "
            f"at ({c}): 3D reconstruction needs views from different positions (check the {what} entries, e.g. a "
            "capture tool that wrote one pose for every frame)")


def check_transforms(meta: dict, meta_path: Path, allow_outside_paths: bool = False) -> None:
    """Validate a parsed ``transforms.json``: a non-empty ``frames`` list, each frame with a ``file_path`` and a
    3x4 or 4x4 ``transform_matrix`` of finite numbers, cameras at more than one position, and (unless
    ``allow_outside_paths``) every ``file_path`` / ``mask_path`` / ``depth_file_path`` / ``ply_file_path`` inside
    the folder of ``meta_path``."""
    meta_path = Path(meta_path)
    folder = meta_path.parent
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is not a transforms.json: expected a JSON object, found a {type(meta).__name__}")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise UserError(f"{meta_path} has no frames ({'an empty' if isinstance(frames, list) else 'no'} 'frames' list): "
                        "nothing to train on; regenerate it with ns-process-data or pepeseg3d synth")
    poses, names, malformed = [], [], []
    for i, fr in enumerate(frames):
        name = fr.get("file_path") if isinstance(fr, dict) else None
        label = f"frame {i} ({name})" if name else f"frame {i}"
        if not isinstance(name, str) or not name:
            malformed.append(f"{label}: no file_path")
            continue
        try:
            m = np.asarray(fr.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            m = np.zeros(0)
        if m.shape not in ((4, 4), (3, 4)):
            malformed.append(f"{label}: transform_matrix is not a 4x4 list of numbers")
            continue
        poses.append(m[:3])
        names.append(name)
    if malformed:
        raise UserError(f"{meta_path}: malformed frames: {_listed(malformed)}")
    check_poses(np.stack(poses), names, meta_path)
    if allow_outside_paths:
        return
    outside: List[str] = []
    for fr in frames:
        for key in ("file_path", "mask_path", "depth_file_path"):
            if isinstance(fr.get(key), str) and path_leaves(folder, fr[key]):
                outside.append(f"{key} {fr[key]}")
    if isinstance(meta.get("ply_file_path"), str) and path_leaves(folder, meta["ply_file_path"]):
        outside.append(f"ply_file_path {meta['ply_file_path']}")
    if outside:
        raise UserError(
            f"{meta_path}: {len(outside)} path(s) lead outside {folder}: {_listed(outside)}. Files outside a dataset "
            f"folder are not read by default (a shared transforms.json could make training read your other files); "
            f"move them into the folder, or allow it with {OUTSIDE_FLAG}")


def finite_points(xyz: np.ndarray, rgb: Optional[np.ndarray], source: Path) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Drop the points ``xyz [P, 3]`` (and their ``rgb [P, 3]``) with a NaN or inf coordinate, warning with the
    file and the count; :class:`UserError` when none is left."""
    ok = np.isfinite(xyz).all(axis=1)
    n_bad = int((~ok).sum())
    if n_bad == 0:
        return xyz, rgb
    if n_bad == len(ok):
        raise UserError(f"point cloud {source}: all {n_bad} points have NaN or inf coordinates; fix the file or train "
                        "with --pipeline.model.random-init True")
    warnings.warn(f"point cloud {source}: dropped {n_bad} of {len(ok)} points with NaN or inf coordinates", stacklevel=2)
    return xyz[ok], (rgb[ok] if rgb is not None else None)


__all__ = ["OUTSIDE_FLAG", "check_poses", "check_transforms", "finite_points", "path_leaves"]
