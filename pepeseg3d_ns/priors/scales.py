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
scene, and it is serialisable (:meth:`ScaleMap.to_dict`), so the cache and the checkpoint can store it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


SIZE_ESTIMATOR = "std-depth-inliers-v1"
"""Tag of the size rule, stored in ``scales.json`` (``source["size_estimator"]``): a file measured with another
rule (or none, before the depth-outlier step existed) is measured again by pepe-contrast."""


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

SCALES_FILE = "scales.json"


@dataclass
class SceneScales:
    """Mask sizes and scales of a whole scene, as stored in ``<cache>/scales.json``.

    ``sizes[stem]`` is ``float [M]`` (metres in the reconstruction's units, NaN where a mask had too few
    pixels with valid depth), aligned with the masks of ``stem`` in the prior cache; ``scale_map`` maps a size
    to ``s`` in [0, 1]; ``source`` records what produced the depth (e.g. the pepe-recon config and step).
    """

    sizes: Dict[str, np.ndarray]
    scale_map: ScaleMap
    source: Dict
    masks_digest: Dict[str, str]

    def scales(self, stem: str) -> np.ndarray:
        """``float32 [M]`` scales in [0, 1] of the masks of ``stem`` (NaN stays NaN)."""
        return self.scale_map(torch.from_numpy(self.sizes[stem].astype(np.float64))).numpy().astype(np.float32)

    def to_json(self) -> Dict:
        return {
            "version": 1,
            "source": self.source,
            "scale_map": self.scale_map.to_dict(),
            "images": {
                s: {"sizes": [None if not np.isfinite(v) else float(v) for v in self.sizes[s]],
                    "masks_digest": self.masks_digest.get(s)}
                for s in sorted(self.sizes)
            },
        }

    @classmethod
    def from_json(cls, d: Dict) -> "SceneScales":
        images = d["images"]
        return cls(
            sizes={s: np.array([np.nan if v is None else v for v in e["sizes"]], dtype=np.float64) for s, e in images.items()},
            scale_map=ScaleMap.from_dict(d["scale_map"]),
            source=d.get("source", {}),
            masks_digest={s: e.get("masks_digest") for s, e in images.items()},
        )


def compute_scene_scales(cache, stems, depth_fn, source: Optional[Dict] = None, progress: bool = True) -> SceneScales:
    """Sizes of every mask of every view in ``stems`` and the scene's :class:`ScaleMap`.

    Args:
        cache: the :class:`~pepeseg3d_ns.priors.cache.PriorCache` holding the masks.
        stems: image stems (training views) to measure.
        depth_fn: ``stem -> (depth [H, W], K [3, 3], valid [H, W] or None)``: z-depth of the reconstruction seen
            from that view (rendered expected depth), its pinhole intrinsics, and which pixels have depth.
            Masks are resized to the depth's resolution when they differ (nearest).
        source: what produced the depth, stored with the result.
    """
    from tqdm import tqdm

    sizes, digests = {}, {}
    for stem in tqdm(list(stems), desc="mask scales", unit="view", disable=not progress):
        depth, K, valid = depth_fn(stem)
        masks = cache.load_masks(stem)
        if masks.shape != tuple(depth.shape):
            masks = masks.resized(*depth.shape)
        dense = masks.to_torch(depth.device)
        sizes[stem] = mask_sizes(dense, depth.double(), K.double(), valid).cpu().numpy()
        digests[stem] = cache.entry(stem).get("masks_digest")
    all_sizes = np.concatenate([v for v in sizes.values()]) if sizes else np.zeros(0)
    source = {**dict(source or {}), "size_estimator": SIZE_ESTIMATOR}
    return SceneScales(sizes=sizes, scale_map=ScaleMap.fit(all_sizes), source=source, masks_digest=digests)


def save_scene_scales(cache, scene_scales: SceneScales) -> Path:
    """Write ``scales.json`` into the cache folder (atomically) and return its path."""
    import json
    import os

    path = Path(cache.cache_dir) / SCALES_FILE
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(scene_scales.to_json()))
    os.replace(tmp, path)
    return path


def load_scene_scales(cache) -> SceneScales:
    """Read ``scales.json`` of ``cache``; a clear error when it is missing or when the cache's masks changed
    since the scales were computed (then the sizes no longer line up with the masks)."""
    import json

    path = Path(cache.cache_dir) / SCALES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: compute mask scales from a trained pepe-recon run with\n"
            f"  pepeseg3d scales --load-config outputs/<scene>/pepe-recon/<timestamp>/config.yml"
        )
    scene = SceneScales.from_json(json.loads(path.read_text()))
    stale = [s for s, d in scene.masks_digest.items() if cache.manifest.get("images", {}).get(s, {}).get("masks_digest") != d]
    if stale:
        raise ValueError(
            f"{path} was computed for other masks than the cache now holds ({len(stale)} view(s), e.g. {stale[0]}); "
            "recompute it with `pepeseg3d scales --load-config ...`"
        )
    return scene


def rendered_depth_fn(pipeline, min_alpha: float = 0.5):
    """``depth_fn`` for :func:`compute_scene_scales` from a loaded nerfstudio pipeline (a pepe-recon run):
    renders each training view at full resolution; pixels with accumulated alpha below ``min_alpha`` are
    invalid. Camera conventions are the model's (nerfstudio OpenGL poses, pinhole K in pixels)."""
    dataset = pipeline.datamanager.train_dataset
    index = {Path(p).stem: i for i, p in enumerate(dataset.image_filenames)}
    cameras = dataset.cameras

    @torch.no_grad()
    def depth_fn(stem: str):
        i = index[stem]
        cam = cameras[i : i + 1].to(pipeline.device)
        out = pipeline.model.get_outputs_for_camera(cam)
        K = cam.get_intrinsics_matrices()[0].to(pipeline.device)
        return out["depth"][..., 0], K, out["accumulation"][..., 0] >= min_alpha

    return depth_fn
