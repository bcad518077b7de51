"""Procedural synthetic scenes with three-level ground-truth segmentation.

The generator ray-casts analytic primitives (ellipsoids/spheres, yawed or tilted
boxes, capped cylinders, a ground plane and an inward-facing sky dome) in numpy and
writes a nerfstudio dataset together with ground truth at three hierarchy levels,
``parts`` ⊂ ``objects`` ⊂ ``groups``.  Everything is deterministic: a fixed
``(scene, seed, n_views, resolution, n_init_points, point_noise)`` produces
byte-identical files.

Conventions
-----------
* World frame: right-handed, metres, **+z up**; the ground is the plane ``z = 0``.
* Cameras (``transform_matrix`` in ``transforms.json``) are 4x4 **camera-to-world**
  matrices in the **OpenGL / nerfstudio convention**: the camera looks down its own
  ``-z`` axis, ``+y`` is up in the image and ``+x`` is right.  Columns 0..2 of the
  rotation are the camera's x/y/z axes in world coordinates, column 3 its centre.
* Intrinsics: pinhole, square pixels, ``fl_x = fl_y = (W / 2) / tan(fov / 2)``,
  ``cx = cy = W / 2``; the centre of pixel ``(u, v)`` (column, row) is at image
  coordinates ``(u + 0.5, v + 0.5)``.  A pixel back-projects to the camera-frame
  point ``z * ((u + 0.5 - cx) / fx, -(v + 0.5 - cy) / fy, -1)`` for z-depth ``z``.
* Depth is **z-depth** (distance along the optical axis, not ray length).
  ``depth/frame_XXXXX.png`` holds it as uint16 millimetres (nerfstudio's
  ``depth_unit_scale_factor = 1e-3``); ``gt/depth/frame_XXXXX.npy`` as float32 metres.
* Instance ids are unique per level, ``0`` is background (ground plane and dome) at
  every level.  ``gt/hierarchy.json`` lists the entities of each level, including
  the background entry ``{"id": 0, "name": "background", "parent": 0}`` (``parent``
  of groups is ``null``), so ``parent`` can be used directly as a lookup table.

Output layout (``output_dir``)::

    transforms.json               written last (atomic rename)
    sparse_pc.ply                 SfM-like initial points (binary, xyz float + rgb uint8)
    images/frame_XXXXX.png        RGB uint8 (2x2 super-sampled)
    depth/frame_XXXXX.png         uint16 z-depth in mm
    gt/depth/frame_XXXXX.npy      float32 z-depth in m
    gt/{parts,objects,groups}/frame_XXXXX.png   uint16 instance ids (pixel centres)
    gt/hierarchy.json
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

__all__ = [
    "SCENES",
    "LEVELS",
    "Scene",
    "SynthConfig",
    "generate_scene",
    "load_gt_masks",
    "load_gt_depth",
    "load_hierarchy",
    "render_view",
    "look_at",
    "camera_poses",
    "build_scene",
    "intrinsics",
    "entity_widths",
]

LEVELS = ("parts", "objects", "groups")
FORMAT_VERSION = 1
FOV_DEG = 50.0
SUPERSAMPLE = 2  # RGB uses SUPERSAMPLE x SUPERSAMPLE rays per pixel; labels/depth use the centre ray
DOME_SCALE = 8.0  # dome radius = DOME_SCALE * foreground size
_EPS = 1e-4
_INF = np.inf


# --------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------


@dataclass
class Texture:
    """Procedural albedo evaluated in the primitive's local frame (metres)."""

    kind: str = "solid"  # solid | checker | stripes | noise | ground | sky
    c1: tuple = (0.7, 0.7, 0.7)
    c2: tuple = (0.3, 0.3, 0.3)
    scale: float = 0.1  # checker cell / stripe period / noise feature size, metres
    noise: float = 0.25  # relative brightness modulation by value noise (every kind)
    axis: int = 2  # stripe axis (local)


@dataclass
class Primitive:
    kind: str  # ellipsoid | box | cylinder | plane | dome
    center: np.ndarray  # (3,)
    rot: np.ndarray  # (3, 3) local -> world rotation
    size: np.ndarray  # ellipsoid semi-axes | box half extents | cylinder (r, r, half height)
    part: int  # part id (0 = background)
    texture: Texture

    def bound_radius(self) -> float:
        if self.kind == "ellipsoid":
            return float(np.max(self.size))
        if self.kind == "box":
            return float(np.linalg.norm(self.size))
        if self.kind == "cylinder":
            return float(math.hypot(self.size[0], self.size[2]))
        return _INF

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "ellipsoid":
            half = np.sqrt(((self.rot * self.size[None, :]) ** 2).sum(1))
        else:
            half = np.abs(self.rot) @ self.size
        return self.center - half, self.center + half


@dataclass
class Entity:
    id: int
    name: str
    parent: int | None


@dataclass
class Scene:
    name: str
    primitives: list[Primitive]
    parts: list[Entity]  # parent = object id
    objects: list[Entity]  # parent = group id
    groups: list[Entity]  # parent = None
    light_dir: np.ndarray  # unit vector pointing *towards* the light
    target: np.ndarray  # camera look-at point
    cam_distance: float  # camera distance from target (metres)
    dome_center: np.ndarray
    dome_radius: float
    ambient: float = 0.38
    detail: float = 0.0  # contrast of a fine world-space texture on every surface (0 = none; for SfM tests)


