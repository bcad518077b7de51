"""Click-to-segment end to end in a real browser: ``ns-viewer --load-config`` on a short pepe-contrast run of the
synthetic tabletop scene, opened in headless Chromium (tests/browser.py), driven like a user: tick "Click to select",
click the snowman on the 3D canvas, switch **Output type** to ``segmentation`` / ``segment`` / ``decomposition`` and
the "3D view" filter, and compare what the browser shows with the scene's ground truth.

To know where the snowman is on the canvas, the viewer process gets one test-only button (the way
``browser.attach_click_probe`` adds its GUI): "Go to training view" puts every client's camera on a training camera
(position, orientation, vertical field of view). A training pixel ``(x, y)`` is then at canvas pixel
``(w/2 + (x + 0.5 - cx) * h/H, h/2 + (y + 0.5 - cy) * h/H)`` for a ``w x h`` canvas and an ``H``-pixel-high
training image (same vertical field of view, square pixels).

Needs Debian's chromium and the playwright package (``bash scripts/install_system_deps.sh``): without them the test
fails when ``CI`` is set and is skipped otherwise (``browser.require_browser``).

``python tests/test_viewer_contrast_browser.py --load-config RUN/config.yml --output shot.png`` runs the same steps
on a finished pepe-contrast run of a synthetic scene and saves the page with the segmentation
(``docs/images/viewer_segmentation.png`` was made that way).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pytest

from browser import TESTS_DIR, ViewerPage, ViewerServer, require_browser, serve_and_open

pytestmark = pytest.mark.slow

VIEWPORT = (1200, 800)
MAX_RES = 256
VIEW_ENV = "PEPESEG3D_TEST_VIEW"
GO_BUTTON = "Go to training view"
OBJECT = "snowman"


# ----------------------------------------------------------------------------------------------- viewer process


def attach_go_to_view(model, pipeline, view: int) -> None:
    """Test-only GUI on ``model``: a button that moves every viewer client's camera onto training camera ``view``
    (nerfstudio's OpenGL camera-to-world -> viser's OpenCV orientation, as nerfstudio draws its frustums)."""
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
    from nerfstudio.viewer.viewer_elements import ViewerButton, ViewerControl

    control = ViewerControl()
    camera = pipeline.datamanager.train_dataset.cameras[view]
    c2w = camera.camera_to_worlds.cpu().numpy().astype(np.float64)  # [3, 4]
    wxyz = (vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)).wxyz
    fov = 2.0 * math.atan(float(camera.cy) / float(camera.fy))  # vertical

    def go(_) -> None:
        for client in control.viser_server.get_clients().values():
            with client.atomic():
                client.camera.fov = fov
                client.camera.position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO
                client.camera.wxyz = wxyz

    model.test_view_control = control
    model.test_go_to_view = ViewerButton(GO_BUTTON, cb_hook=go)


def _run_viewer_with_view_button() -> None:
    """``ns-viewer`` (arguments from ``sys.argv``) with :func:`attach_go_to_view` for view ``$PEPESEG3D_TEST_VIEW``."""
    from nerfstudio.scripts.viewer import run_viewer

    start = run_viewer._start_viewer

    def start_with_button(config, pipeline, step):
        attach_go_to_view(pipeline.model, pipeline, int(os.environ[VIEW_ENV]))
        return start(config, pipeline, step)

    run_viewer._start_viewer = start_with_button
    run_viewer.entrypoint()


class ContrastViewerServer(ViewerServer):
    """:class:`browser.ViewerServer` whose viewer has the "Go to training view" button for training view ``view``."""

    def __init__(self, config_path: Path, view: int, **kw):
        env = {"CUDA_VISIBLE_DEVICES": "", **kw.pop("env", {}), VIEW_ENV: str(view)}
        super().__init__(config_path, env=env, **kw)

    def command(self):
        code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_viewer_contrast_browser as t; "
                "t._run_viewer_with_view_button()")
        return [sys.executable, "-c", code, "--load-config", str(self.config_path),
                "--viewer.websocket-port", str(self.port), "--viewer.websocket-host", self.host, *self.extra_args]


@contextlib.contextmanager
def open_contrast_viewer(config_path: Path, view: int, log_path: Optional[Path] = None,
                         viewport: Tuple[int, int] = VIEWPORT) -> Iterator[Tuple[ViewerServer, ViewerPage]]:
    """Like :func:`browser.open_viewer`, with :class:`ContrastViewerServer`: everything is torn down on the way out,
    and the viewer's log tail and the browser console are printed when the body raises."""
    server = ContrastViewerServer(config_path, view, log_path=log_path)
    with serve_and_open(server, viewport, start_timeout_s=300, timeout_s=120) as opened:
        yield opened


