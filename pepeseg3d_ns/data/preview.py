"""Pictures of a synthetic scene: views with their GT depth and instance maps at every level."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pepeseg3d_ns.data.synthetic import LEVELS, load_gt_depth, load_gt_masks


def colorize_ids(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[H, W]`` integer ids -> ``[H, W, 3] uint8`` with a fixed random colour per id; id 0 is black."""
    n = int(ids.max()) + 1
    palette = np.random.default_rng(seed).integers(40, 256, size=(max(n, 1), 3), dtype=np.uint8)
    palette[0] = 0
    return palette[ids]


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """``[H, W]`` z-depth -> ``[H, W, 3] uint8``, coloured by inverse depth (see :func:`colorize_disparity`), so a
    far backdrop does not flatten the foreground."""
    return colorize_disparity(1.0 / np.maximum(depth, 1e-6))


def colorize_disparity(disp: np.ndarray) -> np.ndarray:
    """``[H, W]`` inverse depth (larger = nearer, any affine scale) -> ``[H, W, 3] uint8``: near = yellow,
    far = blue, 2-98 % percentile stretch."""
    lo, hi = np.percentile(disp, 2), np.percentile(disp, 98)
    t = np.clip((disp - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return (np.stack([t, 0.3 + 0.5 * t, 1.0 - t], axis=-1) * 255).astype(np.uint8)


def save_grid(rows: Sequence[np.ndarray], out_png: Path, scale: int = 1) -> Path:
    """Stack ``[h, W, 3] uint8`` rows vertically, enlarge by ``scale`` (nearest) and save as PNG."""
    grid = Image.fromarray(np.concatenate(list(rows), axis=0))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png


def scene_preview(scene_dir: Path, out_png: Path, views: Sequence[int] = (0, 13, 26), scale: int = 2) -> Path:
    """Write a grid: one row per view index, columns RGB | GT depth | parts | objects | groups."""
    scene_dir = Path(scene_dir)
    images = sorted((scene_dir / "images").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no images in {scene_dir / 'images'}")
    rows = []
    for v in views:
        path = images[v % len(images)]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        cols = [rgb, colorize_depth(load_gt_depth(scene_dir, path.stem))]
        cols += [colorize_ids(load_gt_masks(scene_dir, path.stem, level), seed=i) for i, level in enumerate(LEVELS)]
        rows.append(np.concatenate(cols, axis=1))
    return save_grid(rows, out_png, scale)


def mask_layers(masks: np.ndarray, n_layers: int = 3, seed: int = 0) -> list:
    """Split ``bool [M, H, W]`` masks into ``n_layers`` granularity layers by area (fine to coarse) and paint each
    layer: a colour per mask, smaller masks on top, black where no mask of that layer is. Returns a list of
    ``[H, W, 3] uint8``."""
    m, h, w = masks.shape
    areas = masks.reshape(m, -1).sum(1)
    order = np.argsort(areas, kind="stable")
    colors = np.random.default_rng(seed).integers(40, 256, size=(max(m, 1), 3), dtype=np.uint8)
    layers = []
    for chunk in np.array_split(order, n_layers):
        img = np.zeros((h, w, 3), np.uint8)
        for i in chunk[::-1]:  # largest first, so smaller masks end on top
            img[masks[i]] = colors[i]
        layers.append(img)
    return layers


def priors_preview(cache, images: Sequence, out_png: Path, scale: int = 2) -> Path:
    """Write a grid of what a prior cache holds for ``images`` (:class:`~pepeseg3d_ns.priors.compute.PriorImage`):
    one row per view, columns RGB (the image the model trains on) | fine / medium / coarse masks (area tertiles,
    a colour per mask) | depth prior (yellow = near)."""
    rows = []
    for im in images:
        pri = cache.load(im.key)
        cols = [im.image, *mask_layers(pri.masks.to_dense()), colorize_disparity(pri.depth)]
        rows.append(np.concatenate(cols, axis=1))
    return save_grid(rows, out_png, scale)