class SceneBuilder:
    """Small helper to declare the part/object/group hierarchy and the primitives."""

    def __init__(self, name: str, rng: np.random.Generator):
        self.name = name
        self.rng = rng
        self.prims: list[Primitive] = []
        self.parts: list[Entity] = []
        self.objects: list[Entity] = []
        self.groups: list[Entity] = []

    # hierarchy ---------------------------------------------------------------
    def group(self, name: str) -> int:
        gid = len(self.groups) + 1
        self.groups.append(Entity(gid, name, None))
        return gid

    def object(self, name: str, group: int) -> int:
        oid = len(self.objects) + 1
        self.objects.append(Entity(oid, name, group))
        return oid

    def part(self, name: str, obj: int) -> int:
        pid = len(self.parts) + 1
        self.parts.append(Entity(pid, f"{self.objects[obj - 1].name}/{name}", obj))
        return pid

    # primitives --------------------------------------------------------------
    def ellipsoid(self, part, center, axes, tex, rot=None):
        axes = np.broadcast_to(np.asarray(axes, float), (3,)).copy()
        self._add("ellipsoid", part, center, axes, tex, rot)

    def sphere(self, part, center, r, tex):
        self.ellipsoid(part, center, (r, r, r), tex)

    def box(self, part, center, half, tex, yaw=0.0, rot=None):
        self._add("box", part, center, np.asarray(half, float), tex, rot if rot is not None else rot_z(yaw))

    def cylinder(self, part, center, r, half_h, tex, rot=None):
        self._add("cylinder", part, center, np.array([r, r, half_h], float), tex, rot)

    def _add(self, kind, part, center, size, tex, rot):
        rot = np.eye(3) if rot is None else np.asarray(rot, float)
        self.prims.append(Primitive(kind, np.asarray(center, float), rot, size, part, tex))

    # jitter helpers ----------------------------------------------------------
    def jit(self, scale: float, n: int = 2) -> np.ndarray:
        """Uniform jitter in [-scale, scale] for x, y (z = 0)."""
        v = np.zeros(3)
        v[:n] = self.rng.uniform(-scale, scale, n)
        return v

    def col(self, rgb, amount: float = 0.06) -> tuple:
        c = np.clip(np.asarray(rgb, float) + self.rng.uniform(-amount, amount, 3), 0.0, 1.0)
        return tuple(float(x) for x in c)

    def build(self, ground_tex: Texture, sky_tex: Texture, light_dir, cam_dist_factor=1.0,
              target_height=0.4) -> Scene:
        lo = np.min([p.aabb()[0] for p in self.prims], axis=0)
        hi = np.max([p.aabb()[1] for p in self.prims], axis=0)
        size = float(np.max(hi - lo))
        centre = 0.5 * (lo + hi)
        target = np.array([centre[0], centre[1], target_height * hi[2]])
        # Bounding radius of the foreground as seen from the target.
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        rad = float(np.max(np.linalg.norm(corners - target, axis=1)))
        cam_dist = cam_dist_factor * rad / math.tan(math.radians(FOV_DEG) / 2)
        dome_c = np.array([centre[0], centre[1], 0.0])
        dome_r = DOME_SCALE * size
        bg = [
            Primitive("plane", np.zeros(3), np.eye(3), np.zeros(3), 0, ground_tex),
            Primitive("dome", dome_c, np.eye(3), np.array([dome_r] * 3), 0, sky_tex),
        ]
        ld = np.asarray(light_dir, float)
        return Scene(
            name=self.name,
            primitives=self.prims + bg,
            parts=self.parts,
            objects=self.objects,
            groups=self.groups,
            light_dir=ld / np.linalg.norm(ld),
            target=target,
            cam_distance=cam_dist,
            dome_center=dome_c,
            dome_radius=dome_r,
        )


def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_axis_to(direction) -> np.ndarray:
    """Rotation whose local +z axis maps to ``direction`` (for tilted cylinders)."""
    z = np.asarray(direction, float)
    z = z / np.linalg.norm(z)
    helper = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def _to_world(origin, yaw, local) -> np.ndarray:
    return np.asarray(origin, float) + rot_z(yaw) @ np.asarray(local, float)


# --------------------------------------------------------------------------------------
# Scene layouts
# --------------------------------------------------------------------------------------

_SKY = Texture("sky", (0.62, 0.76, 0.93), (0.25, 0.45, 0.80), scale=1.0, noise=0.0)


