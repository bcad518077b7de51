"""Synthetic scenes, the layouts: tabletop, shelf, garden and hallway, each a function of a random generator that
builds a :class:`~pepeseg3d_ns.data.synthetic.scene.Scene`; :func:`build_scene` by name and seed."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from pepeseg3d_ns.data.synthetic.scene import Scene, SceneBuilder, Texture, _to_world, rot_axis_to, rot_z


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
