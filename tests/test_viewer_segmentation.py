"""Click-to-segment without a browser: the viewer's :class:`SegmentationPanel` (``model.segmentation_panel``) driven
by synthetic clicks on a short CPU run of the synthetic tabletop scene, checked against its ground truth.

The run (module fixture, trained once): tabletop scene at ``RES`` px with ``N_VIEWS`` views and simulated priors,
``RECON_STEPS`` of pepe-recon, then ``CONTRAST_STEPS`` of pepe-contrast (seeded; see :func:`train_tabletop_contrast`,
which the browser test reuses). Clicks are chosen from the ground truth: the deepest pixel of a GT mask (maximum of
its distance transform, so it is inside the mask and away from its border) in a training view.

Without a viewer no GUI callback fires: the tests set ``panel.scale.value`` etc. directly and call the panel's
methods; the callbacks that a viewer would call are run by hand, with a stand-in viewer whose ``train_lock`` is a
real ``threading.Lock`` (element callbacks run while the viewer holds it; the click callback and the mask thread
take it themselves).
"""

from __future__ import annotations

import json
import random
import threading
import types
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

slow = pytest.mark.slow  # every test that needs the trained run

RES, N_VIEWS, RECON_STEPS, CONTRAST_STEPS = 64, 12, 300, 600
CONTRAST_LR = 0.02  # Adam lr of the features (8x the paper's 0.0025; the gate's is scaled alike), see train_tabletop_contrast
SEED = 0


# ----------------------------------------------------------------------------------------------- the run


def train_tabletop_contrast(root: Path, res: int = RES, n_views: int = N_VIEWS, recon_steps: int = RECON_STEPS,
                            contrast_steps: int = CONTRAST_STEPS, contrast_lr: float = CONTRAST_LR,
                            seed: int = SEED) -> Tuple[Path, Path]:
    """Synthesise the tabletop scene (``res`` px, ``n_views`` views, simulated SAM/depth priors) under ``root``,
    train pepe-recon for ``recon_steps`` and pepe-contrast for ``contrast_steps`` on CPU, in-process and seeded.
    Returns ``(scene_dir, contrast_config_yml)``.

    ``contrast_lr`` replaces the Adam learning rate of the features; the scale gate's is multiplied by the same
    factor, so it stays 10x below the features' as in the method's defaults. With the paper's 0.0025 (tuned for 10k
    steps), 600 steps learn objects but not yet the scale hierarchy: a click on a snowman part selects the whole
    snowman at every scale. At 0.01 the hierarchy appeared for 2 of 3 seeds, at 0.02 for every seed tried (3 seeds at
    300 steps, 2 at 600; measured with the gate at the features' lr and the earlier "hinge" gate start)."""
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
    from pepeseg3d_ns.recipes import make_config, make_contrast_config
    from pepeseg3d_ns.priors.cli import Priors

    scene = Path(root) / "scene" / "tabletop"
    generate_scene(SynthConfig(scene="tabletop", output_dir=scene, n_views=n_views, resolution=res, n_init_points=2000,
                               seed=seed), progress=False)
    Priors(data=scene, progress=False, preview=False).main()

    def train(config) -> Path:
        config.logging.local_writer.enable = False
        config.save_config()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        trainer.train()
        return config.get_base_dir() / "config.yml"

    recon_cfg = train(make_config(scene, Path(root) / "runs", steps=recon_steps, device="cpu", seed=seed))
    contrast = make_contrast_config(recon_cfg, Path(root) / "runs", steps=contrast_steps, device="cpu", seed=seed)
    factor = contrast_lr / contrast.optimizers["gauss_features"]["optimizer"].lr
    for group in contrast.optimizers.values():
        group["optimizer"].lr *= factor
    contrast_cfg = train(contrast)
    return scene, contrast_cfg


_SHARED_RUNS: Dict[tuple, Tuple[Path, Path]] = {}