def _tabletop(rng: np.random.Generator) -> Scene:
    b = SceneBuilder("tabletop", rng)

    # --- table -------------------------------------------------------------------
    g_table = b.group("table")
    o_table = b.object("table", g_table)
    top_h = 0.72
    tx, ty, tt = 0.55, 0.38, 0.02  # half extents of the top
    t0 = b.jit(0.02)
    wood = Texture("stripes", b.col((0.62, 0.40, 0.22)), b.col((0.40, 0.24, 0.12)), scale=0.07, noise=0.3, axis=0)
    p = b.part("top", o_table)
    b.box(p, t0 + [0, 0, top_h - tt], (tx, ty, tt), wood)
    leg_tex = Texture("noise", b.col((0.35, 0.22, 0.12)), b.col((0.55, 0.35, 0.2)), scale=0.05, noise=0.2)
    for name, sx, sy in (("leg_fl", 1, -1), ("leg_fr", 1, 1), ("leg_bl", -1, -1), ("leg_br", -1, 1)):
        p = b.part(name, o_table)
        lh = (top_h - 2 * tt) / 2
        b.box(p, t0 + [sx * (tx - 0.05), sy * (ty - 0.05), lh], (0.025, 0.025, lh), leg_tex)
    z_top = top_h

    # --- place setting -----------------------------------------------------------
    g_place = b.group("place_setting")
    # plate
    o_plate = b.object("plate", g_place)
    plate_c = t0 + [-0.27, 0.08, 0.0] + b.jit(0.02)
    p = b.part("plate", o_plate)
    b.cylinder(p, plate_c + [0, 0, z_top + 0.009], 0.13, 0.009,
               Texture("checker", b.col((0.95, 0.93, 0.88)), b.col((0.25, 0.45, 0.75)), scale=0.045, noise=0.1))
    # mug
    o_mug = b.object("mug", g_place)
    mug_c = t0 + [-0.05, 0.22, 0.0] + b.jit(0.02)
    mug_r, mug_hh = 0.055, 0.065
    p_body = b.part("body", o_mug)
    b.cylinder(p_body, mug_c + [0, 0, z_top + mug_hh], mug_r, mug_hh,
               Texture("stripes", b.col((0.85, 0.15, 0.12)), b.col((0.98, 0.90, 0.75)), scale=0.04, noise=0.15, axis=2))
    p_handle = b.part("handle", o_mug)
    yaw = rng.uniform(-0.6, 0.6) - 0.5
    handle_tex = Texture("noise", b.col((0.95, 0.85, 0.2)), b.col((0.75, 0.55, 0.1)), scale=0.02, noise=0.2)
    ring_r = 0.035
    for ang in np.linspace(-math.pi / 2, math.pi / 2, 9):
        local = [mug_r + ring_r * 0.55 * math.cos(ang) + 0.005, 0.0, mug_hh + ring_r * math.sin(ang)]
        b.sphere(p_handle, _to_world(mug_c + [0, 0, z_top], yaw, local), 0.011, handle_tex)
    # spoon
    o_spoon = b.object("spoon", g_place)
    sp_c = t0 + [-0.27, -0.14, 0.0] + b.jit(0.015)
    sp_yaw = rng.uniform(-0.3, 0.3)
    metal = Texture("noise", b.col((0.78, 0.78, 0.82)), b.col((0.45, 0.45, 0.5)), scale=0.015, noise=0.25)
    p = b.part("bowl", o_spoon)
    b.ellipsoid(p, _to_world(sp_c + [0, 0, z_top + 0.009], sp_yaw, [-0.07, 0, 0]), (0.035, 0.024, 0.009), metal,
                rot=rot_z(sp_yaw))
    p = b.part("handle", o_spoon)
    b.box(p, _to_world(sp_c + [0, 0, z_top + 0.004], sp_yaw, [0.045, 0, 0]), (0.085, 0.011, 0.004), metal, yaw=sp_yaw)

    # --- fruit ---------------------------------------------------------------------
    g_fruit = b.group("fruit_tray")
    o_tray = b.object("tray", g_fruit)
    tray_c = t0 + [0.24, -0.02, 0.0] + b.jit(0.02)
    p = b.part("tray", o_tray)
    b.cylinder(p, tray_c + [0, 0, z_top + 0.012], 0.17, 0.012,
               Texture("checker", b.col((0.2, 0.55, 0.35)), b.col((0.85, 0.85, 0.6)), scale=0.06, noise=0.15))
    zt = z_top + 0.024
    o_apple = b.object("apple", g_fruit)
    a_c = tray_c + [-0.07, 0.06, 0] + b.jit(0.01)
    p = b.part("body", o_apple)
    b.sphere(p, a_c + [0, 0, zt + 0.05], 0.05,
             Texture("noise", b.col((0.8, 0.1, 0.1)), b.col((0.95, 0.75, 0.2)), scale=0.03, noise=0.2))
    p = b.part("stem", o_apple)
    b.cylinder(p, a_c + [0, 0, zt + 0.105], 0.007, 0.015, Texture("solid", (0.3, 0.2, 0.08), noise=0.3))
    o_orange = b.object("orange", g_fruit)
    p = b.part("orange", o_orange)
    b.sphere(p, tray_c + [0.07, 0.06, zt + 0.055] + b.jit(0.01), 0.055,
             Texture("noise", b.col((1.0, 0.55, 0.05)), b.col((0.85, 0.35, 0.0)), scale=0.015, noise=0.2))
    o_banana = b.object("banana", g_fruit)
    p = b.part("banana", o_banana)
    by = rng.uniform(-0.3, 0.3)
    b.ellipsoid(p, tray_c + [0.0, -0.08, zt + 0.022], (0.1, 0.025, 0.022),
                Texture("stripes", b.col((0.98, 0.88, 0.2)), b.col((0.75, 0.6, 0.1)), scale=0.03, noise=0.2, axis=0),
                rot=rot_z(by))

    # --- snowman on the ground -------------------------------------------------------
    g_snow = b.group("snowman_group")
    o_sm = b.object("snowman", g_snow)
    sm = np.array([1.0, 0.25, 0.0]) + b.jit(0.03)
    face = math.pi + rng.uniform(-0.35, 0.35) + 0.6  # facing roughly towards the table / -x
    fdir = np.array([math.cos(face), math.sin(face), 0.0])
    side = np.array([-fdir[1], fdir[0], 0.0])
    snow = Texture("noise", (0.95, 0.96, 1.0), (0.72, 0.78, 0.9), scale=0.06, noise=0.2)
    r0, r1, r2 = 0.23, 0.165, 0.115
    z0 = r0 - 0.02
    z1 = z0 + r0 + r1 - 0.06
    z2 = z1 + r1 + r2 - 0.04
    p = b.part("base", o_sm)
    b.sphere(p, sm + [0, 0, z0], r0, snow)
    p = b.part("torso", o_sm)
    b.sphere(p, sm + [0, 0, z1], r1, snow)
    p = b.part("head", o_sm)
    b.sphere(p, sm + [0, 0, z2], r2, snow)
    p = b.part("hat", o_sm)
    hat_tex = Texture("stripes", b.col((0.1, 0.1, 0.12)), b.col((0.6, 0.1, 0.5)), scale=0.05, noise=0.2, axis=2)
    b.cylinder(p, sm + [0, 0, z2 + r2 - 0.02], 0.14, 0.01, hat_tex)
    b.cylinder(p, sm + [0, 0, z2 + r2 + 0.07], 0.085, 0.08, hat_tex)
    p = b.part("nose", o_sm)
    b.cylinder(p, sm + [0, 0, z2] + fdir * (r2 + 0.035), 0.016, 0.045,
               Texture("stripes", (1.0, 0.5, 0.05), (0.8, 0.3, 0.0), scale=0.02, noise=0.1, axis=2),
               rot=rot_axis_to(fdir))
    p = b.part("eyes", o_sm)
    for s in (-1, 1):
        d = fdir * math.cos(0.4) + side * s * math.sin(0.4)
        d = d / np.linalg.norm(d) * math.cos(0.35) + np.array([0, 0, math.sin(0.35)])
        b.sphere(p, sm + [0, 0, z2] + d * (r2 - 0.003), 0.018, Texture("solid", (0.05, 0.05, 0.05), noise=0.3))
    p = b.part("buttons", o_sm)
    for el in (0.55, 0.1, -0.35):
        d = fdir * math.cos(el) + np.array([0, 0, math.sin(el)])
        b.sphere(p, sm + [0, 0, z1] + d * (r1 - 0.004), 0.022, Texture("solid", (0.12, 0.12, 0.15), noise=0.3))
    p = b.part("arms", o_sm)
    for s in (-1, 1):
        d = side * s + np.array([0, 0, 0.55])
        d = d / np.linalg.norm(d)
        b.cylinder(p, sm + [0, 0, z1 + 0.03] + d * (r1 + 0.14), 0.014, 0.17,
                   Texture("noise", (0.4, 0.25, 0.1), (0.2, 0.12, 0.05), scale=0.03, noise=0.3), rot=rot_axis_to(d))
    o_ball = b.object("snowball", g_snow)
    p = b.part("snowball", o_ball)
    b.sphere(p, np.array([0.82, -0.48, 0.1]) + b.jit(0.03), 0.1, snow)

    ground = Texture("ground", b.col((0.66, 0.58, 0.46), 0.03), b.col((0.36, 0.31, 0.26), 0.03), scale=0.3, noise=0.35)
    return b.build(ground, _SKY, light_dir=(0.5, -0.35, 0.8), cam_dist_factor=0.68, target_height=0.4)


