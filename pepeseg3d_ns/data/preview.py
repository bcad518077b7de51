"""Figures: labelled grids of views (a title and a label over every column), the synthetic scene's ground truth
(``preview.png`` of ``pepeseg3d synth``), the prior cache's content (``pepe_priors/preview.png``), and the colour
maps the demo's comparison picture and the decomposition sheet use."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


_PAD = 3  # pixels around each label line


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> List[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a single long word stays whole)."""
    lines: List[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def label_band(width: int, title: Optional[str] = None, columns: Sequence[str] = ()) -> Image.Image:
    """A white ``width``-pixel-wide band: ``title`` (left, wrapped) above one centred label per column (the
    ``len(columns)`` columns share the width equally), black text in PIL's default font."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.getbbox("Ag")[3] + 2
    title_lines = _wrap(draw, title, font, width - 2 * _PAD) if title else []
    col_w = width / max(len(columns), 1)
    col_lines = [_wrap(draw, c, font, int(col_w) - 2 * _PAD) for c in columns]
    n_col = max((len(c) for c in col_lines), default=0)
    height = _PAD + line_h * len(title_lines) + (_PAD if title_lines and n_col else 0) + line_h * n_col + _PAD
    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    y = _PAD
    for line in title_lines:
        draw.text((_PAD, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    y += _PAD if title_lines and n_col else 0
    for j, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            x = col_w * j + (col_w - draw.textlength(line, font=font)) / 2
            draw.text((x, y + k * line_h), line, fill=(0, 0, 0), font=font)
    return band


def save_grid(rows: Sequence[np.ndarray], out_png: Path, scale: int = 1, title: Optional[str] = None,
              columns: Sequence[str] = ()) -> Path:
    """Stack ``[h, W, 3] uint8`` rows vertically, enlarge by ``scale`` (nearest), put a :func:`label_band` with
    ``title`` and the ``columns`` labels (equal-width columns) on top when either is given, and save as PNG."""
    grid = Image.fromarray(np.concatenate(list(rows), axis=0))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if title or columns:
        band = label_band(grid.width, title, columns)
        framed = Image.new("RGB", (grid.width, band.height + grid.height), (255, 255, 255))
        framed.paste(band, (0, 0))
        framed.paste(grid, (0, band.height))
        grid = framed
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
    rows, stems = [], []
    for v in views:
        path = images[v % len(images)]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        cols = [rgb, colorize_depth(load_gt_depth(scene_dir, path.stem))]
        cols += [colorize_ids(load_gt_masks(scene_dir, path.stem, level), seed=i) for i, level in enumerate(LEVELS)]
        rows.append(np.concatenate(cols, axis=1))
        stems.append(path.stem)
    title = f"synthetic scene {scene_dir.name}, ground truth; rows: {', '.join(stems)}"
    columns = ["image", "GT depth (yellow = near)"] + [f"GT {level}" for level in LEVELS]
    return save_grid(rows, out_png, scale, title=title, columns=columns)


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
    rows, mask_kinds, depth_kinds = [], set(), set()
    for im in images:
        pri = cache.load(im.key)
        cols = [im.image, *mask_layers(pri.masks.to_dense()), colorize_disparity(pri.depth)]
        rows.append(np.concatenate(cols, axis=1))
        mask_kinds.add(pri.entry["masks"]["kind"])
        depth_kinds.add(pri.entry["depth"]["kind"])
    masks = f"SAM masks ({'/'.join(sorted(mask_kinds))})"
    columns = ["image"] + [f"{masks}, {size}" for size in ("fine", "medium", "coarse")]
    columns.append(f"depth prior ({'/'.join(sorted(depth_kinds))}, yellow = near)")
    title = f"perception priors in {Path(cache.cache_dir).name}/, one row per view"
    return save_grid(rows, out_png, scale, title=title, columns=columns)
