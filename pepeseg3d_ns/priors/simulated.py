"""Simulated perception priors for the synthetic scenes (``pepeseg3d synth``): SAM-like masks and DA-like depth.

These are derived from the scene's ground truth and deliberately degraded, so that the whole pipeline can be
run and tested without SAM / Depth-Anything weights.  A cache built from them is labelled
``"kind": "simulated"`` in its manifest; results obtained with it say nothing about real SAM masks.

* :class:`SimulatedSamSource`: candidate masks are the visible instances of all three GT levels (parts, objects,
  groups) plus the background split into ground and sky, as SAM's "everything" mode segments every granularity.
  With ``severity > 0`` they are made imperfect, per view: some entities are dropped, granularity varies (two
  parts of an object merged, an object's part level or object level omitted, a group omitted), background regions
  are split into chunks, boundaries are jittered by 1-2 px along random stretches, a few spurious masks (blobs,
  fragments of an entity, wrong merges of two objects) are added, and masks below a minimum area are dropped.
  ``severity = 0`` gives exactly the GT instances (identical masks of two levels kept once) and the two
  background regions.
* :class:`SimulatedDepthSource`: GT inverse depth ``1/z`` under a per-view random affine map (scale in
  ``[0.5, 2]``, shift in ``[0, 0.5] * median``) times smooth low-frequency multiplicative noise (±5 % at
  severity 1), i.e. "relative inverse depth" like Depth-Anything.

Both are deterministic functions of ``(seed, severity, image stem)`` (the per-view generator is seeded from a
sha256 of the stem, never Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pepeseg3d_ns.data.synthetic import LEVELS, load_gt_depth, load_gt_masks, load_hierarchy

__all__ = ["SimulatedSamSource", "SimulatedDepthSource", "is_synthetic_scene", "stem_rng"]

_ALGO_VERSION = 1


def is_synthetic_scene(data_dir: Union[str, Path]) -> bool:
    """True when ``transforms.json`` of ``data_dir`` carries the ``pepe_synthetic`` block of ``pepeseg3d synth``."""
    tf = Path(data_dir) / "transforms.json"
    try:
        return isinstance(json.loads(tf.read_text()).get("pepe_synthetic"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def stem_rng(seed: int, stem: str, stream: int) -> np.random.Generator:
    """Generator seeded from ``seed``, a sha256 of ``stem`` and a stream id (stable across processes)."""
    h = int.from_bytes(hashlib.sha256(Path(stem).stem.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h & 0xFFFFFFFF, h >> 32, int(stream)])


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int = 4) -> np.ndarray:
    """[H, W] float64 in [-1, 1]: a ``(cells+1)^2`` grid of uniform values, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    y = (np.arange(height) + 0.5) / height * cells
    x = (np.arange(width) + 0.5) / width * cells
    y0 = np.minimum(np.floor(y).astype(int), cells - 1)
    x0 = np.minimum(np.floor(x).astype(int), cells - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx)


def resample_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """``arr [H0, W0]`` sampled at the pixel centres of an ``height x width`` grid (nearest): the ground truth of
    a view at the size of the image the model trains on (e.g. with --camera-res-scale-factor)."""
    h0, w0 = arr.shape[:2]
    if (h0, w0) == (height, width):
        return arr
    rows = np.minimum(((np.arange(height) + 0.5) * h0 / height).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w0 / width).astype(np.int64), w0 - 1)
    return arr[rows][:, cols]