def _shelf(rng: np.random.Generator) -> Scene:
    b = SceneBuilder("shelf", rng)
    g_case = b.group("bookcase")
    o_case = b.object("bookcase", g_case)
    W, D, H = 0.5, 0.16, 1.2  # half width, half depth, full height
    t = 0.018
    c0 = b.jit(0.02)
    wood = Texture("stripes", b.col((0.75, 0.55, 0.32)), b.col((0.5, 0.32, 0.16)), scale=0.06, noise=0.3, axis=2)
    wood_h = Texture("stripes", wood.c1, wood.c2, scale=0.06, noise=0.3, axis=0)
    p = b.part("side_left", o_case)
    b.box(p, c0 + [-W + t, 0, H / 2], (t, D, H / 2), wood)
    p = b.part("side_right", o_case)
    b.box(p, c0 + [W - t, 0, H / 2], (t, D, H / 2), wood)
    # open unit (seen from every side): two thin back rails instead of a back panel
    p = b.part("back_rails", o_case)
    for zr in (0.27, 1.0):
        b.box(p, c0 + [0, D - 0.012, zr], (W - 2 * t, 0.012, 0.012),
              Texture("checker", b.col((0.9, 0.85, 0.75)), b.col((0.35, 0.3, 0.25)), scale=0.05, noise=0.2))
    shelf_z = [0.04, 0.42, 0.80, H - t]
    for i, z in enumerate(shelf_z):
        p = b.part(f"board_{i}", o_case)
        b.box(p, c0 + [0, 0, z], (W - 2 * t, D - 0.016, t), wood_h)
    inner_x = W - 2 * t

    # books on the middle board
    g_books = b.group("books")
    x = -inner_x + 0.03
    zb = shelf_z[1] + t
    book_cols = [(0.8, 0.1, 0.1), (0.1, 0.3, 0.75), (0.1, 0.55, 0.25), (0.9, 0.75, 0.1), (0.5, 0.2, 0.6)]
    for k in range(5):
        o = b.object(f"book_{k}", g_books)
        hw = rng.uniform(0.02, 0.035)
        hh = rng.uniform(0.1, 0.15)
        hd = rng.uniform(0.09, 0.12)
        p = b.part("cover", o)
        c = b.col(book_cols[k])
        b.box(p, c0 + [x + hw, -0.02, zb + hh + 0.001], (hw, hd, hh),
              Texture("stripes", c, tuple(0.5 * np.asarray(c)), scale=0.08, noise=0.2, axis=2))
        p = b.part("label", o)
        b.box(p, c0 + [x + hw, -0.02 - hd - 0.002, zb + hh + 0.03], (hw * 0.7, 0.003, 0.02),
              Texture("solid", (0.95, 0.95, 0.9), noise=0.2))
        x += 2 * hw + 0.004

    # decor on the top board and the lower board
    g_decor = b.group("decor")
    o_vase = b.object("vase", g_decor)
    vx = c0 + [-0.22, -0.02, 0] + b.jit(0.02)
    zt = shelf_z[2] + t
    vtex = Texture("checker", b.col((0.15, 0.6, 0.7)), b.col((0.95, 0.9, 0.8)), scale=0.035, noise=0.15)
    p = b.part("body", o_vase)
    b.ellipsoid(p, vx + [0, 0, zt + 0.08], (0.07, 0.07, 0.08), vtex)
    p = b.part("neck", o_vase)
    b.cylinder(p, vx + [0, 0, zt + 0.19], 0.03, 0.05,
               Texture("stripes", b.col((0.9, 0.5, 0.1)), b.col((0.95, 0.9, 0.8)), scale=0.025, noise=0.15))
    o_globe = b.object("globe", g_decor)
    gx = c0 + [0.2, -0.02, 0] + b.jit(0.02)
    brass = Texture("noise", (0.8, 0.65, 0.25), (0.5, 0.38, 0.1), scale=0.02, noise=0.2)
    p = b.part("base", o_globe)
    b.cylinder(p, gx + [0, 0, zt + 0.01], 0.06, 0.01, brass)
    p = b.part("stand", o_globe)
    b.cylinder(p, gx + [0, 0, zt + 0.05], 0.01, 0.03, brass)
    p = b.part("sphere", o_globe)
    b.sphere(p, gx + [0, 0, zt + 0.17], 0.1,
             Texture("noise", b.col((0.2, 0.45, 0.85)), b.col((0.3, 0.7, 0.25)), scale=0.05, noise=0.1))
    p = b.part("knob", o_globe)
    b.sphere(p, gx + [0, 0, zt + 0.28], 0.014, brass)
    o_crate = b.object("crate", g_decor)
    zl = shelf_z[0] + t
    p = b.part("crate", o_crate)
    b.box(p, c0 + [-0.2, -0.01, zl + 0.14 + 0.001], (0.2, 0.12, 0.14),
          Texture("checker", b.col((0.85, 0.7, 0.45)), b.col((0.6, 0.4, 0.2)), scale=0.07, noise=0.2),
          yaw=rng.uniform(-0.05, 0.05))
    o_ball = b.object("ball", g_decor)
    p = b.part("ball", o_ball)
    b.sphere(p, c0 + [0.24, -0.02, zl + 0.12 + 0.001], 0.12,
             Texture("stripes", b.col((0.95, 0.95, 0.95)), b.col((0.9, 0.15, 0.1)), scale=0.08, noise=0.1, axis=0))

    # plant next to the bookcase
    g_plant = b.group("plant")
    o_pot = b.object("pot", g_plant)
    pc = np.array([-0.85, -0.15, 0.0]) + b.jit(0.04)
    p = b.part("pot", o_pot)
    b.cylinder(p, pc + [0, 0, 0.14], 0.14, 0.14,
               Texture("stripes", b.col((0.75, 0.35, 0.2)), b.col((0.55, 0.22, 0.12)), scale=0.06, noise=0.2))
    p = b.part("soil", o_pot)
    b.cylinder(p, pc + [0, 0, 0.285], 0.125, 0.006, Texture("noise", (0.25, 0.17, 0.1), (0.1, 0.07, 0.04), scale=0.02))
    o_fern = b.object("fern", g_plant)
    p = b.part("stem", o_fern)
    b.cylinder(p, pc + [0, 0, 0.45], 0.018, 0.17, Texture("noise", (0.3, 0.45, 0.15), (0.2, 0.3, 0.1), scale=0.03))
    p = b.part("foliage", o_fern)
    leaf = Texture("noise", b.col((0.15, 0.55, 0.15)), b.col((0.45, 0.75, 0.2)), scale=0.04, noise=0.2)
    for off, r in (((0, 0, 0.7), 0.16), ((0.1, 0.06, 0.6), 0.11), ((-0.09, -0.05, 0.62), 0.11)):
        b.sphere(p, pc + np.asarray(off) + b.jit(0.01), r, leaf)

    ground = Texture("ground", b.col((0.6, 0.6, 0.62), 0.03), b.col((0.3, 0.32, 0.36), 0.03), scale=0.25, noise=0.35)
    return b.build(ground, _SKY, light_dir=(0.3, -0.7, 0.75), cam_dist_factor=0.8, target_height=0.45)