def shared_tabletop_run(tmp_path_factory) -> Tuple[Path, Path]:
    """:func:`train_tabletop_contrast` with the defaults, trained once per pytest session (the browser test
    tests/test_viewer_contrast_browser.py uses the same run)."""
    key = (RES, N_VIEWS, RECON_STEPS, CONTRAST_STEPS, CONTRAST_LR, SEED)
    if key not in _SHARED_RUNS:
        _SHARED_RUNS[key] = train_tabletop_contrast(tmp_path_factory.mktemp("viewer_tabletop"))
    return _SHARED_RUNS[key]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_tabletop_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run):
    """The finished run loaded like ``ns-viewer`` loads it: ``model``, training ``cameras`` and image ``stems``."""
    from nerfstudio.utils.eval_utils import eval_setup

    scene, cfg = run
    _, pipeline, _, _ = eval_setup(cfg, test_mode="test")
    pipeline.eval()
    ds = pipeline.datamanager.train_dataset
    stems = [Path(p).stem for p in ds.image_filenames]
    return types.SimpleNamespace(scene=scene, pipeline=pipeline, model=pipeline.model, cameras=ds.cameras, stems=stems)


@pytest.fixture
def panel(loaded, tmp_path):
    """The run's panel, reset to no clicks, scale 0.5, threshold 0.7, every Gaussian shown, synchronous
    decomposition, exports under ``tmp_path``."""
    from pepeseg3d_ns.viewer.controls import SHOW_ALL

    p = loaded.model.segmentation_panel

    def reset():
        p.clear()
        p.scale.value, p.threshold.value, p.show.value = 0.5, 0.7, SHOW_ALL
        p.decomposition_async = False
        p._decomp.clear()
        p._decomp_jobs.clear()
        p.export_dir = tmp_path / "exports"

    reset()
    yield p
    reset()


# ----------------------------------------------------------------------------------------------- ground truth


def gt(loaded, view: int, level: str) -> np.ndarray:
    """``int32 [H, W]`` GT instance ids of training view ``view`` at ``level`` (0 = background)."""
    from pepeseg3d_ns.data.synthetic import load_gt_masks

    return load_gt_masks(loaded.scene, loaded.stems[view], level)


def entity_id(loaded, level: str, name: str) -> int:
    from pepeseg3d_ns.data.synthetic import load_hierarchy

    ids = [e["id"] for e in load_hierarchy(loaded.scene)[level] if e["name"] == name]
    assert len(ids) == 1, (level, name)
    return ids[0]


def deepest_pixel(mask: np.ndarray) -> Tuple[int, int]:
    """``(x, y)`` of the pixel of ``mask [H, W]`` farthest from its border (inside the mask by construction)."""
    from scipy import ndimage

    assert mask.any()
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), mask.shape)
    assert mask[y, x]
    return int(x), int(y)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def largest_view(loaded, level: str, eid: int, exclude=()) -> int:
    """The training view in which entity ``eid`` of ``level`` covers the most pixels."""
    areas = [(int((gt(loaded, v, level) == eid).sum()), -v) for v in range(len(loaded.stems)) if v not in exclude]
    return -max(areas)[1]


def view_of(loaded, v: int):
    from pepeseg3d_ns.contrast.query import render_view

    return render_view(loaded.model, loaded.cameras[v : v + 1])


def seg(panel, loaded, v: int, **kw) -> np.ndarray:
    return panel.segment(view_of(loaded, v), **kw).cpu().numpy()


# ----------------------------------------------------------------------------------------------- segments vs GT

OBJECT = "snowman"  # the largest object of the tabletop scene, with parts (base, torso, head, hat, ...)
OBJECT_SCALES = (0.6, 0.8, 0.9)  # mid to high scales: the best of these is used for the object test
OBJECT_SCALE = 0.8  # the best of OBJECT_SCALES as measured (seed 0); at 0.6 the snowman's parts are still apart


