"""``pepeseg3d segment``: click-to-segment without the viewer (what the viewer's buttons do, for scripts).

Clicks are pixels ``(x, y)`` (column, row; origin top left) of training view ``view`` rendered at full
resolution. Each click's gated feature at ``scale`` is a query; the union of their segments is the selection:
in 2D, pixels of every training view with cosine ``>= threshold`` to a query; in 3D, Gaussians whose gated,
smoothed feature passes the same test (:mod:`pepeseg3d_ns.contrast.query`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def overlay(rgb: np.ndarray, mask: np.ndarray, color=(255, 64, 32), alpha: float = 0.55) -> np.ndarray:
    """``uint8 [H, W, 3]``: ``rgb`` (float [0, 1] or uint8) with ``mask [H, W]`` tinted in ``color`` and its outline
    drawn."""
    img = np.asarray(rgb)
    img = (img * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img.copy()
    m = np.asarray(mask, dtype=bool)
    tint = np.array(color, dtype=np.float32)
    out = img.astype(np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * tint
    edge = m & ~(np.pad(m, 1)[:-2, 1:-1] & np.pad(m, 1)[2:, 1:-1] & np.pad(m, 1)[1:-1, :-2] & np.pad(m, 1)[1:-1, 2:])
    out[edge] = tint
    return out.round().clip(0, 255).astype(np.uint8)


def masks_for_views(model, cameras, scale: float, queries: torch.Tensor, threshold: float,
                    indices: Optional[Sequence[int]] = None, progress: bool = True) -> List[np.ndarray]:
    """2D segments ``bool [H, W]`` of ``queries`` in the views ``indices`` of ``cameras`` (default all)."""
    from tqdm import tqdm

    from pepeseg3d_ns.contrast.query import render_view, segment_view

    indices = list(range(len(cameras))) if indices is None else list(indices)
    out = []
    for i in tqdm(indices, desc="masks", unit="view", disable=not progress):
        view = render_view(model, cameras[i : i + 1])
        out.append(segment_view(view, scale, queries, threshold).cpu().numpy())
    return out


def run_segment(load_config: Path, clicks: Sequence[Tuple[float, float]], view: int, scale: float,
                threshold: float = 0.7, output_dir: Path = Path("segment_out"), all_views: bool = True,
                progress: bool = True) -> Dict:
    """Load a pepe-contrast run, query at ``clicks`` of training view ``view`` and write into ``output_dir``:
    ``selection.ply`` / ``selection_indices.npy`` / ``selection.json`` (3D), ``masks/<image>.png`` for every
    training view (or only ``view`` when ``all_views`` is False) and ``overlay.png`` of the clicked view.
    Returns a summary dict (counts and paths).

    Bad arguments are a :class:`~pepeseg3d_ns.errors.UserError` naming the flag, raised before the run is loaded;
    an empty 3D selection is an :class:`~pepeseg3d_ns.export.EmptySelectionError` and writes nothing."""
    from PIL import Image

    from pepeseg3d_ns.contrast.query import query_from_pixels, render_view, segment_view, select_gaussians
    from pepeseg3d_ns.errors import UserError, check_count, check_file, check_number, check_scale, check_threshold
    from pepeseg3d_ns.export import EmptySelectionError, save_masks, save_selection
    from pepeseg3d_ns.runs import eval_setup

    check_file("--load-config", load_config, "config.yml of a pepe-contrast run")
    scale = check_scale("--scale", scale)
    threshold = check_threshold("--threshold", threshold)
    view = check_count("--view", view, minimum=0)
    if not clicks:
        raise UserError("--click: give at least one pixel, e.g. --click 64 40")
    for c in clicks:
        if len(c) != 2:
            raise UserError(f"--click {' '.join(map(str, c))}: give two numbers X Y (column, row)")
        for v in c:
            check_number("--click", v, lo=0.0, what="a pixel coordinate")
    _, pipeline, _, _ = eval_setup(Path(load_config), test_mode="test")
    model = pipeline.model
    _ = pipeline.datamanager.cached_train  # the training views as trained on: undistorted and cropped intrinsics
    if not hasattr(model, "gaussian_features"):
        raise UserError(f"--load-config {load_config} is not a pepe-contrast run (its model has no Gaussian features)")
    pipeline.eval()
    dataset = pipeline.datamanager.train_dataset
    cameras = dataset.cameras
    if not 0 <= view < len(cameras):
        raise UserError(f"--view {view} is out of range: the run has {len(cameras)} training views (0..{len(cameras) - 1})")
    W, H = int(cameras.width[view]), int(cameras.height[view])
    outside = [c for c in clicks if not (int(c[0]) < W and int(c[1]) < H)]
    if outside:
        raise UserError(f"--click {outside[0][0]:g} {outside[0][1]:g} is outside training view {view} ({W}x{H} "
                        "pixels; X is the column, Y the row)")
    ref = render_view(model, cameras[view : view + 1])
    queries = query_from_pixels(ref, scale, clicks)
    selected = select_gaussians(model, scale, queries, threshold)
    if not bool(selected.any()):
        raise EmptySelectionError(
            f"the selection is empty: no Gaussian has cosine >= {threshold:g} (--threshold) to the clicked "
            f"feature{'s' if len(clicks) > 1 else ''} at --scale {scale:g}; nothing was written. Lower --threshold "
            "or click elsewhere")
    output_dir = Path(output_dir)
    meta = {"config": str(load_config), "view": view, "clicks": [list(map(float, c)) for c in clicks],
            "scale": scale, "threshold": threshold}
    paths = save_selection(output_dir, model, selected, meta)
    names = [Path(p).name for p in dataset.image_filenames]
    idx = list(range(len(cameras))) if all_views else [view]
    masks = masks_for_views(model, cameras, scale, queries, threshold, idx, progress)
    save_masks(output_dir / "masks", masks, [names[i] for i in idx])
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(cameras[view : view + 1].to(model.device))["rgb"].cpu().numpy()
    ref_mask = segment_view(ref, scale, queries, threshold).cpu().numpy()
    img = overlay(rgb, ref_mask)
    for x, y in clicks:
        r, c = int(y), int(x)
        img[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = (255, 255, 0)
    Image.fromarray(img).save(output_dir / "overlay.png")
    summary = {"num_selected": int(selected.sum()), "num_gaussians": int(model.num_points),
               "mask_pixels": int(ref_mask.sum()), "views": len(idx), **{k: str(v) for k, v in paths.items()},
               "overlay": str(output_dir / "overlay.png"), "masks": str(output_dir / "masks")}
    return summary
