"""Click-to-segment in the nerfstudio viewer (``ns-train pepe-contrast`` and ``ns-viewer --load-config`` of a
pepe-contrast run).

:class:`SegmentationPanel` is a module attribute of the pepe-contrast model, so nerfstudio's viewer finds its GUI
elements (folder "Custom Elements/segmentation_panel") and its :class:`ViewerControl` (clicks):

* **Scale** slider (0 = finest parts, 1 = whole groups), **Similarity threshold** slider;
* **Click to select** checkbox: while on, a click in the 3D view takes the clicked pixel's feature as a query;
  more clicks add queries (union). **Clear selection** removes them;
* **3D view**: all Gaussians / only the selected ones / all but the selected ones;
* **Export selection (.ply)** writes the selected Gaussians as a 3DGS PLY with their indices;
  **Render masks of training views** writes the 2D selection of every training view (in a background thread).

The render dropdown ("Output type") gains ``segmentation`` (overlay on RGB), ``segment`` (the segment alone),
``feature_pca`` (features at the current scale) and ``decomposition`` (HDBSCAN clusters at the current scale,
computed once per scale off the render path and cached).

A click stores the clicked pixel's *ungated* feature ``F(p)``; the query at the slider's scale ``s`` is
``psi(s) * F(p)``, exactly the clicked pixel's gated feature at ``s``, so moving the slider re-segments from the
same clicks.

Locking: nerfstudio runs the GUI elements' callbacks (sliders, checkbox, buttons) while holding the viewer's
``train_lock`` (a non-reentrant ``threading.Lock``), so they never take it again; the pointer (click) callback is not
wrapped and takes it itself, and the mask-writing thread takes it once per view. The decomposition thread clusters a
rendered snapshot and does not need it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as Fnn
from torch import Tensor, nn

from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerClick,
    ViewerControl,
    ViewerDropdown,
    ViewerSlider,
)

SHOW_ALL, SHOW_SELECTED, HIDE_SELECTED = "all Gaussians", "only the selection", "all but the selection"


class SegmentationPanel(nn.Module):
    """Viewer controls and segmentation state of a pepe-contrast model (see the module docstring).

    Everything also works without a viewer (tests, scripts): :meth:`add_click_at_pixel`, :meth:`clear`,
    :meth:`segment`, :meth:`selected_gaussians`, :meth:`export`.
    """

    def __init__(self, model, export_dir: Path = Path("pepe_selections"), scale: float = 0.5, threshold: float = 0.7):
        super().__init__()
        self._model_ref = [model]  # a list, so nn.Module does not register the model as a submodule (a cycle)
        self.export_dir = Path(export_dir)
        self.click_features: Optional[Tensor] = None  # ungated [Q, D]
        self.clicks: List[Dict] = []
        self._selection_cache: Optional[Tuple] = None
        self._decomp: Dict[float, object] = {}
        self._decomp_jobs: Dict[float, threading.Thread] = {}
        self.decomposition_async = True
        self.last_message = ""
        self.viewer_control = ViewerControl()
        self.scale = ViewerSlider("Scale", scale, 0.0, 1.0, 0.01, hint="0 = finest parts, 1 = whole groups")
        self.threshold = ViewerSlider("Similarity threshold", threshold, 0.0, 1.0, 0.01,
                                      hint="cosine similarity to a clicked feature")
        self.click_mode = ViewerCheckbox("Click to select", False, cb_hook=self._on_click_mode,
                                         hint="each click adds the clicked pixel's feature as a query")
        self.clear_button = ViewerButton("Clear selection", cb_hook=lambda _: self.clear())
        self.show = ViewerDropdown("3D view", SHOW_ALL, [SHOW_ALL, SHOW_SELECTED, HIDE_SELECTED])
        self.export_button = ViewerButton("Export selection (.ply)", cb_hook=lambda _: self.export())
        self.masks_button = ViewerButton("Render masks of training views",
                                         cb_hook=lambda _: self._masks_in_background())
        self._click_registered = False

    # ------------------------------------------------------------------ plumbing
    @property
    def _model(self):
        # private on purpose: nerfstudio's viewer collects GUI elements by walking every public attribute of the
        # pipeline that is an nn.Module (nerfstudio.viewer.utils.parse_object); a public ``model`` here would lead
        # it from the model to this panel and back forever (RecursionError when ns-viewer starts)
        return self._model_ref[0]

    def _lock(self):
        viewer = getattr(self.viewer_control, "viewer", None)
        lock = getattr(viewer, "train_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def _on_click_mode(self, element) -> None:
        if element.value and not self._click_registered and hasattr(self.viewer_control, "viser_server"):
            self.viewer_control.register_pointer_cb("click", self._on_click)
            self._click_registered = True
        elif not element.value and self._click_registered:
            self.viewer_control.unregister_pointer_cb()
            self._click_registered = False

    def _rerender(self) -> None:
        viewer = getattr(self.viewer_control, "viewer", None)
        if viewer is not None and hasattr(viewer, "_trigger_rerender"):
            viewer._trigger_rerender()

    @property
    def current_scale(self) -> float:
        return float(self.scale.value)

    @property
    def current_threshold(self) -> float:
        return float(self.threshold.value)

    # ------------------------------------------------------------------ queries
    def _on_click(self, click: ViewerClick) -> None:
        """Viewer pointer callback: the clicked pixel of the current view becomes a query."""
        clients = self.viewer_control.viser_server.get_clients()
        if not clients:
            return
        aspect = float(list(clients.values())[0].camera.aspect)
        H = int(getattr(self._model, "last_size", (256, 256))[0] or 256)
        H = max(64, min(H, 512))
        W = max(1, int(round(H * aspect)))
        camera = self.viewer_control.get_camera(H, W)
        if camera is None:
            return
        x, y = click.screen_pos[0] * W, click.screen_pos[1] * H
        with self._lock():
            self.add_click_at_pixel(camera, x, y)
        self._rerender()

    @torch.no_grad()
    def add_click_at_pixel(self, camera, x: float, y: float) -> bool:
        """Add the feature of pixel ``(x, y)`` (column, row) of ``camera`` (nerfstudio Cameras [1]) as a query.
        Returns False (and adds nothing) when the pixel shows empty space (accumulation < 0.5)."""
        from pepeseg3d_ns.contrast.query import render_view

        view = render_view(self._model, camera)
        H, W = view.shape
        col, row = int(x), int(y)
        if not (0 <= col < W and 0 <= row < H):
            raise ValueError(f"pixel ({x}, {y}) is outside the {W}x{H} view")
        if float(view.accumulation[row, col]) < 0.5:
            self.last_message = f"click at ({col}, {row}) hit empty space: ignored"
            return False
        feat = view.features[row, col][None].detach()
        self.click_features = feat if self.click_features is None else torch.cat([self.click_features, feat])
        self.clicks.append({"x": col, "y": row, "scale": self.current_scale})
        self._selection_cache = None
        self.last_message = f"{len(self.clicks)} click(s)"
        return True

    def clear(self) -> None:
        """Remove every query."""
        self.click_features = None
        self.clicks = []
        self._selection_cache = None
        self._rerender()

    def queries(self, scale: Optional[float] = None) -> Optional[Tensor]:
        """Unit-norm gated queries ``[Q, D]`` at ``scale`` (default: the slider's), or None without clicks."""
        if self.click_features is None:
            return None
        s = self.current_scale if scale is None else float(scale)
        return Fnn.normalize(self.click_features * self._model.gate(s), dim=-1)

    # ------------------------------------------------------------------ 2D / 3D segments
    @torch.no_grad()
    def segment(self, view, scale: Optional[float] = None, threshold: Optional[float] = None) -> Optional[Tensor]:
        """``bool [H, W]`` segment of the queries in ``view`` (a :class:`FeatureView`), or None without clicks."""
        from pepeseg3d_ns.contrast.query import segment_view

        q = self.queries(scale)
        if q is None:
            return None
        s = self.current_scale if scale is None else float(scale)
        t = self.current_threshold if threshold is None else float(threshold)
        return segment_view(view, s, q, t)

    @torch.no_grad()
    def selected_gaussians(self) -> Optional[Tensor]:
        """``bool [N]`` Gaussians matching the queries at the current scale and threshold (cached)."""
        from pepeseg3d_ns.contrast.query import select_gaussians

        q = self.queries()
        if q is None:
            return None
        # the training step is part of the key: during ns-train the features change under a fixed selection
        key = (self.current_scale, self.current_threshold, len(self.clicks), self._model.num_points,
               getattr(self._model, "step", 0))
        if self._selection_cache is None or self._selection_cache[0] != key:
            self._selection_cache = (key, select_gaussians(self._model, self.current_scale, q, self.current_threshold))
        return self._selection_cache[1]

    def visible_mask(self) -> Optional[Tensor]:
        """``bool [N]`` Gaussians to render under the "3D view" setting (None = all). Without clicks, and when the
        setting would leave no Gaussian at all (e.g. "only the selection" at a threshold nothing passes), every
        Gaussian is drawn: the renderers reject an empty set of Gaussians."""
        mode = self.show.value
        if mode == SHOW_ALL:
            return None
        sel = self.selected_gaussians()
        if sel is None:
            return None
        visible = sel if mode == SHOW_SELECTED else ~sel
        if not bool(visible.any()):
            self.last_message = f"3D view '{mode}' would draw no Gaussian at this scale and threshold: drawing all"
            return None
        return visible

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def outputs(self, view, rgb: Tensor) -> Dict[str, Tensor]:
        """Extra viewer outputs for one rendered view: ``segmentation``, ``segment``, ``feature_pca``,
        ``decomposition`` (all ``[H, W, 3]`` in [0, 1])."""
        from pepeseg3d_ns.contrast.pca import feature_pca
        from pepeseg3d_ns.segment import overlay

        s = self.current_scale
        gated = view.at_scale(s)
        pca = feature_pca(gated)
        mask = self.segment(view)
        rgb_np = rgb.detach().cpu().numpy()
        if mask is None:
            seg = rgb.detach()
            alone = torch.zeros_like(rgb)
        else:
            m = mask.cpu().numpy()
            seg = torch.from_numpy(overlay(rgb_np, m)).float().div(255).to(rgb.device)
            alone = rgb.detach() * mask[..., None].to(rgb)
        return {"segmentation": seg, "segment": alone, "feature_pca": pca.to(rgb.device),
                "decomposition": self._decomposition_image(view, s, pca).to(rgb.device)}

    def _decomposition_wanted(self) -> bool:
        """Whether a viewer shows the decomposition output (only then is HDBSCAN started in the background)."""
        panel = getattr(getattr(self.viewer_control, "viewer", None), "control_panel", None)
        if panel is None:
            return False
        return "decomposition" in (getattr(panel, "output_render", None), getattr(panel, "split_output_render", None))

    def _decomposition_image(self, view, s: float, fallback: Tensor) -> Tensor:
        from pepeseg3d_ns.decompose import fit_decomposition

        key = round(s, 2)
        dec = self._decomp.get(key)
        if dec is None:
            if not self.decomposition_async:
                dec = self._decomp[key] = fit_decomposition([view], key)
            else:
                if not self._decomposition_wanted():
                    return fallback
                if key not in self._decomp_jobs:
                    t = threading.Thread(target=self._decomposition_job, args=(view, key), daemon=True,
                                         name=f"pepe-decomposition-{key}")
                    # started before it is registered: the viewer may interrupt this render thread at any line
                    # (IOChangeException from its trace function); a job registered but never started would
                    # leave this scale without clusters for good, a second start only repeats the work
                    t.start()
                    self._decomp_jobs[key] = t
                return fallback  # until the clusters of this scale are ready
        img = dec.colorize(dec.label(view.at_scale(key)), view.accumulation)
        return torch.from_numpy(img).float().div(255)

    def _decomposition_job(self, view, key: float) -> None:
        """Background thread body: cluster ``view`` at scale ``key`` and ask the viewer for a new frame."""
        from pepeseg3d_ns.decompose import fit_decomposition

        try:
            self._decomp[key] = fit_decomposition([view], key)
        except Exception as err:  # shown in last_message; the feature picture stays
            self.last_message = f"decomposition at scale {key} failed: {type(err).__name__}: {err}"
            return
        self._rerender()

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Optional[Path] = None) -> Optional[Dict[str, Path]]:
        """Write the selection (3DGS PLY, indices, JSON) to ``out_dir`` (default ``export_dir/selection_<time>``).
        Nothing is written, and None returned with the reason in :attr:`last_message`, when nothing is clicked or
        the clicks select no Gaussian at the current scale and threshold."""
        from pepeseg3d_ns.export import EmptySelectionError, save_selection

        sel = self.selected_gaussians()
        if sel is None:
            self.last_message = "nothing selected: click on the scene first"
            return None
        out_dir = Path(out_dir) if out_dir is not None else self.export_dir / time.strftime("selection_%Y%m%d_%H%M%S")
        meta = {"clicks": self.clicks, "scale": self.current_scale, "threshold": self.current_threshold}
        try:
            paths = save_selection(out_dir, self._model, sel, meta)
        except EmptySelectionError:
            self.last_message = (f"nothing exported: no Gaussian passes similarity threshold {self.current_threshold:.2f} "
                                 f"at scale {self.current_scale:.2f}; lower the threshold or click elsewhere")
            CONSOLE.print(f"[yellow]{self.last_message}")
            return None
        self.last_message = f"exported {int(sel.sum())} Gaussians to {paths['ply']}"
        return paths

    def render_masks(self, cameras, names, out_dir: Path) -> List[Path]:
        """Masks of the current selection in every camera of ``cameras`` as PNGs named after ``names``."""
        from pepeseg3d_ns.export import save_masks
        from pepeseg3d_ns.segment import masks_for_views

        q = self.queries()
        if q is None:
            return []
        masks = masks_for_views(self._model, cameras, self.current_scale, q, self.current_threshold, progress=False)
        return save_masks(out_dir, masks, names)

    def _masks_in_background(self) -> None:
        viewer = getattr(self.viewer_control, "viewer", None)
        pipeline = getattr(viewer, "pipeline", None)
        if pipeline is None or self.click_features is None:
            return
        dataset = pipeline.datamanager.train_dataset
        names = [Path(p).name for p in dataset.image_filenames]
        out = self.export_dir / time.strftime("masks_%Y%m%d_%H%M%S")

        def job():
            from pepeseg3d_ns.export import save_masks
            from pepeseg3d_ns.segment import masks_for_views

            q, s, t = self.queries(), self.current_scale, self.current_threshold
            for i in range(len(dataset.cameras)):  # one view per lock: rendering and training go on in between
                with self._lock():
                    mask = masks_for_views(self._model, dataset.cameras, s, q, t, [i], progress=False)
                save_masks(out, mask, [names[i]])
            self.last_message = f"wrote {len(names)} masks to {out}"

        threading.Thread(target=job, daemon=True, name="pepe-masks").start()