@slow
def test_click_on_object_segments_it_here_and_in_other_views(loaded, panel):
    """A click at the deepest pixel of the snowman's GT mask, in the training view where it is largest, segments
    the snowman in that view and in the other training views (mean IoU over views where it covers >= 30 px)."""
    oid = entity_id(loaded, "objects", OBJECT)
    v = largest_view(loaded, "objects", oid)
    mask = gt(loaded, v, "objects") == oid
    x, y = deepest_pixel(mask)
    assert panel.add_click_at_pixel(loaded.cameras[v : v + 1], x, y)
    assert panel.clicks == [{"x": x, "y": y, "scale": 0.5}] and panel.click_features.shape == (1, 32)
    others = [u for u in range(len(loaded.stems)) if u != v and (gt(loaded, u, "objects") == oid).sum() >= 30]
    assert len(others) >= 3
    views = {u: view_of(loaded, u) for u in [v] + others}
    scores: Dict[float, Tuple[float, float]] = {}
    for s in OBJECT_SCALES:
        panel.scale.value = s
        same = iou(panel.segment(views[v]).cpu().numpy(), mask)
        other = float(np.mean([iou(panel.segment(views[u]).cpu().numpy(), gt(loaded, u, "objects") == oid)
                               for u in others]))
        scores[s] = (same, other)
    best = max(scores, key=lambda s: scores[s][0] + scores[s][1])
    same, other = scores[best]
    print(f"object IoU by scale (clicked view, mean of {len(others)} other views): {scores}; best s = {best}")
    # measured (seed 0, current defaults: scale_power 0.5, band gate, mask-balanced draw, 4000 px): s = 0.8 best, 0.850
    # here and 0.784 in the other views (0.6: 0.329 / 0.231, the snowman still split into parts). With scale_power 1
    # the best was s = 0.7: 0.855 / 0.787. Earlier defaults (hinge gate at the features' lr, 1000 px): 0.849 / 0.788
    # with the warm-up, 0.851 / 0.794 without; other seeds/learning rates tried gave 0.84-0.87 and 0.757-0.80
    assert same >= 0.75, scores
    assert other >= 0.7, scores


PART_LOW, PART_HIGH = 0.1, 0.9  # "parts" and "objects / groups" ends of the scale slider
MIN_PART_PIXELS = 60


@slow
def test_scale_turns_a_part_into_its_whole_object(loaded, panel):
    """Click the deepest pixel of every snowman part that covers >= MIN_PART_PIXELS in a training view. Moving the
    slider from PART_LOW to PART_HIGH re-segments from the same click: on average the segment matches the whole
    snowman much better and the clicked part worse, and for some clicks it flips from "the part" (IoU with the
    part > IoU with the object) to "the whole object" (IoU with the object > 0.8)."""
    from pepeseg3d_ns.data.synthetic import load_hierarchy

    oid = entity_id(loaded, "objects", OBJECT)
    part_ids = [e["id"] for e in load_hierarchy(loaded.scene)["parts"] if e["id"] > 0 and e["parent"] == oid]
    assert len(part_ids) >= 4
    rows = []
    for v in range(len(loaded.stems)):
        parts, objects = gt(loaded, v, "parts"), gt(loaded, v, "objects") == oid
        view = None
        for pid in part_ids:
            part = parts == pid
            if part.sum() < MIN_PART_PIXELS:
                continue
            view = view or view_of(loaded, v)
            panel.clear()
            assert panel.add_click_at_pixel(loaded.cameras[v : v + 1], *deepest_pixel(part))
            low = panel.segment(view, scale=PART_LOW).cpu().numpy()
            high = panel.segment(view, scale=PART_HIGH).cpu().numpy()
            rows.append((v, pid, iou(low, part), iou(low, objects), iou(high, part), iou(high, objects)))
    assert len(rows) >= 10, rows
    r = np.array([row[2:] for row in rows])
    flips = [row for row in rows if row[2] > row[3] and row[5] > row[4] and row[5] >= 0.8]
    print(f"{len(rows)} part clicks; mean IoU (part, object) at s={PART_LOW}: "
          f"({r[:, 0].mean():.3f}, {r[:, 1].mean():.3f}), "
          f"at s={PART_HIGH}: ({r[:, 2].mean():.3f}, {r[:, 3].mean():.3f}); part -> object flips: {flips}")
    # measured (seed 0, current defaults): 28 clicks, (part, object) IoU (0.677-0.695, 0.311-0.319) at s=0.1 ->
    # (0.227, 0.802) at s=0.9, 17 flips (two runs); with scale_power 1: (0.695, 0.303) -> (0.229, 0.807), 18 flips.
    # Earlier defaults: (0.526, 0.401) -> (0.228, 0.825), 14 flips with the warm-up; (0.362, 0.574) -> (0.229, 0.829),
    # 4 flips without; the object gain was 0.125-0.30 over the seeds tried at this learning rate
    assert r[:, 3].mean() - r[:, 1].mean() >= 0.1  # the high-scale segment is the object, more than the low one
    assert r[:, 0].mean() > r[:, 2].mean()  # ... and less the part alone
    assert len(flips) >= 1


