"""Query API of a trained pepe-contrast model: what the viewer, ``pepeseg3d segment``, the evaluation and the
export use.

A *query* is a unit feature vector ``[D]`` taken at a scale ``s``. Its 2D segment in a view is the set of pixels
whose gated feature ``psi(s) * F(p)`` has cosine similarity ``>= threshold`` with it (with several queries, their
union: the maximum cosine counts); its 3D segment is the set of Gaussians whose own gated, smoothed feature
``psi(s) * f~_i`` passes the same test. Pixels are ``(x, y)`` = (column, row) of the rendered image, origin top
left, like the viewer's clicks. Cameras are nerfstudio ``Cameras`` (OpenGL camera-to-world).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as Fnn
from torch import Tensor


def _normalise(x: Tensor) -> Tensor:
    return Fnn.normalize(x.float(), dim=-1, eps=1e-8)


@dataclass
class FeatureView:
    """Rendered ungated features of one camera: ``features [H, W, D]``, ``accumulation [H, W]``. Gating at any
    scale is then a product (:meth:`at_scale`), so one render serves every scale."""

    features: Tensor
    accumulation: Tensor
    model: object

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.features.shape[:2])  # type: ignore[return-value]

    @torch.no_grad()
    def at_scale(self, scale: float) -> Tensor:
        """Unit-norm gated features ``[H, W, D]`` at ``scale``."""
        return _normalise(self.features * self.model.gate(float(scale))[0])


@torch.no_grad()
def render_view(model, camera) -> FeatureView:
    """Render the ungated feature map of ``camera`` (one camera: ``Cameras`` of shape [1])."""
    was = model.training
    model.eval()
    try:
        feats, alpha = model.render_feature_map(camera.to(model.device))
    finally:
        model.train(was)
    return FeatureView(feats, alpha[..., 0], model)


@torch.no_grad()
def render_gated_features(model, camera, scale: float) -> Tensor:
    """Unit-norm gated feature map ``[H, W, D]`` of ``camera`` at ``scale``."""
    return render_view(model, camera).at_scale(scale)


def _check_scale(scale: float) -> float:
    if not 0.0 <= float(scale) <= 1.0:
        raise ValueError(f"scale must be in [0, 1], got {scale}")
    return float(scale)


@torch.no_grad()
def query_from_pixels(view: FeatureView, scale: float, pixels: Sequence[Tuple[float, float]]) -> Tensor:
    """Queries ``[Q, D]`` (unit norm) from clicked pixels ``[(x, y), ...]`` of ``view`` at ``scale``."""
    scale = _check_scale(scale)
    H, W = view.shape
    feats = view.at_scale(scale)
    out = []
    for x, y in pixels:
        col, row = int(x), int(y)
        if not (0 <= col < W and 0 <= row < H):
            raise ValueError(f"pixel ({x}, {y}) is outside the {W}x{H} image")
        out.append(feats[row, col])
    if not out:
        raise ValueError("no pixels given")
    return torch.stack(out)


@torch.no_grad()
def query_from_mask(view: FeatureView, scale: float, mask: Tensor, max_points: int = 3000, min_cluster_size: int = 10,
                    seed: int = 0) -> Optional[Tensor]:
    """The query ``[D]`` of a region (``mask [H, W]`` bool): HDBSCAN on the gated features inside the mask, the
    centroid of the largest cluster (the mean feature of the mask when HDBSCAN finds no cluster). None for an
    empty mask."""
    from pepeseg3d_ns.contrast.cluster import cluster_features

    scale = _check_scale(scale)
    mask = torch.as_tensor(mask, device=view.features.device).bool()
    if mask.shape != view.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and view {view.shape} differ")
    feats = view.at_scale(scale)[mask]
    if feats.shape[0] == 0:
        return None
    if feats.shape[0] >= 2 * min_cluster_size:
        res = cluster_features(feats, min_cluster_size=min_cluster_size, max_points=max_points, seed=seed,
                               allow_single_cluster=True)
        if res.centroids.shape[0] > 0:
            return _normalise(res.centroids[0])
    return _normalise(feats.mean(0))


@torch.no_grad()
def similarity_map(view: FeatureView, scale: float, queries: Tensor) -> Tensor:
    """Maximum cosine over ``queries [Q, D]`` (or ``[D]``) of every pixel at ``scale``: ``[H, W]``."""
    feats = view.at_scale(_check_scale(scale))
    q = _normalise(queries.reshape(-1, feats.shape[-1]).to(feats))
    return (feats @ q.T).amax(-1)


@torch.no_grad()
def segment_view(view: FeatureView, scale: float, queries: Tensor, threshold: float = 0.7, min_alpha: float = 0.5) -> Tensor:
    """2D segment ``bool [H, W]``: pixels with cosine ``>= threshold`` to a query and accumulated opacity
    ``>= min_alpha`` (empty space is never selected)."""
    return (similarity_map(view, scale, queries) >= threshold) & (view.accumulation >= min_alpha)


@torch.no_grad()
def select_gaussians(model, scale: float, queries: Tensor, threshold: float = 0.7) -> Tensor:
    """3D segment ``bool [N]``: Gaussians whose own gated, smoothed feature has cosine ``>= threshold`` to a query."""
    feats = _normalise(model.gaussian_features(_check_scale(scale)))
    q = _normalise(queries.reshape(-1, feats.shape[-1]).to(feats))
    return (feats @ q.T).amax(-1) >= threshold
