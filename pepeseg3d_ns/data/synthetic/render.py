"""Synthetic scenes, rendering: procedural textures (value noise, fBm), ray casting of the primitives with sun
shading and shadows, the orbit cameras (OpenGL camera-to-world), pinhole intrinsics and :func:`render_view` (RGB
super-sampled 2x2, z-depth, part ids and surface points at pixel centres)."""

from __future__ import annotations

import math

import numpy as np

from pepeseg3d_ns.data.synthetic.scene import _EPS, _INF, FOV_DEG, Primitive, Scene, Texture

SUPERSAMPLE = 2  # RGB uses SUPERSAMPLE x SUPERSAMPLE rays per pixel; labels/depth use the centre ray


# --------------------------------------------------------------------------------------
# Procedural textures
# --------------------------------------------------------------------------------------

_LATTICE_OFFSET = np.array([0.2917, 0.5813, 0.1371])


_PERM = np.random.default_rng(20240611).permutation(256).astype(np.int64)
_PERM = np.concatenate([_PERM, _PERM])  # so (perm[a] + b) with a, b < 256 never overflows the table
_VALUES = np.random.default_rng(20240612).random(256)


def _value_noise(p: np.ndarray, salt: int) -> np.ndarray:
    """Trilinear value noise in [0, 1] of points p [N, 3] (unit lattice, period 256)."""
    fl = np.floor(p)
    f = p - fl
    w = f * f * (3.0 - 2.0 * f)
    i = fl.astype(np.int64) + np.array([salt * 7 + 13, salt * 3 + 5, salt * 11 + 1])
    ix, iy, iz = (i[:, 0] & 255), (i[:, 1] & 255), (i[:, 2] & 255)
    ix1, iy1, iz1 = (ix + 1) & 255, (iy + 1) & 255, (iz + 1) & 255
    hx = (_PERM[ix], _PERM[ix1])
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    out = 0.0
    for a, ha in enumerate(hx):
        la = 0.0
        for b_, yy in enumerate((iy, iy1)):
            hab = _PERM[ha + yy]
            v0 = _VALUES[_PERM[hab + iz]]
            v1 = _VALUES[_PERM[hab + iz1]]
            lz = v0 + (v1 - v0) * wz
            la = lz if b_ == 0 else la + (lz - la) * wy
        out = la if a == 0 else out + (la - out) * wx
    return out


def _fbm(p: np.ndarray, salt: int, octaves: int = 3) -> np.ndarray:
    total, amp, norm = np.zeros(p.shape[0]), 0.5, 0.0
    for o in range(octaves):
        total += amp * _value_noise(p * (2.0**o), salt + 7919 * o)
        norm += amp
        amp *= 0.5
    return total / norm