# ----------------------------------------------------------------------------------------------- panel state


def click_object(loaded, panel, name: str = OBJECT) -> Tuple[int, np.ndarray]:
    """Click the deepest pixel of object ``name`` in the view where it is largest; returns ``(view, gt_mask)``."""
    oid = entity_id(loaded, "objects", name)
    v = largest_view(loaded, "objects", oid)
    mask = gt(loaded, v, "objects") == oid
    assert panel.add_click_at_pixel(loaded.cameras[v : v + 1], *deepest_pixel(mask))
    return v, mask


@slow
def test_clicks_rescale_accumulate_and_clear(loaded, panel):
    from pepeseg3d_ns.viewer.controls import SHOW_SELECTED

    assert panel.queries() is None and panel.segment(view_of(loaded, 0)) is None
    assert panel.selected_gaussians() is None and panel.visible_mask() is None
    v, mask = click_object(loaded, panel)
    x, y = panel.clicks[0]["x"], panel.clicks[0]["y"]
    view = view_of(loaded, v)
    # the stored feature is ungated: the query follows the slider, and the clicked pixel always matches itself
    q_low, q_high = panel.queries(0.0), panel.queries(1.0)
    assert q_low.shape == (1, 32) and torch.allclose(q_low.norm(dim=-1), torch.ones(1))
    assert not torch.allclose(q_low, q_high)
    for s in (0.0, 0.3, 0.6, 1.0):
        panel.scale.value = s
        assert panel.segment(view, threshold=0.999)[y, x]
    panel.scale.value = 0.5
    # a second click (another object) adds a query: the segment is the union
    one = panel.segment(view).cpu().numpy()
    u = largest_view(loaded, "objects", entity_id(loaded, "objects", "table"))
    table = gt(loaded, u, "objects") == entity_id(loaded, "objects", "table")
    assert panel.add_click_at_pixel(loaded.cameras[u : u + 1], *deepest_pixel(table))
    assert len(panel.clicks) == 2 and panel.click_features.shape == (2, 32)
    both = panel.segment(view).cpu().numpy()
    assert (both >= one).all() and both.sum() > one.sum()
    # a pixel outside the view is an error and adds nothing
    with pytest.raises(ValueError, match="outside"):
        panel.add_click_at_pixel(loaded.cameras[0:1], RES + 3, 2)
    assert len(panel.clicks) == 2
    panel.show.value = SHOW_SELECTED
    assert panel.visible_mask() is not None
    panel.clear()
    assert panel.click_features is None and panel.clicks == [] and panel.queries() is None
    assert panel.segment(view) is None and panel.selected_gaussians() is None
    assert panel.visible_mask() is None and loaded.model._visible_ids() is None  # "only the selection" of nothing: all


@slow
def test_selected_gaussians_follow_threshold_and_scale(loaded, panel):
    from pepeseg3d_ns.contrast.query import select_gaussians

    model = loaded.model
    click_object(loaded, panel)
    sel = panel.selected_gaussians()
    assert sel.dtype == torch.bool and sel.shape == (model.num_points,)
    assert 0 < int(sel.sum()) < model.num_points
    assert panel.selected_gaussians() is sel  # cached while nothing changes
    assert torch.equal(sel, select_gaussians(model, 0.5, panel.queries(), 0.7))
    panel.threshold.value = 0.9
    strict = panel.selected_gaussians()
    assert strict is not sel and bool((strict <= sel).all()) and strict.sum() < sel.sum()
    panel.threshold.value = 0.7
    panel.scale.value = 0.9
    assert torch.equal(panel.selected_gaussians(), select_gaussians(model, 0.9, panel.queries(), 0.7))


