"""Physical 3D size of each SAM mask, and the per-scene map from sizes to scales ``s`` in [0, 1].

A mask's size is ``2 * || std(P) ||``, where ``P`` holds the mask's pixels back-projected with the rendered
z-depth of the reconstructed scene. ``std`` is the per-axis population standard deviation of the points and
``|| . ||`` the Euclidean norm over the three axes. Before back-projecting, isolated boundary pixels are dropped
(pixels with fewer than ``min_neighbors`` of their 8 neighbours inside the mask: stray pixels, 1-px spurs, sharp
corners). Their depth is the least reliable, because a boundary pixel can mix foreground and background depth.
Then each mask's depth outliers are dropped (:func:`depth_inliers`: farther than 3 robust standard deviations from
the mask's median depth), so that a mask bleeding onto the background behind its object keeps the object's size.

Camera convention: pinhole ``K [3, 3]`` in pixels, pixel ``(u, v)`` centred at ``(u + 0.5, v + 0.5)``, z-depth
along the optical axis; points come out in the OpenCV camera frame (x right, y down, z forward). Sizes are
rotation invariant, so the frame does not matter for the size.

Sizes become scales through the empirical CDF of all mask sizes in the scene (a quantile transform):
``s = F(size)``, piecewise linear between stored quantile knots. The map is monotone and depends only on the
scene, and it is serialisable (:meth:`ScaleMap.to_dict`), so the pepe-contrast checkpoint stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


SIZE_ESTIMATOR = "std-depth-inliers-v1"
"""Tag of the size rule, stored with the scales (``source["size_estimator"]``)."""


def backproject(depth: Tensor, K: Tensor) -> Tensor:
    """Camera-frame points ``[H, W, 3]`` (OpenCV) of every pixel centre, given z-depth ``[H, W]`` and ``K [3, 3]``."""
    H, W = depth.shape
    v, u = torch.meshgrid(
        torch.arange(H, dtype=depth.dtype, device=depth.device) + 0.5,
        torch.arange(W, dtype=depth.dtype, device=depth.device) + 0.5,
        indexing="ij",
    )
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    return torch.stack([x, y, depth], dim=-1)


def remove_isolated_pixels(masks: Tensor, min_neighbors: int = 4, min_keep: int = 3) -> Tensor:
    """Drop mask pixels with fewer than ``min_neighbors`` of their 8 neighbours in the mask.

    ``masks`` is ``bool [M, H, W]``; returns the same shape. A mask that would keep fewer than ``min_keep``
    pixels is returned unchanged (tiny masks have nothing but boundary).
    """
    if masks.numel() == 0:
        return masks
    m = masks.float()[:, None]
    kernel = torch.ones(1, 1, 3, 3, dtype=m.dtype, device=m.device)
    neighbours = F.conv2d(m, kernel, padding=1)[:, 0] - m[:, 0]
    kept = masks & (neighbours >= min_neighbors)
    too_small = kept.flatten(1).sum(1) < min_keep
    return torch.where(too_small[:, None, None], masks, kept)


def _masked_median(values: Tensor, sel: Tensor) -> Tensor:
    """Lower median of ``values`` (``[N]`` or ``[m, N]``) over each row of ``sel bool [m, N]`` -> ``[m]`` (NaN for
    an empty row)."""
    n = sel.sum(1)
    values = values.expand(sel.shape)
    srt = torch.sort(torch.where(sel, values, torch.full_like(values, float("inf"))), dim=1).values
    med = srt.gather(1, (torch.div(n - 1, 2, rounding_mode="floor").clamp(min=0))[:, None])[:, 0]
    return torch.where(n > 0, med, torch.full_like(med, float("nan")))


def depth_inliers(sel: Tensor, z: Tensor, k: float = 3.0, rel_tol: float = 0.01) -> Tensor:
    """Drop each mask's depth outliers: pixels whose z-depth is far from the mask's median depth.

    Kept: ``|z - med| <= k * 1.4826 * MAD + rel_tol * med``, with ``med`` and ``MAD`` (median absolute deviation)
    over the mask's pixels (``1.4826 * MAD`` estimates the standard deviation of normal data; ``rel_tol`` keeps
    pixels on a flat, fronto-parallel mask whose MAD is 0). A mask that bleeds over an object's border onto a
    background metres behind it keeps its object pixels only; a mask whose depth spreads continuously (a table
    seen at a grazing angle) loses nothing.

    Args:
        sel: ``bool [m, N]`` pixels of each mask (flat).
        z: ``[N]`` z-depth of those pixels (only entries inside ``sel`` are read).
        k: threshold in robust standard deviations.
        rel_tol: tolerance as a fraction of the median depth.

    Returns:
        ``bool [m, N]``, a subset of ``sel``.
    """
    zf = z.float()
    med = _masked_median(zf, sel)
    dev = (zf[None, :] - med[:, None]).abs()
    mad = _masked_median(dev, sel)
    thr = k * 1.4826 * mad + rel_tol * med.abs()
    return sel & (dev <= thr[:, None])


def mask_sizes(
    masks: Tensor,
    depth: Tensor,
    K: Tensor,
    valid: Optional[Tensor] = None,
    min_neighbors: int = 4,
    chunk: int = 32,
    outlier_k: Optional[float] = 3.0,
) -> Tensor:
    """3D size ``2 * ||std(points)||`` of each mask, in the units of ``depth``.

    Args:
        masks: ``bool [M, H, W]`` at the resolution of ``depth``.
        depth: ``[H, W]`` z-depth, e.g. rendered expected depth of the reconstructed scene.
        K: ``[3, 3]`` pinhole intrinsics for that resolution.
        valid: optional ``bool [H, W]``; pixels with invalid depth (no accumulation, non-finite) are ignored.
        min_neighbors: see :func:`remove_isolated_pixels`.
        chunk: masks per matrix product, bounding memory to ``chunk * H * W`` floats.
        outlier_k: drop each mask's depth outliers first (:func:`depth_inliers` with this ``k``); ``None`` keeps
            every pixel. A few background pixels at a mask's border would otherwise dominate the standard
            deviation (measured on the tabletop demo: a 59-px mask of a 41-px apple, reaching background up to
            4.4 units behind, measured 3.3 instead of 0.05 scene units).

    Returns:
        ``[M]`` float sizes; NaN for a mask with fewer than 2 valid pixels.
    """
    if masks.shape[-2:] != depth.shape:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but depth is {tuple(depth.shape)}; resize them first")
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok &= valid
    pts = backproject(torch.where(ok, depth, torch.zeros_like(depth)), K).reshape(-1, 3).double()
    feats = torch.cat([pts, pts * pts, torch.ones_like(pts[:, :1])], dim=1)  # [HW, 7]
    okf = ok.reshape(-1)
    out = []
    for start in range(0, masks.shape[0], chunk):
        sel = remove_isolated_pixels(masks[start : start + chunk], min_neighbors).reshape(-1, okf.numel()) & okf
        if outlier_k is not None:
            sel = depth_inliers(sel, pts[:, 2], k=outlier_k)
        sums = sel.double() @ feats  # [m, 7]
        n = sums[:, 6:7]
        mean = sums[:, :3] / n.clamp(min=1)
        var = (sums[:, 3:6] / n.clamp(min=1) - mean * mean).clamp(min=0)
        size = 2.0 * var.sum(1).sqrt()
        out.append(torch.where(n[:, 0] >= 2, size, torch.full_like(size, float("nan"))))
    if not out:
        return torch.zeros(0, dtype=depth.dtype, device=depth.device)
    return torch.cat(out).to(depth.dtype)


@dataclass
class ScaleMap:
    """Monotone map from a mask's 3D size to a scale ``s`` in [0, 1]: the scene's empirical CDF of sizes.

    ``knots`` holds sizes at the quantiles ``levels`` (both ascending). Sizes below the first knot map to 0, and
    sizes above the last knot map to 1.
    """

    knots: List[float]
    levels: List[float]

    @classmethod
    def fit(cls, sizes: Tensor | np.ndarray, n_knots: int = 101) -> "ScaleMap":
        """Quantile knots of all finite ``sizes [T]`` of a scene (every mask of every view)."""
        s = np.asarray(sizes.detach().cpu() if isinstance(sizes, Tensor) else sizes, dtype=np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        if s.size == 0:
            raise ValueError("cannot fit a scale map: no mask has a finite size (empty masks or invalid depth)")
        levels = np.linspace(0.0, 1.0, n_knots)
        knots = np.quantile(s, levels)
        # ties (many equal sizes) would make the inverse ambiguous: keep the last level of each run
        knots_u, idx = np.unique(knots[::-1], return_index=True)
        levels_u = levels[::-1][idx]
        if knots_u.size == 1:
            knots_u = np.array([knots_u[0], knots_u[0] * (1 + 1e-6) + 1e-12])
            levels_u = np.array([0.0, 1.0])
        return cls(knots=knots_u.tolist(), levels=levels_u.tolist())

    def __call__(self, sizes: Tensor) -> Tensor:
        """Scales ``[...]`` in [0, 1] of ``sizes [...]`` (NaN stays NaN)."""
        k = torch.tensor(self.knots, dtype=torch.float64, device=sizes.device)
        lv = torch.tensor(self.levels, dtype=torch.float64, device=sizes.device)
        x = sizes.double().clamp(min=float(k[0]), max=float(k[-1]))
        i = torch.searchsorted(k, x.contiguous(), right=True).clamp(1, k.numel() - 1)
        t = (x - k[i - 1]) / (k[i] - k[i - 1])
        s = lv[i - 1] + t * (lv[i] - lv[i - 1])
        return torch.where(torch.isnan(sizes), sizes.double(), s).to(sizes.dtype)

    def to_dict(self) -> Dict[str, List[float]]:
        return {"knots": list(self.knots), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: Dict[str, List[float]]) -> "ScaleMap":
        return cls(knots=list(d["knots"]), levels=list(d["levels"]))


# ----------------------------------------------------------------------------------------------- per scene


@dataclass
class SceneScales:
    """Mask sizes and scales of a whole scene, measured on one frozen geometry.

    ``keys[i]`` is the prior-cache key of training image ``i`` (:func:`pepeseg3d_ns.priors.cache.image_key`) and
    ``sizes[i]`` its masks' sizes ``float64 [M_i]`` (in the reconstruction's units; NaN where a mask had too few
    pixels with valid depth); ``scale_map`` maps a size to ``s`` in [0, 1]; ``source`` records what produced the
    depth (the pepe-recon checkpoint and step, the size rule). A pepe-contrast run keeps its own copy in its
    checkpoint (:meth:`to_state` / :meth:`from_state`), so two runs on one scene never share a mutable file.
    """

    keys: List[str]
    sizes: List[np.ndarray]
    scale_map: ScaleMap
    source: Dict

    def scales(self, i: int) -> np.ndarray:
        """``float32 [M_i]`` scales in [0, 1] of the masks of training image ``i`` (NaN stays NaN)."""
        return self.scale_map(torch.from_numpy(self.sizes[i].astype(np.float64))).numpy().astype(np.float32)

    def per_image(self) -> List[np.ndarray]:
        """:meth:`scales` of every training image, in order."""
        return [self.scales(i) for i in range(len(self.keys))]

    def to_state(self) -> Dict:
        """Checkpoint form (lists, strings, floats and tensors only: loadable with ``torch.load(weights_only=True)``)."""
        counts = [int(v.shape[0]) for v in self.sizes]
        flat = np.concatenate(self.sizes) if self.sizes else np.zeros(0)
        return {"version": 2, "keys": list(self.keys), "counts": torch.tensor(counts, dtype=torch.long),
                "sizes": torch.from_numpy(flat.astype(np.float64)), "knots": list(self.scale_map.knots),
                "levels": list(self.scale_map.levels), "source": _canonical(self.source)}

    @classmethod
    def from_state(cls, state: Dict) -> "SceneScales":
        counts = [int(c) for c in state["counts"].tolist()]
        flat = state["sizes"].double().numpy()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        sizes = [flat[offsets[i]:offsets[i + 1]].copy() for i in range(len(counts))]
        return cls(list(state["keys"]), sizes, ScaleMap(list(state["knots"]), list(state["levels"])), dict(state["source"]))

    def to_json(self) -> Dict:
        """Human-readable form (sizes per key), e.g. for a report."""
        return {"source": self.source, "scale_map": self.scale_map.to_dict(),
                "images": {k: [None if not np.isfinite(v) else float(v) for v in sz] for k, sz in zip(self.keys, self.sizes)}}


def _canonical(obj):
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def compute_scene_scales(masks: Sequence, keys: Sequence[str], depth_fn, source: Optional[Dict] = None,
                         progress: bool = True, outlier_k: Optional[float] = 3.0) -> SceneScales:
    """Sizes of every mask of every training view and the scene's :class:`ScaleMap`.

    Args:
        masks: per training view, its :class:`~pepeseg3d_ns.priors.masks.MaskSet` (at the resolution of the image
            the model trains on).
        keys: per training view, its prior-cache key (stored, to tell which masks the sizes belong to).
        depth_fn: ``i -> (depth [H, W], K [3, 3], valid [H, W] or None)``: z-depth of the reconstruction seen from
            view ``i`` (rendered expected depth), its pinhole intrinsics, and which pixels have depth. Masks are
            resized to the depth's resolution when they differ (nearest).
        source: what produced the depth, stored with the result.
        outlier_k: :func:`mask_sizes`' depth-outlier rule (``None``: every pixel of the mask counts, the paper's).
    """
    from tqdm import tqdm

    if len(masks) != len(keys):
        raise ValueError(f"{len(masks)} mask sets for {len(keys)} keys")
    sizes = []
    for i in tqdm(range(len(keys)), desc="mask scales", unit="view", disable=not progress):
        depth, K, valid = depth_fn(i)
        ms = masks[i]
        if ms.shape != tuple(depth.shape):
            ms = ms.resized(*depth.shape)
        dense = ms.to_torch(depth.device)
        sizes.append(mask_sizes(dense, depth.double(), K.double(), valid, outlier_k=outlier_k)
                     .cpu().numpy().astype(np.float64))
    all_sizes = np.concatenate(sizes) if sizes else np.zeros(0)
    source = {**dict(source or {}), "size_estimator": SIZE_ESTIMATOR if outlier_k is not None else "std-all-pixels-v1"}
    return SceneScales(keys=list(keys), sizes=sizes, scale_map=ScaleMap.fit(all_sizes), source=source)


def rendered_depth_fn(pipeline, min_alpha: float = 0.5):
    """``depth_fn`` for :func:`compute_scene_scales` from a nerfstudio pipeline: renders training view ``i`` at the
    resolution of its cached image; pixels with accumulated alpha below ``min_alpha`` are invalid. Camera
    conventions are the model's (nerfstudio OpenGL poses, pinhole K in pixels; the datamanager has already
    replaced the intrinsics of undistorted views by those of the undistorted image)."""
    cameras = pipeline.datamanager.train_dataset.cameras

    @torch.no_grad()
    def depth_fn(i: int):
        cam = cameras[i : i + 1].to(pipeline.device)
        out = pipeline.model.get_outputs_for_camera(cam)
        K = cam.get_intrinsics_matrices()[0].to(pipeline.device)
        return out["depth"][..., 0], K, out["accumulation"][..., 0] >= min_alpha

    return depth_fn