def _albedo(tex: Texture, q: np.ndarray, world: np.ndarray, salt: int, dome_center, dome_radius) -> np.ndarray:
    """Albedo [N, 3] for local points q (world points for ground/sky)."""
    c1, c2 = np.asarray(tex.c1, float), np.asarray(tex.c2, float)
    s = float(tex.scale)
    if tex.kind == "solid":
        pat = np.zeros(q.shape[0])
    elif tex.kind == "checker":
        cell = np.floor(q / s + _LATTICE_OFFSET).astype(np.int64)
        pat = (cell.sum(1) % 2).astype(np.float64)
    elif tex.kind == "stripes":
        pat = np.clip(0.5 + 1.5 * np.sin(2 * math.pi * q[:, tex.axis] / s), 0.0, 1.0)
    elif tex.kind == "noise":
        pat = np.clip((_fbm(q / s + _LATTICE_OFFSET, salt + 11) - 0.5) * 2.2 + 0.5, 0.0, 1.0)
    elif tex.kind == "ground":
        xy = world[:, :2]
        cell = np.floor(xy / s + _LATTICE_OFFSET[:2]).astype(np.int64)
        chk = (cell.sum(1) % 2).astype(np.float64)
        big = _fbm(np.c_[xy / (4 * s), np.zeros(len(xy))], salt + 3)
        # fade the checker far away (view-independent, limits aliasing at grazing angles)
        r = np.linalg.norm(xy - dome_center[:2], axis=1)
        fade = np.clip(1.0 - (r - 3.0) / 6.0, 0.0, 1.0)
        pat = np.clip(0.5 + (chk - 0.5) * fade + (big - 0.5) * 0.9, 0.0, 1.0)
    elif tex.kind == "sky":
        d = (world - dome_center) / dome_radius
        clouds = _fbm(d * 5.0 + 10.0, salt + 5, octaves=4)
        elev = np.clip(d[:, 2], 0.0, 1.0)
        sky = c1[None] * (1 - elev[:, None]) + c2[None] * elev[:, None]
        cl = np.clip((clouds - 0.45) * 3.0, 0.0, 1.0)[:, None]
        sky = sky * (1 - cl) + np.array([0.97, 0.97, 0.97]) * cl
        az = np.arctan2(d[:, 1], d[:, 0])
        ridge = 0.1 + 0.12 * _fbm(np.c_[np.cos(az) * 3, np.sin(az) * 3, np.zeros(len(az))], salt + 9)
        hill_n = _fbm(d * 25.0, salt + 17)
        hills = np.array([0.25, 0.38, 0.25])[None] * (0.6 + 0.8 * hill_n[:, None])
        is_hill = (d[:, 2] < ridge)[:, None]
        return np.clip(np.where(is_hill, hills, sky), 0.0, 1.0)
    else:  # pragma: no cover - layouts only use the kinds above
        raise ValueError(f"unknown texture kind {tex.kind!r}")
    col = c1[None] * (1.0 - pat[:, None]) + c2[None] * pat[:, None]
    if tex.noise > 0:
        n = _fbm(q / max(0.5 * s, 0.01) + 3.7, salt + 101, octaves=2)
        col = col * (1.0 + tex.noise * 2.0 * (n[:, None] - 0.5))
    return np.clip(col, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------


def _nearest_root(b, c, a=None):
    """Smallest root > eps of a t^2 + 2 b t + c = 0 (a defaults to 1), inf if none."""
    if a is None:
        disc = b * b - c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = -b - sq, -b + sq
    else:
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = (-b - sq) / a, (-b + sq) / a
    t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, _INF))
    return np.where(disc >= 0.0, t, _INF)