@slow
def test_export_writes_a_3dgs_ply_of_the_selection(loaded, panel, tmp_path):
    from plyfile import PlyData

    from pepeseg3d_ns.export import splat_ply_properties

    model = loaded.model
    assert panel.export(tmp_path / "nothing") is None and "nothing selected" in panel.last_message
    assert not (tmp_path / "nothing").exists()
    click_object(loaded, panel)
    sel = panel.selected_gaussians()
    paths = panel.export(tmp_path / "sel")
    idx = np.load(paths["indices"])
    assert np.array_equal(idx, torch.nonzero(sel).flatten().numpy())
    vertex = PlyData.read(str(paths["ply"]))["vertex"]
    assert vertex.count == int(sel.sum())
    n_rest = model.gauss_params["features_rest"].shape[1]
    assert [p.name for p in vertex.properties] == splat_ply_properties(n_rest)
    assert all(p.val_dtype in ("f4", "float32") for p in vertex.properties)
    means = model.gauss_params["means"].detach().cpu().numpy()[idx]
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    assert np.allclose(xyz, means, atol=1e-6)
    opac = model.gauss_params["opacities"].detach().cpu().numpy()[idx, 0]
    assert np.allclose(vertex["opacity"], opac, atol=1e-6)
    info = json.loads(paths["json"].read_text())
    assert info["num_selected"] == info["num_written"] == int(sel.sum())
    assert info["num_gaussians"] == model.num_points and info["scale"] == 0.5 and info["threshold"] == 0.7
    assert info["clicks"] == panel.clicks
    assert str(paths["ply"]) in panel.last_message
    # the button's default folder: export_dir/selection_<time>
    default = panel.export()
    assert default["ply"].parent.parent == panel.export_dir and default["ply"].parent.name.startswith("selection_")


@slow
def test_3d_view_filter_changes_visible_gaussians_and_the_render(loaded, panel):
    from pepeseg3d_ns.viewer.controls import HIDE_SELECTED, SHOW_ALL, SHOW_SELECTED

    model = loaded.model
    panel.scale.value = OBJECT_SCALE
    v, mask = click_object(loaded, panel)
    cam = loaded.cameras[v : v + 1]
    sel = panel.selected_gaussians()
    assert model._visible_ids() is None
    full = model.get_outputs_for_camera(cam)
    panel.show.value = SHOW_SELECTED
    assert torch.equal(model._visible_ids(), sel)
    only = model.get_outputs_for_camera(cam)
    panel.show.value = HIDE_SELECTED
    assert torch.equal(model._visible_ids(), ~sel)
    rest = model.get_outputs_for_camera(cam)
    panel.show.value = SHOW_ALL

    opaque = only["accumulation"][..., 0].cpu().numpy() >= 0.5
    print(f"IoU(opaque pixels of 'only the selection', GT {OBJECT}) = {iou(opaque, mask):.3f}")
    # only the clicked object is drawn at the object scale (measured 0.851 with the current defaults; 0.837 at s = 0.7,
    # 0.42 at the panel's starting s = 0.5, where the query is a snowman part. With scale_power 1: 0.678 at s = 0.5;
    # hinge gate: 0.853. The 3D selection compares each Gaussian's own gated feature, the 2D segment the rendered one)
    assert iou(opaque, mask) >= 0.6
    # hiding the selection changes the picture where the object was, hardly elsewhere
    diff = (rest["rgb"] - full["rgb"]).abs().amax(-1).cpu().numpy()
    assert diff[mask].mean() > 5 * diff[~mask].mean()
    assert not torch.equal(only["rgb"], full["rgb"])