# ----------------------------------------------------------------------------------------------- geometry


def canvas_to_training(w: float, h: float, height: int, cx: float, cy: float) -> Tuple[np.ndarray, np.ndarray]:
    """For every canvas pixel of a ``w x h`` canvas showing a training camera (``height`` px high, principal point
    ``(cx, cy)``), the training pixel it falls in: ``(cols, rows)`` int arrays ``[h, w]`` (outside the image: out
    of ``[0, W)`` / ``[0, H)``)."""
    k = height / h
    u = (np.arange(int(w)) + 0.5 - w / 2) * k + cx
    v = (np.arange(int(h)) + 0.5 - h / 2) * k + cy
    cols, rows = np.meshgrid(np.floor(u).astype(int), np.floor(v).astype(int))
    return cols, rows


def training_to_canvas(x: float, y: float, w: float, h: float, height: int, cx: float,
                       cy: float) -> Tuple[float, float]:
    """Canvas pixel (CSS px from the top-left corner) showing the centre of training pixel ``(x, y)``."""
    k = h / height
    return w / 2 + (x + 0.5 - cx) * k, h / 2 + (y + 0.5 - cy) * k


def gt_on_canvas(mask: np.ndarray, w: float, h: float, cx: float, cy: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(mask_on_canvas, inside)``: the training-view mask ``[H, W]`` resampled to the canvas, and where the canvas
    shows the training image at all (both ``bool [h, w]``)."""
    H, W = mask.shape
    cols, rows = canvas_to_training(w, h, H, cx, cy)
    inside = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H)
    out = np.zeros(cols.shape, dtype=bool)
    out[inside] = mask[rows[inside], cols[inside]]
    return out, inside


def _resize_to(img: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == shape:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.NEAREST))


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - _resize_to(b, a.shape[:2]).astype(np.int16)).mean())


def _wait_settled(page: ViewerPage, accept, what: str, timeout_s: float) -> np.ndarray:
    """Poll settled full-resolution frames (:meth:`ViewerPage.wait_for_render`) until ``accept(frame)``; return it.
    Raises ``TimeoutError`` naming ``what`` and the last state after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    state = "no settled frame yet"
    while time.monotonic() < deadline:
        try:
            img = page.wait_for_render(timeout_s=max(deadline - time.monotonic(), 1.0))
        except TimeoutError as err:
            state = str(err)
            continue
        ok, state = accept(img)
        if ok:
            return img
        time.sleep(0.3)
    raise TimeoutError(f"waiting for {what}: {state} after {timeout_s:.0f} s")


def wait_for_settled_change(page: ViewerPage, reference: np.ndarray, min_diff: float = 8.0, timeout_s: float = 90.0,
                            what: str = "a new picture") -> np.ndarray:
    """Wait until a *settled* full-resolution frame differs from ``reference`` by a mean absolute value
    >= ``min_diff`` and return it. (``ViewerPage.wait_for_change`` also accepts a passing low-resolution frame,
    which every re-render sends first.)"""
    def accept(img):
        diff = _mean_abs_diff(img, reference)
        return diff >= min_diff, f"settled frames within {diff:.2f} < {min_diff} of the reference"

    return _wait_settled(page, accept, what, timeout_s)


def wait_for_settled_match(page: ViewerPage, reference: np.ndarray, max_diff: float = 3.0, timeout_s: float = 90.0,
                           what: str = "the reference picture") -> np.ndarray:
    """Wait until a settled full-resolution frame is within a mean absolute difference ``max_diff`` of
    ``reference`` and return it."""
    def accept(img):
        diff = _mean_abs_diff(img, reference)
        return diff <= max_diff, f"settled frames {diff:.2f} > {max_diff} from the reference"

    return _wait_settled(page, accept, what, timeout_s)


# ----------------------------------------------------------------------------------------------- the user's steps


def pick_click(scene: Path, config_path: Path, name: str = OBJECT) -> Dict:
    """From the synthetic scene's ground truth: the training view (index into the run's training cameras, as the
    viewer loads them) where object ``name`` is largest, its GT mask there and the mask's deepest pixel ``(x, y)``;
    plus that camera's principal point ``cx, cy``."""
    from nerfstudio.utils.eval_utils import eval_setup
    from scipy import ndimage

    from pepeseg3d_ns.data.synthetic import load_gt_masks, load_hierarchy

    _, pipeline, _, _ = eval_setup(Path(config_path), test_mode="test")
    dataset = pipeline.datamanager.train_dataset
    stems = [Path(p).stem for p in dataset.image_filenames]
    oid = [e["id"] for e in load_hierarchy(scene)["objects"] if e["name"] == name][0]
    areas = [int((load_gt_masks(scene, s, "objects") == oid).sum()) for s in stems]
    view = int(np.argmax(areas))
    mask = load_gt_masks(scene, stems[view], "objects") == oid
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), mask.shape)
    cam = dataset.cameras[view]
    return {"view": view, "stem": stems[view], "mask": mask, "x": int(x), "y": int(y),
            "cx": float(cam.cx), "cy": float(cam.cy)}