def _intersect(prim: Primitive, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray parameter of the nearest hit (> eps) for rays o + t d, d unit [N, 3]; o [3] or [N, 3]."""
    if prim.kind == "plane":
        dz = d[:, 2]
        oz = o[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -oz / dz
        return np.where((dz < 0) & (oz > 0) & (t > _EPS), t, _INF)
    if prim.kind == "dome":
        oc = o - prim.center
        b = d @ oc if oc.ndim == 1 else (d * oc).sum(1)
        c = (oc * oc).sum(-1) - prim.size[0] ** 2
        disc = b * b - c
        t = -b + np.sqrt(np.maximum(disc, 0.0))
        return np.where((disc >= 0) & (t > _EPS), t, _INF)
    ol = (o - prim.center) @ prim.rot
    dl = d @ prim.rot
    if ol.ndim == 1:
        ol = np.broadcast_to(ol, dl.shape)
    if prim.kind == "ellipsoid":
        inv = 1.0 / prim.size
        os_, ds = ol * inv, dl * inv
        a = (ds * ds).sum(1)
        return _nearest_root((os_ * ds).sum(1), (os_ * os_).sum(1) - 1.0, a)
    if prim.kind == "box":
        h = prim.size
        dls = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        inv = 1.0 / dls
        t1 = (-h - ol) * inv
        t2 = (h - ol) * inv
        tmin = np.minimum(t1, t2).max(1)
        tmax = np.maximum(t1, t2).min(1)
        t = np.where(tmin > _EPS, tmin, tmax)
        return np.where((tmax >= tmin) & (t > _EPS), t, _INF)
    if prim.kind == "cylinder":
        r, hh = prim.size[0], prim.size[2]
        a = dl[:, 0] ** 2 + dl[:, 1] ** 2
        b = ol[:, 0] * dl[:, 0] + ol[:, 1] * dl[:, 1]
        c = ol[:, 0] ** 2 + ol[:, 1] ** 2 - r * r
        a_safe = np.where(a < 1e-12, 1e-12, a)
        disc = b * b - a_safe * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(len(dl), _INF)
        for ts in ((-b - sq) / a_safe, (-b + sq) / a_safe):
            z = ol[:, 2] + ts * dl[:, 2]
            ok = (disc >= 0) & (a >= 1e-12) & (np.abs(z) <= hh) & (ts > _EPS)
            best = np.where(ok & (ts < best), ts, best)
        dz = np.where(np.abs(dl[:, 2]) < 1e-12, 1e-12, dl[:, 2])
        for zc in (-hh, hh):
            ts = (zc - ol[:, 2]) / dz
            x = ol[:, 0] + ts * dl[:, 0]
            y = ol[:, 1] + ts * dl[:, 1]
            ok = (x * x + y * y <= r * r) & (ts > _EPS)
            best = np.where(ok & (ts < best), ts, best)
        return best
    raise ValueError(prim.kind)


def _normal_local(prim: Primitive, q: np.ndarray) -> np.ndarray:
    if prim.kind == "ellipsoid":
        n = q / prim.size**2
    elif prim.kind == "box":
        rel = np.abs(q) / prim.size
        ax = rel.argmax(1)
        n = np.zeros_like(q)
        n[np.arange(len(q)), ax] = np.sign(q[np.arange(len(q)), ax])
    elif prim.kind == "cylinder":
        r, hh = prim.size[0], prim.size[2]
        rho = np.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2)
        side = np.abs(rho - r) < np.abs(np.abs(q[:, 2]) - hh)
        n = np.where(side[:, None], np.c_[q[:, 0], q[:, 1], np.zeros(len(q))],
                     np.c_[np.zeros(len(q)), np.zeros(len(q)), np.sign(q[:, 2])])
    else:
        n = np.tile([0.0, 0.0, 1.0], (len(q), 1))
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _cast(scene: Scene, o: np.ndarray, d: np.ndarray):
    """Nearest hit over all primitives: (t [N], primitive index [N])."""
    n = len(d)
    best_t = np.full(n, _INF)
    best_i = np.full(n, -1, dtype=np.int64)
    for k, prim in enumerate(scene.primitives):
        rb = prim.bound_radius()
        if np.isfinite(rb) and o.ndim == 1:
            # cheap bounding-sphere pre-test for rays sharing one origin
            oc = prim.center - o
            proj = d @ oc
            dist2 = oc @ oc - proj * proj
            cand = np.nonzero((dist2 <= rb * rb * 1.0001) & (proj > -rb))[0]
            if len(cand) == 0:
                continue
            t = _intersect(prim, o, d[cand])
            upd = t < best_t[cand]
            best_t[cand[upd]] = t[upd]
            best_i[cand[upd]] = k
        else:
            t = _intersect(prim, o, d)
            upd = t < best_t
            best_t[upd] = t[upd]
            best_i[upd] = k
    return best_t, best_i


def _shadowed(scene: Scene, p: np.ndarray) -> np.ndarray:
    """True where the directional light is blocked for surface points p [N, 3]."""
    L = scene.light_dir
    e1 = np.cross(L, [0.0, 0.0, 1.0] if abs(L[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(L, e1)
    pu, pv, along = p @ e1, p @ e2, p @ L
    out = np.zeros(len(p), dtype=bool)
    d1 = L[None, :]
    for prim in scene.primitives:
        rb = prim.bound_radius()
        if not np.isfinite(rb):
            continue
        du = pu - prim.center @ e1
        dv = pv - prim.center @ e2
        cand = np.nonzero((du * du + dv * dv <= rb * rb) & (along < prim.center @ L + rb))[0]
        if len(cand) == 0:
            continue
        t = _intersect(prim, p[cand], np.broadcast_to(d1, (len(cand), 3)))
        out[cand[np.isfinite(t)]] = True
    return out


def _shade(scene: Scene, o: np.ndarray, d: np.ndarray, t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    pts = o + t[:, None] * d
    rgb = np.zeros((len(d), 3))
    normals = np.zeros((len(d), 3))
    lit = np.zeros(len(d), dtype=bool)
    for k in np.unique(idx):
        sel = np.nonzero(idx == k)[0]
        prim = scene.primitives[k]
        pw = pts[sel]
        q = (pw - prim.center) @ prim.rot
        rgb[sel] = _albedo(prim.texture, q, pw, k * 131 + 7, scene.dome_center, scene.dome_radius)
        if scene.detail > 0:  # ~1.5 cm grain, the same in every view: features for COLMAP
            rgb[sel] *= (1.0 + scene.detail * (2.0 * _fbm(pw / 0.015, 4241, octaves=2) - 1.0))[:, None]
        if prim.kind != "dome":
            normals[sel] = _normal_local(prim, q) @ prim.rot.T
            lit[sel] = True
    li = np.nonzero(lit)[0]
    if len(li):
        n = normals[li]
        ndl = np.clip(n @ scene.light_dir, 0.0, 1.0)
        sh = _shadowed(scene, pts[li] + n * 2e-3)
        ndl = np.where(sh, 0.0, ndl)
        rgb[li] *= (scene.ambient + (1.0 - scene.ambient) * ndl)[:, None]
    return rgb


# --------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """4x4 camera-to-world (OpenGL: camera looks along -z, +y up, +x right)."""
    eye = np.asarray(eye, float)
    fwd = np.asarray(target, float) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, float))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, fwd)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -fwd, eye
    return c2w


def camera_poses(scene: Scene, n_views: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 4, 4] c2w on a three-band spiral (elevations ~22/35/48 deg) around the target."""
    bands = np.radians([22.0, 35.0, 48.0])
    poses = []
    step = 2 * math.pi / max(n_views, 1)
    for i in range(n_views):
        elev = bands[i % 3] + math.radians(rng.uniform(-2.0, 2.0))
        az = i * step + rng.uniform(-0.25, 0.25) * step + 0.3
        dist = scene.cam_distance * rng.uniform(0.95, 1.05)
        ray = np.array([math.cos(elev) * math.cos(az), math.cos(elev) * math.sin(az), math.sin(elev)])
        eye = scene.target + dist * ray
        poses.append(look_at(eye, scene.target))
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


def intrinsics(resolution: int, fov_deg: float = FOV_DEG) -> tuple[float, float, float, float]:
    f = (resolution / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return f, f, resolution / 2.0, resolution / 2.0


def _pixel_rays(c2w: np.ndarray, res: int, ss: int):
    """Unit world ray directions [res*ss, res*ss, 3] through sub-pixel centres, and z-per-t factor."""
    fx, fy, cx, cy = intrinsics(res)
    offs = (np.arange(res * ss) + 0.5) / ss
    u, v = np.meshgrid(offs, offs)
    dc = np.stack([(u - cx) / fx, -(v - cy) / fy, -np.ones_like(u)], axis=-1)
    norm = np.linalg.norm(dc, axis=-1)
    dw = (dc / norm[..., None]) @ c2w[:3, :3].T
    return dw, 1.0 / norm  # z-depth = t * (1 / |d_cam|)


def render_view(scene: Scene, c2w: np.ndarray, res: int, ss: int = SUPERSAMPLE) -> dict[str, np.ndarray]:
    """Render one view. Returns rgb [H,W,3] uint8, depth [H,W] f32 z-depth, part [H,W] int32,
    points [H,W,3] float (world hit point of each pixel-centre ray)."""
    o = c2w[:3, 3].copy()
    d, zf = _pixel_rays(c2w, res, 1)
    d, zf = d.reshape(-1, 3), zf.reshape(-1)
    t, idx = _cast(scene, o, d)
    assert np.all(idx >= 0), "every ray must hit the dome"
    part_of_prim = np.array([p.part for p in scene.primitives], dtype=np.int32)
    part = part_of_prim[idx].reshape(res, res)
    depth = (t * zf).reshape(res, res).astype(np.float32)
    points = (o + t[:, None] * d).reshape(res, res, 3)
    if ss <= 1:
        rgb = _shade(scene, o, d, t, idx).reshape(res, res, 3)
    else:
        ds, _ = _pixel_rays(c2w, res, ss)
        ds = ds.reshape(-1, 3)
        ts, idxs = _cast(scene, o, ds)
        rgbs = _shade(scene, o, ds, ts, idxs).reshape(res, ss, res, ss, 3)
        rgb = rgbs.mean(axis=(1, 3))
    rgb8 = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return {"rgb": rgb8, "depth": depth, "part": part, "points": points}