@slow
def test_3d_view_filter_that_would_draw_nothing_draws_everything(loaded, panel):
    """At threshold 1 nothing is selected: "only the selection" would leave no Gaussian (the rasterizer rejects an
    empty set, so every frame would fail); the panel draws all of them instead and says so."""
    from pepeseg3d_ns.viewer.controls import SHOW_SELECTED

    model = loaded.model
    click_object(loaded, panel)
    panel.threshold.value = 1.0
    assert int(panel.selected_gaussians().sum()) == 0
    everything = model.get_outputs_for_camera(loaded.cameras[0:1])
    panel.show.value = SHOW_SELECTED
    assert panel.visible_mask() is None and model._visible_ids() is None
    assert "would draw no Gaussian" in panel.last_message
    out = model.get_outputs_for_camera(loaded.cameras[0:1])
    assert torch.equal(out["rgb"], everything["rgb"])


@slow
def test_click_through_the_filter_hits_empty_space(loaded, panel):
    """With "only the selection" shown, the click render is what the user sees: a click beside the object hits
    empty space and is ignored."""
    from pepeseg3d_ns.viewer.controls import SHOW_SELECTED

    v, mask = click_object(loaded, panel)
    panel.show.value = SHOW_SELECTED
    view = view_of(loaded, v)
    empty = (view.accumulation < 0.5).cpu().numpy() & ~mask
    assert empty.any()
    ys, xs = np.nonzero(empty)
    assert not panel.add_click_at_pixel(loaded.cameras[v : v + 1], int(xs[0]), int(ys[0]))
    assert "empty space" in panel.last_message and len(panel.clicks) == 1


@slow
def test_outputs_for_camera(loaded, panel):
    model = loaded.model
    cam = loaded.cameras[0:1]
    out = model.get_outputs_for_camera(cam)
    for key in ("segmentation", "segment", "feature_pca", "decomposition"):
        assert out[key].shape == (RES, RES, 3), key
        assert out[key].dtype == torch.float32 and 0.0 <= float(out[key].min()) and float(out[key].max()) <= 1.0, key
    # no clicks: the overlay is the rgb picture, the segment is empty
    assert torch.allclose(out["segmentation"], out["rgb"], atol=1e-6)
    assert float(out["segment"].abs().max()) == 0.0
    # synchronous decomposition: HDBSCAN clusters of this view at the slider's scale, cached per scale
    assert 0.5 in panel._decomp
    colours = np.unique((out["decomposition"].reshape(-1, 3).numpy() * 255).round(), axis=0)
    assert len(colours) >= 3
    assert not torch.allclose(out["decomposition"], out["feature_pca"])

    panel.scale.value = OBJECT_SCALE
    v, mask = click_object(loaded, panel)
    cam = loaded.cameras[v : v + 1]
    out = model.get_outputs_for_camera(cam)
    seg = panel.segment(view_of(loaded, v)).cpu()
    changed = (out["segmentation"] - out["rgb"]).abs().amax(-1) > 1.5 / 255
    assert bool((changed <= seg).all())  # only segment pixels are tinted ...
    assert changed[seg].float().mean() > 0.95  # ... and (nearly) all of them are
    assert torch.allclose(out["segment"], out["rgb"] * seg[..., None])
    assert iou(seg.numpy(), mask) >= 0.7
    # the scale slider changes the feature picture
    panel.scale.value = 0.0
    low = model.get_outputs_for_camera(cam)
    assert not torch.allclose(low["feature_pca"], out["feature_pca"])


# ----------------------------------------------------------------------------------------------- viewer callbacks


class FakeViewer:
    """What the panel uses of nerfstudio's ``Viewer``: ``train_lock`` (a real, non-reentrant ``threading.Lock``),
    ``_trigger_rerender``, ``pipeline`` and ``control_panel.output_render``."""

    def __init__(self, pipeline, output_render: str = "rgb"):
        self.train_lock = threading.Lock()
        self.pipeline = pipeline
        self.control_panel = types.SimpleNamespace(output_render=output_render, split_output_render="rgb")
        self.rerenders = 0

    def _trigger_rerender(self) -> None:
        self.rerenders += 1


