"""Synthetic scenes, the scene model: analytic primitives with procedural textures, entities of the three
hierarchy levels (``parts`` ⊂ ``objects`` ⊂ ``groups``), the :class:`Scene` container and :class:`SceneBuilder`
that frames a layout (camera distance, sky dome). World frame: right-handed, metres, +z up, ground ``z = 0``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVELS = ("parts", "objects", "groups")
FOV_DEG = 50.0
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
