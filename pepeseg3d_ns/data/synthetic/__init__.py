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

Modules: :mod:`.scene` (primitives, textures, the scene container and builder, the constants), :mod:`.scenes` (the
four layouts: tabletop, shelf, garden, hallway), :mod:`.render` (procedural textures, ray casting, cameras,
:func:`render_view`), :mod:`.writer` (:class:`SynthConfig`, :func:`generate_scene` and the ground-truth loaders).
"""

from __future__ import annotations

# the constants (FOV_DEG, SUPERSAMPLE, FORMAT_VERSION) stay importable from here as before the split
from pepeseg3d_ns.data.synthetic.render import SUPERSAMPLE, camera_poses, intrinsics, look_at, render_view
from pepeseg3d_ns.data.synthetic.scene import FOV_DEG, LEVELS, Scene
from pepeseg3d_ns.data.synthetic.scenes import SCENES, build_scene
from pepeseg3d_ns.data.synthetic.writer import (
    FORMAT_VERSION,
    SynthConfig,
    entity_widths,
    generate_scene,
    load_gt_depth,
    load_gt_masks,
    load_hierarchy,
)

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