def _garden(rng: np.random.Generator) -> Scene:
    b = SceneBuilder("garden", rng)
    # tree
    g_tree = b.group("tree")
    o_tree = b.object("tree", g_tree)
    tc = np.array([-0.75, 0.35, 0.0]) + b.jit(0.05)
    p = b.part("trunk", o_tree)
    b.cylinder(p, tc + [0, 0, 0.55], 0.085, 0.55,
               Texture("stripes", b.col((0.45, 0.3, 0.15)), b.col((0.28, 0.18, 0.08)), scale=0.05, noise=0.3, axis=0))
    leaf = Texture("noise", b.col((0.2, 0.55, 0.15)), b.col((0.55, 0.8, 0.25)), scale=0.08, noise=0.25)
    p = b.part("crown", o_tree)
    b.sphere(p, tc + [0, 0, 1.38], 0.36, leaf)
    p = b.part("crown_side", o_tree)
    b.sphere(p, tc + [0.3, -0.12, 1.12] + b.jit(0.03), 0.22,
             Texture("checker", leaf.c1, (0.1, 0.35, 0.1), scale=0.09, noise=0.25))
    o_bh = b.object("birdhouse", g_tree)
    p = b.part("house", o_bh)
    b.box(p, tc + [0, -0.155, 0.75], (0.07, 0.07, 0.09),
          Texture("checker", b.col((0.9, 0.8, 0.3)), b.col((0.6, 0.2, 0.2)), scale=0.04, noise=0.2))
    p = b.part("hole", o_bh)
    b.cylinder(p, tc + [0, -0.227, 0.77], 0.025, 0.006, Texture("solid", (0.08, 0.06, 0.05), noise=0.3),
               rot=rot_axis_to((0, 1, 0)))

    # bench
    g_bench = b.group("bench")
    o_bench = b.object("bench", g_bench)
    bc = np.array([0.3, 0.55, 0.0]) + b.jit(0.04)
    byaw = rng.uniform(-0.15, 0.15)
    plank = Texture("stripes", b.col((0.7, 0.45, 0.25)), b.col((0.45, 0.28, 0.15)), scale=0.05, noise=0.3, axis=1)
    iron = Texture("noise", (0.2, 0.2, 0.22), (0.35, 0.35, 0.4), scale=0.03, noise=0.3)
    p = b.part("seat", o_bench)
    b.box(p, _to_world(bc, byaw, [0, 0, 0.45]), (0.6, 0.2, 0.025), plank, yaw=byaw)
    p = b.part("backrest", o_bench)
    b.box(p, _to_world(bc, byaw, [0, 0.19, 0.72]), (0.6, 0.02, 0.16), plank, yaw=byaw)
    p = b.part("legs", o_bench)
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.box(p, _to_world(bc, byaw, [sx * 0.52, sy * 0.16, 0.2125]), (0.025, 0.025, 0.2125), iron, yaw=byaw)
    o_cat = b.object("cat", g_bench)
    fur = Texture("stripes", b.col((0.95, 0.6, 0.25)), b.col((0.6, 0.35, 0.1)), scale=0.04, noise=0.2, axis=0)
    ct = _to_world(bc, byaw, [0.25, -0.02, 0.475])
    p = b.part("body", o_cat)
    b.ellipsoid(p, ct + [0, 0, 0.07], (0.14, 0.08, 0.07), fur, rot=rot_z(byaw))
    p = b.part("head", o_cat)
    b.sphere(p, _to_world(ct, byaw, [-0.15, 0, 0.14]), 0.06, fur)
    p = b.part("tail", o_cat)
    b.cylinder(p, _to_world(ct, byaw, [0.17, 0, 0.1]), 0.015, 0.08, fur, rot=rot_z(byaw) @ rot_axis_to((0.6, 0, 0.8)))

    # flowers
    g_fl = b.group("flower_bed")
    bloom_cols = [(0.95, 0.2, 0.3), (0.95, 0.85, 0.15), (0.6, 0.3, 0.9), (1.0, 0.55, 0.1)]
    for k in range(4):
        o = b.object(f"flower_{k}", g_fl)
        fc = np.array([0.1 + 0.22 * k, -0.35 + 0.08 * (k % 2), 0.0]) + b.jit(0.03)
        h = rng.uniform(0.3, 0.45)
        p = b.part("stem", o)
        b.cylinder(p, fc + [0, 0, h / 2], 0.01, h / 2, Texture("noise", (0.2, 0.5, 0.15), (0.1, 0.3, 0.1), scale=0.03))
        p = b.part("bloom", o)
        c = b.col(bloom_cols[k])
        b.ellipsoid(p, fc + [0, 0, h + 0.02], (0.06, 0.06, 0.025),
                    Texture("stripes", c, (0.98, 0.98, 0.9), scale=0.03, noise=0.15, axis=0))
        p = b.part("center", o)
        b.sphere(p, fc + [0, 0, h + 0.04], 0.02, Texture("solid", (0.35, 0.2, 0.05), noise=0.3))
        p = b.part("leaf", o)
        b.ellipsoid(p, fc + [0.045, 0, h * 0.4], (0.045, 0.015, 0.008), Texture("solid", (0.25, 0.6, 0.2), noise=0.3),
                    rot=rot_z(rng.uniform(0, 2 * math.pi)) @ rot_axis_to((0.3, 0, 1)))

    # rocks
    g_rocks = b.group("rocks")
    for k, (pos, ax) in enumerate((((-0.3, -0.5, 0.0), (0.18, 0.13, 0.11)), ((1.1, -0.2, 0.0), (0.12, 0.1, 0.08)),
                                    ((-0.05, -0.2, 0.0), (0.06, 0.05, 0.04)))):
        o = b.object(f"rock_{k}", g_rocks)
        p = b.part("rock", o)
        b.ellipsoid(p, np.asarray(pos) + [0, 0, ax[2] * 0.7] + b.jit(0.02), ax,
                    Texture("noise", b.col((0.55, 0.55, 0.52)), b.col((0.3, 0.3, 0.32)), scale=0.04, noise=0.3),
                    rot=rot_z(rng.uniform(0, math.pi)))

    ground = Texture("ground", b.col((0.5, 0.62, 0.3), 0.03), b.col((0.45, 0.36, 0.25), 0.03), scale=0.3, noise=0.4)
    return b.build(ground, _SKY, light_dir=(-0.4, -0.5, 0.8), cam_dist_factor=0.65, target_height=0.3)