def segment_in_browser(config_path: Path, click: Dict, shots: Path, log_path: Optional[Path] = None,
                       max_clicks: int = 20, scale: Optional[float] = None) -> Dict[str, np.ndarray]:
    """Start the viewer on ``config_path``, go to the clicked training view, (set the **Scale** slider to ``scale``,)
    tick "Click to select", click the object at ``click`` (from :func:`pick_click`) and look at the outputs. Saves
    page screenshots into ``shots`` (``viewer_segmentation.png`` and one per output) and returns the canvas images
    by name."""
    shots = Path(shots)
    shots.mkdir(parents=True, exist_ok=True)
    images: Dict[str, np.ndarray] = {}
    with open_contrast_viewer(config_path, click["view"], log_path=log_path) as (_, page):
        labels = page.gui_labels()
        for label in ("Scale", "Similarity threshold", "Click to select", "3D view"):
            assert label in labels, labels
        page.set_slider("Max res", MAX_RES)
        page.press_button("Hide Train Cams")  # a frustum would sit right in front of the camera and catch clicks
        page.wait_for_text(r"^Show Train Cams$")
        first = page.wait_for_render()
        page.press_button(GO_BUTTON)
        images["rgb"] = wait_for_settled_change(page, first, what="the training view")
        _, _, w, h = page.canvas_box()

        if scale is not None:
            page.set_slider("Scale", scale)
        page.select_dropdown("Output type", "segmentation")  # no click yet: the overlay is the rgb picture
        page.wait_for_render()
        page.page.get_by_label("Click to select", exact=True).check()
        page.wait_for_render()
        u, v = training_to_canvas(click["x"], click["y"], w, h, click["mask"].shape[0], click["cx"], click["cy"])
        for _ in range(max_clicks):  # the "listen for clicks" message reaches the browser asynchronously
            page.click_canvas(u, v)
            try:
                images["segmentation"] = wait_for_settled_change(page, images["rgb"], min_diff=4.0, timeout_s=4.0,
                                                                 what="the segmentation")
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError(f"the segmentation never appeared after {max_clicks} clicks at canvas "
                                 f"({u:.0f}, {v:.0f})")
        page.screenshot(shots / "viewer_segmentation.png")

        page.select_dropdown("Output type", "segment")
        images["segment"] = wait_for_settled_change(page, images["segmentation"], min_diff=3.0, what="segment")
        page.select_dropdown("Output type", "feature_pca")
        images["feature_pca"] = wait_for_settled_change(page, images["segment"], what="feature_pca")
        page.screenshot(shots / "viewer_feature_pca.png")
        # the decomposition shows the feature picture until its clusters (HDBSCAN, background thread) are ready
        page.select_dropdown("Output type", "decomposition")
        images["decomposition"] = wait_for_settled_change(page, images["feature_pca"], timeout_s=240,
                                                          what="the decomposition")
        page.screenshot(shots / "viewer_decomposition.png")

        page.select_dropdown("Output type", "rgb")
        wait_for_settled_change(page, images["decomposition"], what="rgb")
        page.select_dropdown("3D view", "only the selection")
        images["only_selection"] = wait_for_settled_change(page, images["rgb"], what="only the selection")
        page.screenshot(shots / "viewer_only_selection.png")
        # "Clear selection": no clicks left, so the filter draws every Gaussian again
        page.press_button("Clear selection")
        images["cleared"] = wait_for_settled_match(page, images["rgb"], what="all Gaussians after clearing")
    return images