def _shift_stack(m: np.ndarray, fill: bool) -> np.ndarray:
    """[9, H, W] the 3x3 neighbourhood of every pixel (border padded with ``fill``)."""
    h, w = m.shape
    p = np.pad(m, 1, constant_values=fill)
    return np.stack([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def _dilate(m: np.ndarray) -> np.ndarray:
    return _shift_stack(m, False).any(axis=0)


def _erode(m: np.ndarray) -> np.ndarray:
    return _shift_stack(m, True).all(axis=0)


class _Cand:
    __slots__ = ("mask", "label", "spurious", "jittered")

    def __init__(self, mask: np.ndarray, label: str, spurious: bool = False):
        self.mask = mask
        self.label = label
        self.spurious = spurious
        self.jittered = False


class SimulatedSamSource:
    """SAM-like automatic masks simulated from a synthetic scene's ground truth (see the module docstring).

    Args:
        scene_dir: folder written by ``pepeseg3d synth`` (``gt/{parts,objects,groups}``, ``gt/depth``, ...).
        severity: 0 = perfect GT instances; 1 = typical SAM imperfections; larger = worse (probabilities capped).
        seed: base seed; the per-view randomness is seeded from ``(seed, sha256(stem))``.
        min_area_frac: with ``severity > 0``, masks smaller than this fraction of the image (at least 2 px) are
            dropped, like SAM's ``min_mask_region_area``.
        background: also emit background regions (ground and sky), as SAM does.
    """

    name = "simulated"

    def __init__(self, scene_dir: Union[str, Path], severity: float = 1.0, seed: int = 0,
                 min_area_frac: float = 1e-3, background: bool = True):
        if severity < 0:
            raise ValueError(f"severity must be >= 0, got {severity}")
        self.scene_dir = Path(scene_dir)
        self.severity = float(severity)
        self.seed = int(seed)
        self.min_area_frac = float(min_area_frac)
        self.background = bool(background)
        if not (self.scene_dir / "gt" / "hierarchy.json").is_file():
            raise FileNotFoundError(
                f"{self.scene_dir} has no gt/hierarchy.json: simulated priors need a scene made by `pepeseg3d synth`"
            )
        self._hier = load_hierarchy(self.scene_dir)
        self._part_parent = {int(r["id"]): int(r["parent"]) for r in self._hier["parts"] if r["id"]}
        self._obj_parent = {int(r["id"]): int(r["parent"]) for r in self._hier["objects"] if r["id"]}
        self._cams = self._read_cameras()

    def signature(self) -> dict:
        return {"class": type(self).__name__, "simulated": True, "algo_version": _ALGO_VERSION,
                "severity": self.severity, "seed": self.seed, "min_area_frac": self.min_area_frac,
                "background": self.background}

    # ------------------------------------------------------------------ scene helpers
    def _read_cameras(self) -> Optional[dict]:
        try:
            tf = json.loads((self.scene_dir / "transforms.json").read_text())
            k = (float(tf["fl_x"]), float(tf["fl_y"]), float(tf["cx"]), float(tf["cy"]), int(tf["h"]), int(tf["w"]))
            poses = {Path(fr["file_path"]).stem: np.asarray(fr["transform_matrix"], float) for fr in tf["frames"]}
            return {"K": k, "poses": poses}
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def _background_regions(self, stem: str, bg: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Ground (world z ~ 0) and sky (the dome) parts of the background; one region if the split fails."""
        if not bg.any():
            return []
        cams = self._cams
        if cams is None or stem not in cams["poses"]:
            return [("background", bg)]
        fx, fy, cx, cy, h0, w0 = cams["K"]
        z = resample_nearest(load_gt_depth(self.scene_dir, stem).astype(np.float64), *bg.shape)
        h, w = z.shape
        if (h, w) != (h0, w0):
            sx, sy = w / w0, h / h0
            fx, cx, fy, cy = fx * sx, cx * sx, fy * sy, cy * sy
        u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        pc = np.stack([z * (u - cx) / fx, -z * (v - cy) / fy, -z], axis=-1)
        c2w = cams["poses"][stem]
        zw = pc @ c2w[2, :3] + c2w[2, 3]
        ground = bg & (np.abs(zw) <= 2e-3 * np.maximum(z, 1.0))
        sky = bg & ~ground
        out = [("background:ground", ground), ("background:sky", sky)]
        return [(n, m) for n, m in out if m.any()]

    # ------------------------------------------------------------------ main
    def __call__(self, image: np.ndarray, stem: str) -> dict:
        stem = Path(stem).stem
        maps = {lvl: load_gt_masks(self.scene_dir, stem, lvl) for lvl in LEVELS}
        if image is not None:  # the image the model trains on may be rescaled: simulate at its size
            maps = {lvl: resample_nearest(m, *image.shape[:2]) for lvl, m in maps.items()}
        h, w = maps["parts"].shape
        s = self.severity
        rng = stem_rng(self.seed, stem, 0)

        ids = {lvl: [int(i) for i in np.unique(maps[lvl]) if i != 0] for lvl in LEVELS}
        inst = {lvl: {i: maps[lvl] == i for i in ids[lvl]} for lvl in LEVELS}
        bg = maps["groups"] == 0
        bg_regions = self._background_regions(stem, bg) if self.background else []

        if s <= 0:
            cands = [_Cand(inst[lvl][i], f"{lvl}:{i}") for lvl in LEVELS for i in ids[lvl]]
            cands += [_Cand(m, n) for n, m in bg_regions]
            return self._finish(cands, rng, h, w, min_area=1)

        p = lambda x: min(0.95, x * s)  # noqa: E731  probability scaled by severity
        cands: list[_Cand] = []
        # --- granularity, per object: omit its part level or its object level; merge two of its parts
        for o in ids["objects"]:
            parts = [q for q in ids["parts"] if self._part_parent.get(q) == o]
            u = rng.random(4)
            omit_parts = len(parts) >= 2 and u[0] < p(0.10)
            omit_object = (not omit_parts) and u[1] < p(0.10)
            if not omit_parts:
                part_masks = [(f"parts:{q}", inst["parts"][q]) for q in parts]
                if len(parts) >= 2 and u[2] < p(0.25):
                    a, b = self._adjacent_pair(parts, inst["parts"], rng)
                    merged = inst["parts"][a] | inst["parts"][b]
                    part_masks = [(n, m) for n, m in part_masks if n not in (f"parts:{a}", f"parts:{b}")]
                    part_masks.append((f"merge:parts:{a}+{b}", merged))
                cands += [_Cand(m, n) for n, m in part_masks]
            if not omit_object:
                cands.append(_Cand(inst["objects"][o], f"objects:{o}"))
        # parts whose object is not in the object map (cannot happen with consistent GT, kept for safety)
        known = {q for q in ids["parts"] if self._part_parent.get(q) in set(ids["objects"])}
        cands += [_Cand(inst["parts"][q], f"parts:{q}") for q in ids["parts"] if q not in known]
        # --- groups: sometimes omitted when they hold several visible objects
        for g in ids["groups"]:
            n_obj = sum(1 for o in ids["objects"] if self._obj_parent.get(o) == g)
            if not (n_obj >= 2 and rng.random() < p(0.15)):
                cands.append(_Cand(inst["groups"][g], f"groups:{g}"))
        # --- background: ground sometimes split into chunks (SAM often cuts large regions)
        for name, m in bg_regions:
            if name.endswith("ground") and rng.random() < p(0.5):
                k = int(rng.integers(2, 4))
                for j, chunk in enumerate(self._split_chunks(m, k, rng)):
                    cands.append(_Cand(chunk, f"{name}#{j}"))
                if rng.random() < 0.5:
                    cands.append(_Cand(m, name))
            else:
                cands.append(_Cand(m, name))
        # --- drop entities
        keep = rng.random(len(cands)) >= p(0.15)
        cands = [c for c, k in zip(cands, keep) if k]
        # --- boundary jitter: grow / shrink by 1-2 px along random smooth stretches of the boundary
        for c in cands:
            if rng.random() < p(0.8):
                c.mask = self._jitter(c.mask, rng)
                c.jittered = True
        # --- spurious masks
        n_spur = int(rng.binomial(3, min(1.0, 0.4 * s)))
        for j in range(n_spur):
            c = self._spurious(rng, h, w, inst, j)
            if c is not None:
                cands.append(c)
        min_area = max(2, int(math.ceil(self.min_area_frac * h * w)))
        return self._finish(cands, rng, h, w, min_area=min_area, shuffle=True)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _adjacent_pair(parts: list[int], inst: dict, rng: np.random.Generator) -> tuple[int, int]:
        """Two parts of one object, preferring a pair that touches."""
        dil = {q: _dilate(inst[q]) for q in parts}
        pairs = [(a, b) for i, a in enumerate(parts) for b in parts[i + 1:] if (dil[a] & inst[b]).any()]
        if not pairs:
            pairs = [(a, b) for i, a in enumerate(parts) for b in parts[i + 1:]]
        return pairs[int(rng.integers(len(pairs)))]

    @staticmethod
    def _split_chunks(m: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Voronoi split of a region into ``k`` chunks around random seed pixels of the region."""
        ys, xs = np.nonzero(m)
        if len(ys) < k:
            return [m]
        sel = rng.choice(len(ys), size=k, replace=False)
        h, w = m.shape
        yy, xx = np.mgrid[0:h, 0:w]
        d = np.stack([(yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 for i in sel])
        lab = d.argmin(axis=0)
        return [m & (lab == j) for j in range(k) if (m & (lab == j)).any()]

    @staticmethod
    def _jitter(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = m.shape
        field = smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)))
        grow, shrink = field > 0.35, field < -0.35
        out = m
        for _ in range(int(rng.integers(1, 3))):
            out = np.where(grow, _dilate(out), np.where(shrink, _erode(out), out))
        return out

    def _spurious(self, rng: np.random.Generator, h: int, w: int, inst: dict, j: int) -> Optional[_Cand]:
        kind = rng.choice(3, p=[0.4, 0.4, 0.2])
        if kind == 1:  # fragment: a piece of a part or object cut by a random line through its centroid
            pool = [(lvl, i, m) for lvl in ("parts", "objects") for i, m in inst[lvl].items() if m.sum() >= 12]
            if pool:
                lvl, i, m = pool[int(rng.integers(len(pool)))]
                ys, xs = np.nonzero(m)
                ang = rng.uniform(0, 2 * math.pi)
                yy, xx = np.mgrid[0:h, 0:w]
                side = (xx - xs.mean()) * math.cos(ang) + (yy - ys.mean()) * math.sin(ang)
                frag = m & (side > rng.uniform(-0.3, 0.3) * math.sqrt(m.sum()))
                if frag.any() and not np.array_equal(frag, m):
                    return _Cand(frag, f"spurious:fragment:{lvl}:{i}", spurious=True)
        if kind == 2:  # wrong merge: two objects of different groups that touch (or any two)
            objs = list(inst["objects"])
            if len(objs) >= 2:
                a, b = rng.choice(len(objs), size=2, replace=False)
                return _Cand(inst["objects"][objs[a]] | inst["objects"][objs[b]],
                             f"spurious:merge:objects:{objs[a]}+{objs[b]}", spurious=True)
        # blob: noisy ellipse somewhere in the image
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.04, 0.15) * h, rng.uniform(0.04, 0.15) * w
        yy, xx = np.mgrid[0:h, 0:w]
        r = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2
        blob = r < 1.0 + 0.5 * smooth_noise(rng, h, w, cells=5)
        return _Cand(blob, f"spurious:blob:{j}", spurious=True) if blob.any() else None

    def _finish(self, cands: list[_Cand], rng: np.random.Generator, h: int, w: int, min_area: int,
                shuffle: bool = False) -> dict:
        s = self.severity
        masks, scores, stab, labels = [], [], [], []
        index: dict[bytes, int] = {}
        for c in cands:
            m = np.asarray(c.mask, bool)
            area = int(m.sum())
            if area < min_area:
                continue
            key = np.packbits(m).tobytes()
            if key in index:  # identical mask at two levels: kept once, labels joined
                labels[index[key]] += "|" + c.label
                continue
            index[key] = len(masks)
            masks.append(m)
            labels.append(c.label)
            if s <= 0:
                scores.append(1.0)
                stab.append(1.0)
            elif c.spurious:
                scores.append(rng.uniform(0.55, 0.85))
                stab.append(rng.uniform(0.6, 0.9))
            else:
                q = rng.uniform(0.0, 0.06) * s + (rng.uniform(0.0, 0.05) * s if c.jittered else 0.0)
                scores.append(1.0 - q)
                stab.append(1.0 - q * rng.uniform(0.5, 1.5))
        order = np.arange(len(masks))
        if shuffle and len(masks):
            order = rng.permutation(len(masks))
        out_masks = np.stack([masks[i] for i in order]) if masks else np.zeros((0, h, w), bool)
        return {
            "masks": out_masks,
            "scores": np.clip(np.asarray([scores[i] for i in order], np.float32), 0.0, 1.0),
            "stability": np.clip(np.asarray([stab[i] for i in order], np.float32), 0.0, 1.0),
            "labels": [labels[i] for i in order],
        }


class SimulatedDepthSource:
    """Depth-Anything-like relative inverse depth simulated from a synthetic scene's GT z-depth.

    ``out = (a / z + b) * (1 + 0.05 * severity * n(x, y))`` with per-view ``a`` log-uniform in ``[0.5, 2]``,
    ``b`` uniform in ``[0, 0.5] * median(1/z)`` (both ranges scaled down for ``severity < 1``) and ``n`` a smooth
    random field in ``[-1, 1]``.  ``severity = 0`` returns ``1/z`` exactly.
    """

    name = "simulated"

    def __init__(self, scene_dir: Union[str, Path], severity: float = 1.0, seed: int = 0, noise: float = 0.05):
        if severity < 0:
            raise ValueError(f"severity must be >= 0, got {severity}")
        self.scene_dir = Path(scene_dir)
        self.severity = float(severity)
        self.seed = int(seed)
        self.noise = float(noise)
        if not (self.scene_dir / "gt" / "depth").is_dir():
            raise FileNotFoundError(
                f"{self.scene_dir} has no gt/depth/: simulated priors need a scene made by `pepeseg3d synth`"
            )

    def signature(self) -> dict:
        return {"class": type(self).__name__, "simulated": True, "algo_version": _ALGO_VERSION,
                "severity": self.severity, "seed": self.seed, "noise": self.noise}

    def affine(self, stem: str) -> tuple[float, float]:
        """The per-view ``(scale, shift / median(1/z))`` used for ``stem``."""
        rng = stem_rng(self.seed, stem, 1)
        t = min(1.0, self.severity)
        scale = math.exp(rng.uniform(-1.0, 1.0) * math.log(2.0) * t)
        shift_frac = rng.uniform(0.0, 0.5) * t
        return scale, shift_frac

    def __call__(self, image: np.ndarray, stem: str) -> np.ndarray:
        stem = Path(stem).stem
        z = load_gt_depth(self.scene_dir, stem).astype(np.float64)
        if image is not None:
            z = resample_nearest(z, *image.shape[:2])
        h, w = z.shape
        inv = 1.0 / np.maximum(z, 1e-6)
        if self.severity <= 0:
            return inv.astype(np.float32)
        scale, shift_frac = self.affine(stem)
        rng = stem_rng(self.seed, stem, 2)
        field = smooth_noise(rng, h, w, cells=4)
        mult = np.maximum(1.0 + self.noise * self.severity * field, 0.1)
        out = (scale * inv + shift_frac * float(np.median(inv))) * mult
        return out.astype(np.float32)