def _mug(b: SceneBuilder, o: int, base: np.ndarray, yaw: float, body_tex: Texture, handle_tex: Texture,
         r: float = 0.045, hh: float = 0.05, tube: float = 0.009) -> None:
    """A mug on the surface point ``base``: cylinder body + a handle ring of small spheres (``tube`` radius)."""
    p = b.part("body", o)
    b.cylinder(p, base + [0, 0, hh], r, hh, body_tex)
    p = b.part("handle", o)
    ring = 0.03
    for ang in np.linspace(-math.pi / 2, math.pi / 2, 9):
        local = [r + ring * 0.55 * math.cos(ang) + 0.004, 0.0, hh + ring * math.sin(ang)]
        b.sphere(p, _to_world(base, yaw, local), tube, handle_tex)


def _hat(b: SceneBuilder, o: int, base: np.ndarray, felt: Texture, band: Texture) -> None:
    """A hat whose brim (1 cm thick, 15 cm radius) lies at ``base``: brim + crown."""
    p = b.part("brim", o)
    b.cylinder(p, base + [0, 0, 0.005], 0.15, 0.005, felt)
    p = b.part("crown", o)
    b.cylinder(p, base + [0, 0, 0.07], 0.075, 0.06, band)


def _hallway(rng: np.random.Generator) -> Scene:
    """Built around what fails at 128 px: thin parts (mug handles, hat brims, spoon handles) and many same-size
    siblings (three identical mugs, eight books of one size side by side)."""
    b = SceneBuilder("hallway", rng)

    # --- console table ------------------------------------------------------------
    g_console = b.group("console")
    o_table = b.object("table", g_console)
    top_h, tx, ty, tt = 0.72, 0.45, 0.2, 0.018
    t0 = b.jit(0.02)
    wood = Texture("stripes", b.col((0.55, 0.35, 0.2)), b.col((0.35, 0.2, 0.1)), scale=0.07, noise=0.3, axis=0)
    p = b.part("top", o_table)
    b.box(p, t0 + [0, 0, top_h - tt], (tx, ty, tt), wood)
    p = b.part("legs", o_table)
    lh = (top_h - 2 * tt) / 2
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.box(p, t0 + [sx * (tx - 0.04), sy * (ty - 0.04), lh], (0.02, 0.02, lh),
                  Texture("noise", (0.3, 0.18, 0.1), (0.5, 0.32, 0.18), scale=0.05, noise=0.2))

    # --- tea set: three identical mugs and two spoons -------------------------------
    g_tea = b.group("tea_set")
    cup = Texture("stripes", b.col((0.2, 0.45, 0.8), 0.02), (0.95, 0.95, 0.92), scale=0.035, noise=0.15, axis=2)
    grip = Texture("noise", (0.95, 0.8, 0.2), (0.7, 0.5, 0.1), scale=0.02, noise=0.2)
    for k, x in enumerate((-0.32, -0.17, -0.02)):
        o = b.object(f"mug_{k}", g_tea)
        _mug(b, o, t0 + [x, 0.06, top_h] + b.jit(0.01), rng.uniform(-0.5, 0.5) - 0.6, cup, grip)
    metal = Texture("noise", b.col((0.8, 0.8, 0.84)), b.col((0.45, 0.45, 0.5)), scale=0.015, noise=0.25)
    for k, x in enumerate((0.17, 0.31)):
        o = b.object(f"spoon_{k}", g_tea)
        c = t0 + [x, -0.06, top_h] + b.jit(0.01)
        yaw = math.pi / 2 + rng.uniform(-0.25, 0.25)
        p = b.part("bowl", o)
        b.ellipsoid(p, _to_world(c + [0, 0, 0.008], yaw, [-0.065, 0, 0]), (0.03, 0.021, 0.008), metal, rot=rot_z(yaw))
        p = b.part("handle", o)
        b.box(p, _to_world(c + [0, 0, 0.003], yaw, [0.045, 0, 0]), (0.08, 0.008, 0.003), metal, yaw=yaw)

    # --- hat stand with two hats ------------------------------------------------------
    g_hats = b.group("hat_stand")
    o_stand = b.object("stand", g_hats)
    sc = np.array([-0.72, 0.36, 0.0]) + b.jit(0.03)
    iron = Texture("noise", (0.2, 0.2, 0.22), (0.4, 0.4, 0.45), scale=0.03, noise=0.3)
    p = b.part("base", o_stand)
    b.cylinder(p, sc + [0, 0, 0.015], 0.16, 0.015, iron)
    p = b.part("pole", o_stand)
    b.cylinder(p, sc + [0, 0, 0.66], 0.015, 0.64, iron)
    p = b.part("arm", o_stand)
    b.cylinder(p, sc + [0, -0.11, 0.9], 0.012, 0.11, iron, rot=rot_axis_to((0, 1, 0)))
    b.cylinder(p, sc + [0, -0.22, 0.925], 0.012, 0.035, iron)
    felt = Texture("noise", b.col((0.15, 0.12, 0.1)), b.col((0.35, 0.25, 0.18)), scale=0.03, noise=0.2)
    band = Texture("stripes", felt.c1, b.col((0.7, 0.1, 0.1)), scale=0.06, noise=0.2, axis=2)
    o = b.object("hat_top", g_hats)
    _hat(b, o, sc + [0, 0, 1.3], felt, band)
    straw = Texture("stripes", b.col((0.9, 0.8, 0.5)), b.col((0.75, 0.62, 0.35)), scale=0.02, noise=0.2, axis=0)
    o = b.object("hat_arm", g_hats)
    _hat(b, o, sc + [0, -0.22, 0.96], straw, Texture("stripes", straw.c1, (0.2, 0.3, 0.7), scale=0.05, axis=2))

    # --- open book rack (a board between two bookends) with eight books of one size ---------
    g_shelf = b.group("book_rack")
    o_shelf = b.object("rack", g_shelf)
    s0 = np.array([0.1, 0.45, 0.0]) + b.jit(0.02)
    W, Dp, t = 0.3, 0.12, 0.015
    pale = Texture("stripes", b.col((0.85, 0.75, 0.55)), b.col((0.6, 0.45, 0.28)), scale=0.06, noise=0.3, axis=2)
    p = b.part("bookends", o_shelf)
    for sx in (-1, 1):
        b.box(p, s0 + [sx * (W - t), 0, 0.13], (t, Dp, 0.13), pale)
    p = b.part("board", o_shelf)
    b.box(p, s0 + [0, 0, 0.02], (W - 2 * t, Dp, 0.02), Texture("stripes", pale.c1, pale.c2, scale=0.06, axis=0))
    g_books = b.group("books")
    cols = [(0.75, 0.12, 0.12), (0.12, 0.3, 0.7), (0.12, 0.5, 0.25), (0.85, 0.7, 0.12)]
    hw, hh, hd = 0.024, 0.11, 0.1
    x = -(W - 2 * t) + 0.012
    for k in range(8):
        o = b.object(f"book_{k}", g_books)
        c = b.col(cols[k % 4], 0.03)
        p = b.part("cover", o)
        b.box(p, s0 + [x + hw, 0.0, 0.04 + hh + 0.001], (hw, hd, hh),
              Texture("stripes", c, tuple(0.55 * np.asarray(c)), scale=0.08, noise=0.2, axis=2))
        p = b.part("label", o)
        b.box(p, s0 + [x + hw, hd + 0.002, 0.04 + hh + 0.03], (hw * 0.7, 0.003, 0.02),  # spine away from the table
              Texture("solid", (0.95, 0.95, 0.9), noise=0.2))
        x += 2 * hw + 0.004

    ground = Texture("ground", b.col((0.55, 0.5, 0.46), 0.03), b.col((0.3, 0.28, 0.26), 0.03), scale=0.25, noise=0.35)
    return b.build(ground, _SKY, light_dir=(0.35, -0.55, 0.8), cam_dist_factor=0.78, target_height=0.4)