# ----------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def browser_ready():
    require_browser()


@pytest.fixture(scope="module")
def contrast_run(browser_ready, tmp_path_factory):
    """The short tabletop run of tests/test_viewer_segmentation.py (trained once per session when both run)."""
    from test_viewer_segmentation import shared_tabletop_run

    return shared_tabletop_run(tmp_path_factory)



def test_click_to_segment_in_the_browser(contrast_run, tmp_path):
    from test_viewer_segmentation import OBJECT_SCALE

    scene, cfg = contrast_run
    click = pick_click(scene, cfg)
    images = segment_in_browser(cfg, click, tmp_path / "shots", log_path=tmp_path / "viewer.log", scale=OBJECT_SCALE)
    assert (tmp_path / "shots" / "viewer_segmentation.png").is_file()
    rgb = images["rgb"]
    H, W = rgb.shape[:2]
    mask, inside = gt_on_canvas(click["mask"], W, H, click["cx"], click["cy"])
    assert inside.mean() > 0.5  # the canvas shows the training view (its aspect ratio is wider)

    # the rgb picture is the training view: brighter where the GT says snowman (white) than around it
    grey = rgb.astype(np.float32).mean(-1)
    assert grey[mask].mean() > grey[inside & ~mask].mean() + 20

    # segmentation: a tinted overlay of the rgb picture, changed mostly on the snowman
    diff = np.abs(images["segmentation"].astype(np.int16) - rgb).max(-1) > 40
    changed_iou = (diff & mask).sum() / max((diff | mask).sum(), 1)
    # segment: the selected pixels alone (black elsewhere)
    lit = images["segment"].max(-1) > 40
    lit_iou = (lit & mask).sum() / max((lit | mask).sum(), 1)
    print(f"canvas {W}x{H}; IoU with the GT {OBJECT} on the canvas: tinted pixels {changed_iou:.3f}, "
          f"segment pixels {lit_iou:.3f}")
    assert changed_iou >= 0.5 and lit_iou >= 0.5  # measured 0.849 and 0.789 (880x749 canvas)

    # feature_pca and decomposition differ from each other and from the rgb picture
    for name in ("feature_pca", "decomposition"):
        assert images[name].std() > 5.0, name
        assert _mean_abs_diff(images[name], rgb) > 10.0, name
    assert _mean_abs_diff(images["decomposition"], images["feature_pca"]) > 8.0

    # 3D view "only the selection": the snowman stays, most of the rest of the scene is gone
    only = images["only_selection"].astype(np.int16)
    kept = np.abs(only - rgb).max(-1) < 40
    assert kept[mask].mean() > 0.6 and kept[inside & ~mask].mean() < 0.5


# ----------------------------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    """Run the browser steps on a finished pepe-contrast run of a synthetic scene and save the segmentation page."""
    import argparse
    import shutil

    from browser import browser_missing_reason

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--load-config", type=Path, required=True, help="pepe-contrast run's config.yml")
    parser.add_argument("--output", type=Path, required=True, help="PNG of the page with the segmentation")
    parser.add_argument("--object", default=OBJECT, help="object (GT name) to click")
    parser.add_argument("--scale", type=float, default=None, help="set the Scale slider first (default: 0.5)")
    args = parser.parse_args(argv)
    reason = browser_missing_reason()
    if reason:
        parser.exit(1, f"{reason}\n")
    import yaml

    config = yaml.load(args.load_config.read_text(), Loader=yaml.Loader)
    scene = Path(config.pipeline.datamanager.data or config.data)
    click = pick_click(scene, args.load_config, args.object)
    shots = args.output.parent / f".{args.output.stem}_shots_{int(time.time())}"
    segment_in_browser(args.load_config, click, shots, scale=args.scale)
    shutil.copyfile(shots / "viewer_segmentation.png", args.output)
    print(f"wrote {args.output} (other outputs in {shots})")


if __name__ == "__main__":
    main()
