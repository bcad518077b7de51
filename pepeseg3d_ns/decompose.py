"""Automatic decomposition of a pepe-contrast scene at a scale (supplementary Fig. 4): HDBSCAN clusters of the
rendered gated features, shown in colour.

Colours are consistent across views: the clusters are found once per scale on features pooled from every view
to be rendered (a bounded random subsample, :func:`pepeseg3d_ns.contrast.cluster.cluster_features`), then every
pixel takes the label of its highest-cosine cluster centre. Pixels with accumulated opacity below 0.5 are black;
pixels whose best cosine is below ``min_similarity`` are grey (unassigned).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class Decomposition:
    """Cluster centres ``[C, D]`` (unit norm) of one scale and their colours ``uint8 [C, 3]``."""

    scale: float
    centroids: Tensor
    colors: np.ndarray

    def label(self, gated: Tensor, min_similarity: float = 0.5) -> Tensor:
        """Labels ``long [H, W]`` of unit-norm gated features ``[H, W, D]`` (-1 = below ``min_similarity``)."""
        if self.centroids.shape[0] == 0:
            return torch.full(gated.shape[:2], -1, dtype=torch.long, device=gated.device)
        sim = gated @ self.centroids.to(gated).T
        best, lab = sim.max(-1)
        return torch.where(best >= min_similarity, lab, torch.full_like(lab, -1))

    def colorize(self, labels: Tensor, accumulation: Optional[Tensor] = None) -> np.ndarray:
        """``uint8 [H, W, 3]``: cluster colours, grey for -1, black where ``accumulation < 0.5``."""
        lab = labels.cpu().numpy()
        palette = np.concatenate([self.colors, np.array([[110, 110, 110]], dtype=np.uint8)])
        img = palette[np.where(lab < 0, len(self.colors), lab)]
        if accumulation is not None:
            img[accumulation.cpu().numpy() < 0.5] = 0
        return img


def fit_decomposition(views: Sequence, scale: float, max_points: int = 10000, min_cluster_size: Optional[int] = None,
                      seed: int = 0) -> Decomposition:
    """Cluster the gated features (at ``scale``) of the opaque pixels of ``views`` (:class:`FeatureView` s)."""
    from pepeseg3d_ns.contrast.cluster import cluster_features, label_colors

    gen = torch.Generator().manual_seed(seed)
    per_view = max(1, max_points // max(len(views), 1))
    pooled = []
    for v in views:
        feats = v.at_scale(scale)[v.accumulation >= 0.5]
        if feats.shape[0] > per_view:
            feats = feats[torch.randperm(feats.shape[0], generator=gen)[:per_view].to(feats.device)]
        pooled.append(feats)
    pooled_t = torch.cat(pooled) if pooled else torch.zeros(0, 1)
    if pooled_t.shape[0] < 10:
        return Decomposition(scale, pooled_t.new_zeros(0, pooled_t.shape[-1]), np.zeros((0, 3), np.uint8))
    res = cluster_features(pooled_t, min_cluster_size=min_cluster_size, max_points=max_points, seed=seed)
    n = res.centroids.shape[0]
    colors = np.asarray(label_colors(torch.arange(n), seed=seed)) if n else np.zeros((0, 3), np.uint8)
    return Decomposition(scale, res.centroids, np.asarray(colors, dtype=np.uint8))


def run_decompose(load_config: Path, scales: Sequence[float] = (0.1, 0.5, 0.9), output_dir: Path = Path("decompose_out"),
                  split: str = "train", max_views: int = 6, progress: bool = True) -> Dict:
    """Load a pepe-contrast run, decompose up to ``max_views`` evenly spaced views of ``split`` at each scale and
    write ``<output_dir>/s<scale>/<image>.png`` plus ``contact_sheet.png`` (rows: views; columns: RGB, then one
    decomposition per scale in the order given). Returns a summary with cluster counts per scale."""
    from tqdm import tqdm

    from pepeseg3d_ns.contrast.query import render_view
    from pepeseg3d_ns.data.preview import save_grid
    from pepeseg3d_ns.errors import UserError, check_all, check_count, check_file, check_scale
    from pepeseg3d_ns.runs import eval_setup

    check_file("--load-config", load_config, "config.yml of a pepe-contrast run")
    scales = check_all("--scales", scales, check_scale)
    max_views = check_count("--max-views", max_views)
    if split not in ("train", "eval"):
        raise UserError(f"--split {split}: must be train or eval")
    _, pipeline, _, _ = eval_setup(Path(load_config), test_mode="test")
    _ = pipeline.datamanager.cached_train if split == "train" else pipeline.datamanager.cached_eval  # undistorted views
    model = pipeline.model
    if not hasattr(model, "gaussian_features"):
        raise UserError(f"--load-config {load_config} is not a pepe-contrast run (its model has no Gaussian features)")
    pipeline.eval()
    dataset = pipeline.datamanager.eval_dataset if split == "eval" else pipeline.datamanager.train_dataset
    n = len(dataset.cameras) if dataset is not None else 0
    if n == 0:
        raise UserError(f"--split {split}: the run has no {split} views to decompose")
    idx = sorted(set(np.linspace(0, n - 1, min(max_views, n)).round().astype(int).tolist()))
    names = [Path(dataset.image_filenames[i]).stem for i in idx]
    views, rgbs = [], []
    for i in tqdm(idx, desc="render", unit="view", disable=not progress):
        cam = dataset.cameras[i : i + 1]
        views.append(render_view(model, cam))
        with torch.no_grad():
            rgbs.append((model.get_outputs_for_camera(cam.to(model.device))["rgb"].cpu().numpy() * 255).astype(np.uint8))
    output_dir = Path(output_dir)
    rows: List[List[np.ndarray]] = [[rgb] for rgb in rgbs]
    summary = {"views": names, "scales": {}}
    for s in tqdm(scales, desc="decompose", unit="scale", disable=not progress):
        dec = fit_decomposition(views, s)
        folder = output_dir / f"s{s:g}"
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for r, (v, name) in enumerate(zip(views, names)):
            img = dec.colorize(dec.label(v.at_scale(s)), v.accumulation)
            Image.fromarray(img).save(folder / f"{name}.png")
            rows[r].append(img)
        summary["scales"][f"{s:g}"] = int(dec.centroids.shape[0])
    sheet = output_dir / "contact_sheet.png"
    columns = ["render"] + [f"s = {s:g}: {summary['scales'][f'{s:g}']} clusters" for s in scales]
    save_grid([np.concatenate(r, axis=1) for r in rows], sheet, scale=2, columns=columns,
              title=f"automatic decomposition (HDBSCAN on rendered features at scale s), {split} views: {', '.join(names)}")
    summary["contact_sheet"] = str(sheet)
    return summary