SCENES: dict[str, Callable[[np.random.Generator], Scene]] = {
    "tabletop": _tabletop,
    "shelf": _shelf,
    "garden": _garden,
    "hallway": _hallway,
}


def build_scene(name: str, seed: int = 0) -> Scene:
    if name not in SCENES:
        raise ValueError(f"unknown synthetic scene {name!r}; valid choices: {', '.join(sorted(SCENES))}")
    return SCENES[name](np.random.default_rng(seed))


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


# --------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    scene: str = "tabletop"  # key of SCENES
    output_dir: Path = Path("scenes/tabletop")
    n_views: int = 40
    resolution: int = 128  # image width = height = resolution
    seed: int = 0
    n_init_points: int = 6000  # size of the SfM-like initial point cloud
    point_noise: float = 0.01  # std of gaussian noise on init points, in scene units (metres)
    overwrite: bool = False
    detail: float = 0.0  # contrast of a fine (~1.5 cm) world-space grain on every surface, 0 = none: gives SfM features
    eval_interval: Optional[int] = None  # hold out every N-th view (0, N, 2N, ...) in transforms.json; None: parser's split


def _level_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables part id -> object id and object id -> group id (index 0 = background)."""
    p2o = np.zeros(len(scene.parts) + 1, dtype=np.int32)
    for e in scene.parts:
        p2o[e.id] = e.parent
    o2g = np.zeros(len(scene.objects) + 1, dtype=np.int32)
    for e in scene.objects:
        o2g[e.id] = e.parent
    return p2o, o2g


def _entity_sizes(scene: Scene) -> dict[str, dict[int, float]]:
    """Bounding-box diagonal (metres) of every part/object/group."""
    p2o, o2g = _level_maps(scene)
    boxes: dict[str, dict[int, list]] = {lvl: {} for lvl in LEVELS}
    for prim in scene.primitives:
        if prim.part == 0:
            continue
        lo, hi = prim.aabb()
        ids = {"parts": prim.part, "objects": int(p2o[prim.part]), "groups": int(o2g[p2o[prim.part]])}
        for lvl, i in ids.items():
            cur = boxes[lvl].get(i)
            boxes[lvl][i] = [lo, hi] if cur is None else [np.minimum(cur[0], lo), np.maximum(cur[1], hi)]
    return {lvl: {i: round(float(np.linalg.norm(b[1] - b[0])), 4) for i, b in v.items()} for lvl, v in boxes.items()}


def _hierarchy_json(scene: Scene) -> dict:
    sizes = _entity_sizes(scene)
    out: dict = {"scene": scene.name, "levels": list(LEVELS), "background_id": 0}
    for lvl, ents in zip(LEVELS, (scene.parts, scene.objects, scene.groups)):
        rows = [{"id": 0, "name": "background", "parent": None if lvl == "groups" else 0, "size_m": None}]
        for e in ents:
            rows.append({"id": e.id, "name": e.name, "parent": e.parent, "size_m": sizes[lvl].get(e.id)})
        out[lvl] = rows
    return out


def _save_png16(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(arr.astype(np.uint16))).save(path)


def _load_png16(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im).astype(np.int64)


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """``sparse_pc.ply``: ``x y z`` float32, ``red green blue`` uint8 (what nerfstudio's dataparser reads)."""
    from pepeseg3d_ns.plyio import write_vertex_ply

    xyz, rgb = np.asarray(xyz, np.float32), np.asarray(rgb, np.uint8)
    write_vertex_ply(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                            "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]},
                     comments=["pepeseg3d synthetic SfM-like points"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clear_previous(out: Path) -> None:
    """Remove files a previous run of this generator wrote (only our own file patterns)."""
    (out / "transforms.json").unlink(missing_ok=True)
    patterns = ["images/frame_*.png", "depth/frame_*.png", "gt/depth/frame_*.npy"]
    patterns += [f"gt/{lvl}/frame_*.png" for lvl in LEVELS]
    for pat in patterns:
        for f in out.glob(pat):
            f.unlink()
    for f in ("sparse_pc.ply", "gt/hierarchy.json"):
        (out / f).unlink(missing_ok=True)


def generate_scene(cfg: SynthConfig, progress: bool = True) -> Path:
    """Render ``cfg.scene`` and write a nerfstudio dataset with GT into ``cfg.output_dir``."""
    if cfg.scene not in SCENES:
        raise ValueError(f"unknown synthetic scene {cfg.scene!r}; valid choices: {', '.join(sorted(SCENES))}")
    if cfg.n_views < 1 or cfg.resolution < 4:
        raise ValueError("n_views must be >= 1 and resolution >= 4")
    if cfg.eval_interval is not None and not 2 <= cfg.eval_interval <= cfg.n_views:
        raise ValueError(f"eval_interval must be in [2, n_views={cfg.n_views}] (every N-th view held out), "
                         f"got {cfg.eval_interval}")
    out = Path(cfg.output_dir)
    if (out / "transforms.json").exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{out / 'transforms.json'} already exists (pass overwrite=True to replace it)")
        _clear_previous(out)
    for sub in ["images", "depth", "gt/depth"] + [f"gt/{lvl}" for lvl in LEVELS]:
        (out / sub).mkdir(parents=True, exist_ok=True)

    scene = build_scene(cfg.scene, cfg.seed)
    scene.detail = float(cfg.detail)
    res = int(cfg.resolution)
    poses = camera_poses(scene, cfg.n_views, np.random.default_rng([cfg.seed, 1]))
    pc_rng = np.random.default_rng([cfg.seed, 2])
    p2o, o2g = _level_maps(scene)
    fx, fy, cx, cy = intrinsics(res)

    # points per view (spread n_init_points evenly)
    per_view = np.full(cfg.n_views, cfg.n_init_points // cfg.n_views)
    per_view[: cfg.n_init_points % cfg.n_views] += 1
    pc_xyz, pc_rgb = [], []

    frames = []
    it = range(cfg.n_views)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"synth {cfg.scene}", unit="view")
    for i in it:
        stem = f"frame_{i:05d}"
        r = render_view(scene, poses[i], res)
        parts = r["part"]
        objs = p2o[parts]
        grps = o2g[objs]
        Image.fromarray(r["rgb"]).save(out / "images" / f"{stem}.png")
        mm = np.clip(np.round(r["depth"].astype(np.float64) * 1000.0), 0, 65535)
        _save_png16(out / "depth" / f"{stem}.png", mm)
        np.save(out / "gt" / "depth" / f"{stem}.npy", r["depth"].astype(np.float32))
        for lvl, m in zip(LEVELS, (parts, objs, grps)):
            _save_png16(out / "gt" / lvl / f"{stem}.png", m)
        # SfM-like points: ~75 % on objects, rest on ground / dome, from pixels this view sees
        k = int(per_view[i])
        if k > 0:
            flat = parts.reshape(-1)
            fg, bg = np.nonzero(flat > 0)[0], np.nonzero(flat == 0)[0]
            k_fg = min(len(fg), int(round(0.75 * k)))
            k_bg = k - k_fg
            sel = np.concatenate([pc_rng.choice(fg, k_fg, replace=len(fg) < k_fg) if k_fg else np.zeros(0, np.int64),
                                  pc_rng.choice(bg, k_bg, replace=len(bg) < k_bg) if k_bg else np.zeros(0, np.int64)])
            if len(sel):
                pts = r["points"].reshape(-1, 3)[sel]
                pts = pts + pc_rng.normal(0.0, cfg.point_noise, pts.shape)
                pc_xyz.append(pts)
                pc_rgb.append(r["rgb"].reshape(-1, 3)[sel])
        frames.append({
            "file_path": f"images/{stem}.png",
            "transform_matrix": [[float(round(x, 9)) for x in row] for row in poses[i]],
            "depth_file_path": f"depth/{stem}.png",
        })

    xyz = np.concatenate(pc_xyz) if pc_xyz else np.zeros((0, 3))
    rgb = np.concatenate(pc_rgb) if pc_rgb else np.zeros((0, 3), np.uint8)
    _write_ply(out / "sparse_pc.ply", xyz, rgb)
    _atomic_write_text(out / "gt" / "hierarchy.json", json.dumps(_hierarchy_json(scene), indent=1))

    transforms = {
        "camera_model": "OPENCV",
        "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": res, "h": res,
        "k1": 0.0, "k2": 0.0, "k3": 0.0, "k4": 0.0, "p1": 0.0, "p2": 0.0,
        "ply_file_path": "sparse_pc.ply",
        "pepe_synthetic": {
            "scene": cfg.scene,
            "seed": int(cfg.seed),
            "n_views": int(cfg.n_views),
            "resolution": res,
            "version": FORMAT_VERSION,
            "n_init_points": int(cfg.n_init_points),
            "point_noise": float(cfg.point_noise),
            "fov_deg": FOV_DEG,
            "up_axis": "+z",
            "depth_unit_scale_factor": 1e-3,
            "camera_distance": round(float(scene.cam_distance), 6),
            "target": [round(float(x), 6) for x in scene.target],
            "dome_radius": round(float(scene.dome_radius), 6),
        },
        "frames": frames,
    }
    if cfg.eval_interval is not None:
        # SPIn-NeRF's protocol: every N-th view (0, N, 2N, ...) held out; nerfstudio reads these lists instead of
        # its eval_mode split
        held = [f["file_path"] for i, f in enumerate(frames) if i % cfg.eval_interval == 0]
        transforms["train_filenames"] = [f["file_path"] for i, f in enumerate(frames) if i % cfg.eval_interval]
        transforms["val_filenames"] = transforms["test_filenames"] = held
        transforms["pepe_synthetic"]["eval_interval"] = int(cfg.eval_interval)
    _atomic_write_text(out / "transforms.json", json.dumps(transforms, indent=1))
    return out


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def _stem(stem: str) -> str:
    return Path(stem).stem


def load_gt_masks(scene_dir: Path, stem: str, level: str) -> np.ndarray:
    """[H, W] int32 instance ids (0 = background) of ``level`` in {"parts", "objects", "groups"}.

    ``stem`` is e.g. ``"frame_00000"`` (a path such as ``"images/frame_00000.png"`` also works).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; valid choices: {', '.join(LEVELS)}")
    return _load_png16(Path(scene_dir) / "gt" / level / f"{_stem(stem)}.png").astype(np.int32)


def load_gt_depth(scene_dir: Path, stem: str) -> np.ndarray:
    """[H, W] float32 z-depth in metres."""
    return np.load(Path(scene_dir) / "gt" / "depth" / f"{_stem(stem)}.npy").astype(np.float32)


def load_hierarchy(scene_dir: Path) -> dict:
    """Parsed ``gt/hierarchy.json``."""
    return json.loads((Path(scene_dir) / "gt" / "hierarchy.json").read_text())


def entity_widths(scene_dir: Path, level: str = "parts") -> dict[str, dict[str, float]]:
    """How many pixels across each entity of ``level`` is, over the views where it is visible.

    The width of a mask in one view is ``2 * d - 1``, where ``d`` is the largest Euclidean distance from one of its
    pixels to a pixel outside it (a stripe ``w`` px wide gives ``w`` for odd ``w``, ``w - 1`` for even ``w``,
    however long it is). Returns ``name -> {"median", "min", "max", "views"}`` (widths in pixels; ``views`` =
    number of views showing it)."""
    from scipy.ndimage import distance_transform_edt

    scene_dir = Path(scene_dir)
    names = {e["id"]: e["name"] for e in load_hierarchy(scene_dir)[level] if e["id"] != 0}
    meta = json.loads((scene_dir / "transforms.json").read_text())
    widths: dict[int, list[float]] = {i: [] for i in names}
    for fr in meta["frames"]:
        ids = load_gt_masks(scene_dir, Path(fr["file_path"]).stem, level)
        for i in np.unique(ids):
            if int(i) in widths:
                widths[int(i)].append(2.0 * float(distance_transform_edt(np.pad(ids == i, 1)).max()) - 1.0)
    return {names[i]: {"median": float(np.median(w)), "min": float(np.min(w)), "max": float(np.max(w)), "views": len(w)}
            for i, w in widths.items() if w}