@pytest.fixture
def viewer(loaded, panel):
    """Attach a :class:`FakeViewer` to the panel's ``ViewerControl`` the way ``ViewerControl._setup`` does, with a
    one-client viser server whose camera is training view 0 (``get_camera`` returns it); detach afterwards."""
    control = panel.viewer_control
    fake = FakeViewer(loaded.pipeline)
    client = types.SimpleNamespace(camera=types.SimpleNamespace(aspect=1.0))
    fake.registered = []
    control.viewer = fake
    control.viser_server = types.SimpleNamespace(get_clients=lambda: {7: client})
    control.get_camera = lambda h, w, client_id=None: loaded.cameras[0:1] if (h, w) == (RES, RES) else None
    control.register_pointer_cb = lambda kind, cb: fake.registered.append((kind, cb))
    control.unregister_pointer_cb = lambda: fake.registered.append(("removed", None))
    loaded.model.last_size = (RES, RES)
    yield fake
    for name in ("viewer", "viser_server", "get_camera", "register_pointer_cb", "unregister_pointer_cb"):
        control.__dict__.pop(name, None)
    panel._click_registered = False


def run_as_viewer_callback(viewer: FakeViewer, fn, *args) -> None:
    """Run ``fn(*args)`` in another thread while holding ``viewer.train_lock``, as nerfstudio runs GUI element
    callbacks; fail if it does not return (a callback that takes the lock again deadlocks)."""
    errors = []

    def body():
        with viewer.train_lock:
            try:
                fn(*args)
            except BaseException as err:  # reported below
                errors.append(err)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), f"{fn} did not return while the viewer held the train lock: deadlock"
    if errors:
        raise errors[0]


@slow
def test_element_callbacks_run_inside_the_train_lock(loaded, panel, viewer, tmp_path):
    from nerfstudio.viewer.viewer_elements import ViewerClick

    # "Click to select" registers the pointer callback once, unticking removes it
    panel.click_mode.value = True
    run_as_viewer_callback(viewer, panel.click_mode.cb_hook, panel.click_mode)
    run_as_viewer_callback(viewer, panel.click_mode.cb_hook, panel.click_mode)
    assert viewer.registered == [("click", panel._on_click)]
    panel.click_mode.value = False
    run_as_viewer_callback(viewer, panel.click_mode.cb_hook, panel.click_mode)
    assert viewer.registered[-1] == ("removed", None) and not panel._click_registered

    # a click (pointer callbacks are not wrapped by the viewer: the panel takes the lock itself)
    oid = entity_id(loaded, "objects", OBJECT)
    x, y = deepest_pixel(gt(loaded, 0, "objects") == oid)
    held = []
    original = panel.add_click_at_pixel

    def spy(camera, px, py):
        held.append(viewer.train_lock.locked())
        return original(camera, px, py)

    panel.add_click_at_pixel = spy
    try:
        panel._on_click(ViewerClick(origin=(0, 0, 0), direction=(0, 0, -1),
                                    screen_pos=((x + 0.5) / RES, (y + 0.5) / RES)))
    finally:
        del panel.add_click_at_pixel
    assert held == [True] and not viewer.train_lock.locked()
    assert panel.clicks == [{"x": x, "y": y, "scale": 0.5}]
    assert viewer.rerenders >= 1

    # buttons: export and clear run under the lock without taking it again
    panel.export_dir = tmp_path / "exports"
    run_as_viewer_callback(viewer, panel.export_button.cb_hook, panel.export_button)
    plys = list((tmp_path / "exports").glob("selection_*/selection.ply"))
    assert len(plys) == 1, panel.last_message
    run_as_viewer_callback(viewer, panel.clear_button.cb_hook, panel.clear_button)
    assert panel.clicks == [] and panel.click_features is None


@slow
def test_masks_button_renders_every_training_view_in_a_thread(loaded, panel, viewer, tmp_path):
    """The button returns at once (it runs inside the viewer's lock); its thread takes the lock per view and writes
    one PNG per training view, equal to the selection's 2D segment of that view."""
    from PIL import Image

    v, _ = click_object(loaded, panel)
    panel.export_dir = tmp_path / "exports"
    before = {t.ident for t in threading.enumerate()}
    run_as_viewer_callback(viewer, panel.masks_button.cb_hook, panel.masks_button)
    workers = [t for t in threading.enumerate() if t.name == "pepe-masks" and t.ident not in before]
    assert len(workers) == 1
    workers[0].join(timeout=300)
    assert not workers[0].is_alive()
    folders = list((tmp_path / "exports").glob("masks_*"))
    assert len(folders) == 1
    pngs = sorted(folders[0].glob("*.png"))
    assert [p.stem for p in pngs] == sorted(loaded.stems)
    written = np.asarray(Image.open(folders[0] / f"{loaded.stems[v]}.png")) > 127
    assert np.array_equal(written, seg(panel, loaded, v))
    assert f"wrote {len(loaded.stems)} masks" in panel.last_message


@slow
def test_render_masks_writes_the_2d_segments(loaded, panel, tmp_path):
    from PIL import Image

    names = [f"{stem}.png" for stem in loaded.stems[:3]]
    assert panel.render_masks(loaded.cameras[:3], names, tmp_path / "none") == []
    click_object(loaded, panel)
    paths = panel.render_masks(loaded.cameras[:3], names, tmp_path / "masks")
    assert [p.name for p in paths] == names
    for i, path in enumerate(paths):
        png = np.asarray(Image.open(path))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(png > 127, seg(panel, loaded, i))


@slow
def test_decomposition_runs_in_the_background_when_the_viewer_shows_it(loaded, panel, viewer):
    model = loaded.model
    panel.decomposition_async = True
    cam = loaded.cameras[0:1]
    # not shown: no clustering at all, the output is the feature picture
    out = model.get_outputs_for_camera(cam)
    assert torch.equal(out["decomposition"], out["feature_pca"]) and not panel._decomp_jobs
    # shown: the first render starts the job and shows the feature picture until the clusters are ready
    viewer.control_panel.output_render = "decomposition"
    out = model.get_outputs_for_camera(cam)
    assert torch.equal(out["decomposition"], out["feature_pca"])
    job = panel._decomp_jobs[0.5]
    job.join(timeout=300)
    assert not job.is_alive() and 0.5 in panel._decomp
    assert viewer.rerenders >= 1  # the finished job asks the viewer for a new frame
    ready = model.get_outputs_for_camera(cam)
    assert not torch.allclose(ready["decomposition"], ready["feature_pca"])
    assert len(panel._decomp_jobs) == 1  # one job per scale


def test_viewer_finds_the_panel_elements_without_recursing():
    """nerfstudio's viewer collects GUI elements and ViewerControls by walking the public attributes of the pipeline
    that are nn.Modules (``parse_object``). The panel holds its model without exposing it, so the walk ends and
    finds every element once, under "Custom Elements/model/segmentation_panel" (fast: no run needed)."""
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement
    from torch import nn

    from pepeseg3d_ns.viewer.controls import SegmentationPanel

    pipeline = nn.Module()
    pipeline.model = nn.Module()
    pipeline.model.segmentation_panel = SegmentationPanel(pipeline.model)
    panel = pipeline.model.segmentation_panel
    elements = dict(parse_object(pipeline, ViewerElement, "Custom Elements"))
    stub = "Custom Elements/model/segmentation_panel"
    assert elements == {f"{stub}/scale": panel.scale, f"{stub}/threshold": panel.threshold,
                        f"{stub}/click_mode": panel.click_mode, f"{stub}/clear_button": panel.clear_button,
                        f"{stub}/show": panel.show, f"{stub}/export_button": panel.export_button,
                        f"{stub}/masks_button": panel.masks_button}
    controls = parse_object(pipeline, ViewerControl, "Custom Elements")
    assert [c for _, c in controls] == [panel.viewer_control]
    assert {e.name for e in elements.values()} == {
        "Scale", "Similarity threshold", "Click to select", "Clear selection", "3D view", "Export selection (.ply)",
        "Render masks of training views"}
