"""``pepe-contrast``: PePESeg3D stage 2, multi-scale Gaussian features learned on frozen pepe-recon geometry.

Every Gaussian ``i`` carries a feature ``f_i`` in R^32. Before rendering, features are smoothed in 3D: each is
averaged with its 16 nearest neighbours (index built once from the frozen means,
:func:`pepeseg3d_ns.contrast.knn.knn_indices`). The smoothed features are alpha-blended like colours into an
*ungated* feature map ``F [H, W, 32]``; the scale gate ``psi(s)`` (:class:`~pepeseg3d_ns.contrast.gate.ScaleGate`,
two-layer MLP, sigmoid output) turns it into the scale-aware feature ``psi(s) * F(p)`` of pixel ``p`` at scale
``s`` in [0, 1]. Blending is linear, so ``render(psi(s) * f) = psi(s) * render(f)``: one render per step serves
every sampled scale, and each training pair carries its own scale.

One training view per step, ``num_sample_pixels`` (4000; the paper: 1000) pixels drawn mask-balanced among those
covered by a SAM mask with a known scale:

``Lcont = lambda_m * Lm + lambda_p * Lp + lambda_cU * Lc(U) + lambda_cL * Lc(L) + lambda_norm * L2D``

* ``Lm`` (eq. 3/8): :func:`~pepeseg3d_ns.contrast.losses.scale_contrastive_loss` on ``num_pairs`` pairs drawn by
  :func:`~pepeseg3d_ns.contrast.sampling.set_sample_pairs` (uniform scales and pairs, hard pairs over-sampled),
  weighted ``omega(p) omega(q)`` (eq. 7);
* ``Lp`` (eq. 4): :func:`~pepeseg3d_ns.contrast.losses.perception_loss`, one window partner per sampled pixel
  (:func:`~pepeseg3d_ns.contrast.perception.perception_pairs`: radius ``r(s)``, adaptive depth/colour thresholds);
* ``Lc`` (eq. 5): every ``centroid_every`` steps the rendered features of the views of the last
  ``centroid_views`` steps, gated at ``s = 1`` and ``s = 0``, are clustered (HDBSCAN on a bounded subsample,
  :func:`~pepeseg3d_ns.contrast.cluster.cluster_features`) in a background process while training goes on;
  ``centroid_lag`` steps later, at a fixed step, the cluster centres are merged into the global sets ``U`` and
  ``L`` (:class:`~pepeseg3d_ns.contrast.centroids.CentroidBank`, bounded, stale centres dropped). The first merge
  is at ``centroid_start``; from there every step pulls sampled pixels to their nearest centroid when its cosine
  exceeds ``tau``. Both sets are saved in the checkpoint;
* ``L2D``: ``mean((|F(p)| - 1)^2)`` over the sampled pixels of the ungated map.

The geometry (means, scales, quaternions, opacities, colours) comes from a pepe-recon checkpoint and is never
optimised; only ``gauss_features`` and the gate are. Camera convention: nerfstudio ``Cameras`` (OpenGL
camera-to-world), converted once in :func:`pepeseg3d_ns.render.cameras.viewmat_from_c2w`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from torch import Tensor
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation

from pepeseg3d_ns.recon.model import PepeSplatfactoModel, PepeSplatfactoModelConfig
from pepeseg3d_ns.render import rasterize
from pepeseg3d_ns.render.cameras import viewmat_from_c2w

GEOMETRY_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")


def resolve_recon_checkpoint(path: Union[str, Path, None]) -> Path:
    """The ``.ckpt`` file of a pepe-recon run given its ``config.yml``, its run folder, its ``nerfstudio_models``
    folder or the checkpoint itself (the latest step when there are several). Clear error when none exists."""
    from pepeseg3d_ns.errors import UserError, UserFileNotFoundError

    if path is None:
        raise UserError(
            "pepe-contrast needs the geometry of a finished pepe-recon run: pass "
            "--pipeline.model.recon-checkpoint outputs/<scene>/pepe-recon/<timestamp>/config.yml"
        )
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        return p
    folder = p.parent / "nerfstudio_models" if p.is_file() else (p if p.name == "nerfstudio_models" else p / "nerfstudio_models")
    ckpts = sorted(folder.glob("step-*.ckpt")) if folder.is_dir() else []
    if not ckpts:
        raise UserFileNotFoundError(
            f"No pepe-recon checkpoint found for --pipeline.model.recon-checkpoint {path} (looked for "
            f"{folder}/step-*.ckpt). Train stage 1 first: ns-train pepe-recon --data SCENE"
        )
    return ckpts[-1]


def recon_config_path(path: Union[str, Path]) -> Optional[Path]:
    """The ``config.yml`` of the pepe-recon run that ``path`` (see :func:`resolve_recon_checkpoint`) belongs to."""
    ckpt = resolve_recon_checkpoint(path)
    cfg = ckpt.parent.parent / "config.yml"
    return cfg if cfg.is_file() else None


def load_recon_geometry(path: Union[str, Path]) -> Tuple[Dict[str, Tensor], Path, int]:
    """Gaussian parameters (raw, as stored: log-scales, logit opacities, SH) of a pepe-recon checkpoint:
    ``{"means": [N, 3], "scales": [N, 3], "quats": [N, 4], "features_dc": [N, 3], "features_rest": [N, K, 3],
    "opacities": [N, 1]}``, the checkpoint path and its step. Gaussians with a NaN or infinite parameter are dropped
    with a warning (an error when none is left)."""
    from pepeseg3d_ns.errors import UserError
    from pepeseg3d_ns.runs import load_checkpoint

    ckpt = resolve_recon_checkpoint(path)
    # weights_only=True; a file that is not a checkpoint is "X is not a pepe-recon checkpoint (why)"
    state = load_checkpoint(ckpt, what="pepe-recon checkpoint")
    pipe = state["pipeline"]
    geometry = {}
    for key in GEOMETRY_KEYS:
        name = f"_model.gauss_params.{key}"
        if name not in pipe:
            raise UserError(f"{ckpt} is not a pepe-recon checkpoint (it has no {name}: another method's run?)")
        geometry[key] = pipe[name].float()
    finite = torch.ones(geometry["means"].shape[0], dtype=torch.bool)
    for t in geometry.values():
        finite &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        if n_bad == finite.numel():
            raise UserError(f"{ckpt}: every Gaussian has a NaN or infinite parameter; the pepe-recon run diverged")
        warnings.warn(f"{ckpt}: dropping {n_bad} of {finite.numel()} Gaussians with NaN or infinite parameters "
                      "(the pepe-recon run produced them; the rest of the geometry is used as is)")
        geometry = {k: v[finite] for k, v in geometry.items()}
    return geometry, ckpt, int(state.get("step", -1))


STAGE1_ONLY_FIELDS = (
    "warmup_length", "refine_every", "resolution_schedule", "cull_alpha_thresh", "cull_scale_thresh",
    "reset_alpha_every", "densify_grad_thresh", "use_absgrad", "densify_size_thresh", "n_split_samples",
    "sh_degree_interval", "cull_screen_size", "split_screen_size", "stop_screen_size_at", "random_init", "num_random",
    "random_scale", "ssim_lambda", "stop_split_at", "sh_degree", "use_scale_regularization", "max_gauss_ratio",
    "output_depth_during_training", "camera_optimizer", "use_bilateral_grid", "grid_shape", "enable_collider",
    "collider_params", "loss_coefficients", "eval_num_rays_per_chunk",
)
"""Splatfacto fields that do nothing on pepe-contrast's frozen geometry (densification, culling, the SH schedule,
the photometric loss, camera optimisation, ray-based options): kept with splatfacto's defaults, hidden from
``ns-train pepe-contrast --help`` and the command line."""


def _hide_inherited(*names: str):
    """Class decorator (applied before ``@dataclass``): re-declare the inherited dataclass fields ``names`` with
    the same default, annotated ``tyro.conf.Suppress`` so tyro neither lists nor parses them."""
    import dataclasses
    import typing

    import tyro

    def deco(cls):
        base = cls.__mro__[1]
        hints = typing.get_type_hints(base)
        fields = {f.name: f for f in dataclasses.fields(base)}
        annotations = cls.__dict__.get("__annotations__", {})
        for name in names:
            f = fields[name]
            annotations[name] = tyro.conf.Suppress[hints[name]]
            if f.default is not dataclasses.MISSING:
                setattr(cls, name, dataclasses.field(default=f.default))
            else:
                setattr(cls, name, dataclasses.field(default_factory=f.default_factory))
        cls.__annotations__ = annotations
        return cls

    return deco


@dataclass
@_hide_inherited(*STAGE1_ONLY_FIELDS)
class PepeContrastModelConfig(PepeSplatfactoModelConfig):
    """PePESeg3D stage 2 (see the module docstring). Paper symbols in brackets."""

    _target: Type = field(default_factory=lambda: PepeContrastModel)
    recon_checkpoint: Optional[Path] = None
    """The pepe-recon run whose geometry is frozen and segmented: its config.yml, run folder or .ckpt."""
    feature_dim: int = 32
    """Dimension of the per-Gaussian feature f."""
    gate_hidden: int = 32
    """Hidden width of the scale gate psi (two-layer MLP, sigmoid output)."""
    knn_k: int = 16
    """3D feature smoothing: each Gaussian's feature averaged with this many nearest neighbours (0 = off)."""
    num_sample_pixels: int = 4000
    """Pixels sampled per step (paper: 1000), drawn as pixel_sampling and pixel_region say."""
    pixel_sampling: Literal["uniform", "omega", "mask"] = "mask"
    """How the step's pixels are drawn: "uniform" (the paper's), "omega" (probability proportional to the pixel
    weight omega(p) of eq. 7) or "mask" (mask-balanced: a share mask_balance of the draws picks a mask uniformly,
    then a pixel in it)."""
    mask_balance: float = 0.5
    """With pixel_sampling "mask": share of the pixels drawn mask-first (the rest uniformly); 0 = uniform."""
    pixel_region: Literal["covered", "image"] = "image"
    """Where the step's pixels are drawn: "image" (anywhere, the paper's; Lm pairs only the ones inside a mask with
    a known scale, Lp / Lc / L2D use all) or "covered" (inside such a mask; every term uses them)."""
    num_pairs: int = 16384
    """Pixel pairs of Lm per step, each with its own uniform scale s (paper: 4096)."""
    hard_pair_fraction: float = 0.25
    """Share of the pairs reserved for hard pairs (same active label, no common finer mask); 0 = uniform only."""
    pixel_weighting: bool = True
    """Weight pairs by omega(p) omega(q) (eq. 7, inverse mean mask area, min-max to [1, 10]); False = all 1."""
    lambda_m: float = 1.0
    """[lambda_m] weight of the scale-aware contrastive loss Lm (0 = off)."""
    lm_normalisation: Literal["weight", "mean"] = "mean"
    """Lm's denominator: "mean" = the number of pairs (eq. 8), "weight" = the summed pair weight omega(p) omega(q)
    (a weighted average)."""
    lambda_p: float = 0.2
    """[lambda_p] weight of the perception loss Lp (0 = off)."""
    lambda_c_upper: float = 0.3
    """[lambda_c^U] weight of the centroid loss on the coarse set (features at s = 1)."""
    lambda_c_lower: float = 0.1
    """[lambda_c^L] weight of the centroid loss on the fine set (features at s = 0)."""
    lambda_norm: float = 1.0
    """Weight of L2D = mean((|F(p)| - 1)^2) (0 = off)."""
    centroid_start: int = 7000
    """Step from which the centroid loss runs: the first merge of centres (scaled with --max-num-iterations, reference
    10k)."""
    centroid_every: int = 200
    """Refresh the centroid sets every this many steps (scaled with --max-num-iterations, reference 10k)."""
    centroid_lag: int = 0
    """Steps from a refresh's clustering (started centroid_lag steps before each merge, run in the background) to the
    merge of its centres into U and L; 0 = cluster and merge in the same step, the paper's (scaled, reference 10k)."""
    centroid_views: int = 1
    """Views clustered together per refresh: pixels of the views rendered at the last this-many steps up to it."""
    centroid_worker: Literal["process", "inline"] = "process"
    """Where a refresh's HDBSCAN runs: "process" (a background process) or "inline" (in the step); same numbers."""
    centroid_max_size: int = 0
    """At most this many centroids per set; when full, a new one replaces the least recently matched (0 = no bound,
    the paper's)."""
    centroid_stale_after: int = 0
    """A centroid that no candidate has matched in this many refreshes is dropped (0 = never, the paper's)."""
    centroid_delta: float = 0.9
    """[delta] a candidate centroid merges (EMA) into an existing one above this cosine, else it is added."""
    centroid_tau: float = 0.9
    """[tau] a pixel is pulled to its nearest centroid when their cosine exceeds this."""
    lc_normalisation: Literal["confident", "all"] = "all"
    """Lc's denominator: "all" = every sampled pixel (eq. 5), "confident" = the pixels pulled (cosine > tau)."""
    centroid_momentum: float = 0.9
    """EMA momentum of centroid merging."""
    cluster_max_points: int = 5000
    """Pixels clustered by HDBSCAN per refresh, all views together (a random subsample of each view's covered pixels)."""
    cluster_min_size: int = 25
    """HDBSCAN min_cluster_size (pixels of the subsample)."""
    gate_init: Literal["hinge", "nested", "band"] = "band"
    """Initial scale gate psi: "hinge" (about 0.5 on every channel, the paper's), "nested" (channel c open below its
    own scale t_c) or "band" (channel c open in a band of scales around t_c)."""
    scale_power: float = 0.5
    """The gate's scale axis: a mask of quantile scale q (priors/scales.py) trains at s = q ** scale_power, and the
    viewer slider, ns-eval and the decomposition query the gate at that s; 1 = s = q (the paper's)."""
    gate_band_half_width: float = 0.1
    """With gate_init "band": half width w of each channel's band of scales (channel c starts open within about
    2w of its centre and shut 3w away from it)."""
    gate_warmup: int = 3000
    """Steps during which the scale gate psi is held at its initial value while the features organise (0 = trained
    from the first step, the paper's; scaled with --max-num-iterations, reference 10k)."""
    num_downscales: int = 0
    """Features are learned at full image resolution."""
    viewer_scale: float = 0.5
    """Initial value of the viewer's scale slider (the scale of the feature / segmentation outputs)."""
    export_dir: Path = Path("pepe_selections")
    """Where the viewer's export buttons write selections and masks."""
    paper_exact: bool = False
    """Train with every setting of the paper instead of ours (pepeseg3d_ns/paper.py lists them); overrides those
    fields and the scale gate's learning rate."""

    def schedule_for(self, steps: int) -> Dict[str, int]:
        """Step-valued fields for a run of ``steps`` iterations: this config's values read as a schedule of 10k
        steps (the paper's: centroids from 7k every 200) and scaled by ``steps / 10000``. A lag of 0 stays 0; a
        positive lag is at least 1 step and at most one refresh interval."""
        r = steps / 10000
        every = max(10, round(self.centroid_every * r))
        lag = 0 if self.centroid_lag <= 0 else min(every, max(1, round(self.centroid_lag * r)))
        return {"centroid_start": round(self.centroid_start * r), "centroid_every": every, "centroid_lag": lag,
                "gate_warmup": round(self.gate_warmup * r)}


class PepeContrastModel(PepeSplatfactoModel):
    """Frozen Gaussians + learned multi-scale features (see the module docstring)."""

    config: PepeContrastModelConfig

    # ------------------------------------------------------------------ setup
    def populate_modules(self) -> None:
        from pepeseg3d_ns.contrast.centroids import CentroidBank
        from pepeseg3d_ns.contrast.gate import ScaleGate

        cfg = self.config
        geometry, ckpt, step = load_recon_geometry(cfg.recon_checkpoint)
        n_rest = geometry["features_rest"].shape[1]
        sh_degree = int(round((n_rest + 1) ** 0.5)) - 1
        if sh_degree != cfg.sh_degree:
            cfg.sh_degree = sh_degree  # the geometry decides; colours render as trained
        self._geometry = geometry
        super().populate_modules()  # metrics, camera optimiser (off), background; Gaussians from _init_gaussian_params
        del self._geometry
        self.recon_source = {"checkpoint": str(ckpt), "step": step}
        n = geometry["means"].shape[0]
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(n, cfg.feature_dim, generator=gen)
        self.gauss_features = Parameter(feats / feats.norm(dim=-1, keepdim=True))
        self.scale_gate = ScaleGate(dim=cfg.feature_dim, hidden=cfg.gate_hidden, init=cfg.gate_init,
                                    band_half_width=cfg.gate_band_half_width)
        self.register_buffer("knn", self._build_knn(geometry["means"]), persistent=True)
        bound = dict(max_size=cfg.centroid_max_size or None, stale_after=cfg.centroid_stale_after or None)
        self.bank_upper = CentroidBank(cfg.feature_dim, **bound)
        self.bank_lower = CentroidBank(cfg.feature_dim, **bound)
        self._centroid_captures: List[Tuple[int, Tensor, Tensor]] = []  # (step, features [n, D], valid [n])
        self._centroid_due: List[int] = []  # merge step of each refresh being clustered, oldest first
        self._cluster_worker = None
        self._centroid_gen: Optional[torch.Generator] = None
        self.register_buffer("centroids_upper", torch.zeros(0, cfg.feature_dim))
        self.register_buffer("centroids_lower", torch.zeros(0, cfg.feature_dim))
        self._sample_gens: Dict[str, torch.Generator] = {}
        self.step = 0
        from pepeseg3d_ns.viewer.controls import SegmentationPanel

        self.segmentation_panel = SegmentationPanel(self, export_dir=cfg.export_dir, scale=cfg.viewer_scale)

    def _initial_points(self):
        return self._geometry["means"], None

    def _init_gaussian_params(self, points, colors) -> Dict[str, Parameter]:
        """The frozen pepe-recon Gaussians (no gradient)."""
        return {k: Parameter(v.clone(), requires_grad=False) for k, v in self._geometry.items()}

    def _build_knn(self, means: Tensor) -> Tensor:
        from pepeseg3d_ns.contrast.knn import knn_indices

        k = min(self.config.knn_k, max(means.shape[0] - 1, 0))
        if k <= 0:
            return torch.zeros(means.shape[0], 0, dtype=torch.long)
        return knn_indices(means, k=k, progress=means.shape[0] > 200_000)

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        """Resize the Gaussian tensors, features, neighbour index and centroid sets to the checkpoint's."""
        n = state_dict["gauss_params.means"].shape[0]
        for name in list(self.gauss_params.keys()):
            shape = (n,) + tuple(state_dict[f"gauss_params.{name}"].shape[1:])
            self.gauss_params[name] = Parameter(torch.zeros(shape, device=self.device), requires_grad=False)
        self.gauss_features = Parameter(torch.zeros_like(state_dict["gauss_features"], device=self.device))
        for key in ("knn", "centroids_upper", "centroids_lower"):
            if key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[key], device=self.device))
        if "_extra_state" not in state_dict:  # a checkpoint written before the mask scales were stored in it
            state_dict = {**state_dict, "_extra_state": {}}
        torch.nn.Module.load_state_dict(self, state_dict, **kwargs)
        self.step = 30000
        self.bank_upper.load_tensor(self.centroids_upper)
        self.bank_lower.load_tensor(self.centroids_lower)

    mask_scales = None
    """:class:`~pepeseg3d_ns.priors.scales.SceneScales` of the training masks (set by the pipeline before training,
    restored from the checkpoint)."""

    def get_extra_state(self) -> Dict:
        """Saved in the checkpoint beside the tensors: the mask scales (``SceneScales.to_state``)."""
        return {"mask_scales": self.mask_scales.to_state()} if self.mask_scales is not None else {}

    def set_extra_state(self, state) -> None:
        from pepeseg3d_ns.priors.scales import SceneScales

        if isinstance(state, dict) and state.get("mask_scales"):
            self.mask_scales = SceneScales.from_state(state["mask_scales"])

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        """Only the features and the gate are optimised (optimizer groups ``gauss_features`` and ``scale_gate``)."""
        return {"gauss_features": [self.gauss_features], "scale_gate": list(self.scale_gate.parameters())}

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        """Only the step counter: the geometry is frozen, so no densification."""
        return [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.step_cb,
                                 args=[training_callback_attributes.optimizers])]

    def step_post_backward(self, step):  # no densification
        return

    # ------------------------------------------------------------------ features
    def smoothed_features(self) -> Tensor:
        """Per-Gaussian features after 3D smoothing, ``[N, D]`` (differentiable w.r.t. ``gauss_features``)."""
        from pepeseg3d_ns.contrast.knn import KnnSmoother

        if self.knn.shape[1] == 0:
            return self.gauss_features
        key = (self.knn.data_ptr(), tuple(self.knn.shape), str(self.knn.device))
        if getattr(self, "_smoother_key", None) != key:  # built once per neighbour index (a sparse averaging matrix)
            self._smoother = KnnSmoother(self.knn.long())
            self._smoother_key = key
        return self._smoother(self.gauss_features)

    def gate(self, s: Union[float, Tensor]) -> Tensor:
        """``psi(s)``: ``[K, D]`` for scales ``s`` (float or ``[K]``) in [0, 1]."""
        dev = self.gauss_features.device
        if isinstance(s, (int, float)):  # filled on the device: no host-to-device copy
            s = torch.full((1,), float(s), dtype=torch.float32, device=dev)
        s = torch.as_tensor(s, dtype=torch.float32, device=dev).reshape(-1)
        return self.scale_gate(s)

    def gaussian_features(self, scale: float) -> Tensor:
        """Gated, smoothed feature of every Gaussian at ``scale``, ``[N, D]`` (what 3D selection compares)."""
        return self.smoothed_features() * self.gate(scale)

    def _camera_setup(self, camera: Cameras):
        from pepeseg3d_ns.readback import allow_readback

        c2w = camera.camera_to_worlds
        Ks = camera.get_intrinsics_matrices().to(self.device)
        with allow_readback("image size: nerfstudio Cameras hold it in device tensors"):
            W, H = int(camera.width.item()), int(camera.height.item())
        return viewmat_from_c2w(c2w.to(self.device)), Ks, W, H

    def render_feature_map(self, camera: Cameras, features: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Alpha-blended features ``[H, W, D]`` (background 0) and accumulation ``[H, W, 1]`` of one camera.
        ``features`` defaults to the smoothed ungated features; pass gated per-Gaussian features to render
        those instead. Outside training only the viewer's visible Gaussians (crop box, 3D selection) render."""
        feats = self.smoothed_features() if features is None else features
        viewmats, Ks, W, H = self._camera_setup(camera)
        p = dict(self.gauss_params)
        ids = None if self.training else self._visible_ids()
        if ids is not None:
            p = {k: v[ids] for k, v in p.items()}
            feats = feats[ids]
        from pepeseg3d_ns.readback import allow_readback

        with allow_readback("rasterizer (gsplat synchronises itself; the CPU path sizes its tile lists)"):
            render, alpha, info = rasterize(
                means=p["means"], quats=p["quats"], scales=torch.exp(p["scales"]),
                opacities=torch.sigmoid(p["opacities"]).squeeze(-1), colors=feats,
                viewmats=viewmats, Ks=Ks, width=W, height=H, packed=False, near_plane=0.01, far_plane=1e10,
                render_mode="RGB", sh_degree=None, rasterize_mode=self.config.rasterize_mode,
            )
        return render[0], alpha[0]

    # ------------------------------------------------------------------ forward
    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """Training: ``features [H, W, D]`` (ungated) and ``accumulation``. Otherwise the frozen scene's ``rgb``,
        ``depth``, ``accumulation`` and the viewer outputs of :class:`~pepeseg3d_ns.viewer.controls.SegmentationPanel`
        (``segmentation``, ``segment``, ``feature_pca``, ``decomposition``: ``[H, W, 3]`` in [0, 1])."""
        if not isinstance(camera, Cameras):
            raise TypeError(f"get_outputs expects a nerfstudio Cameras object, got {type(camera).__name__}")
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError("training renders one camera at a time")
            features, alpha = self.render_feature_map(camera)
            return {"features": features, "accumulation": alpha}
        from pepeseg3d_ns.contrast.query import FeatureView

        outputs = super().get_outputs(camera)
        with torch.no_grad():
            features, alpha = self.render_feature_map(camera)
            view = FeatureView(features, alpha[..., 0], self)
            outputs.update(self.segmentation_panel.outputs(view, outputs["rgb"]))
        return outputs

    def _sh_degree_now(self) -> Optional[int]:
        """The frozen geometry's colours always render with all of its SH bands, as at the end of pepe-recon (not
        on splatfacto's schedule, which would change the colours, and PSNR, with this run's step)."""
        return self.config.sh_degree if self.config.sh_degree > 0 else None

    def _visible_ids(self) -> Optional[Tensor]:
        """The crop box and the viewer's "3D view" setting (only / all but the selected Gaussians)."""
        crop = super()._visible_ids()
        sel = self.segmentation_panel.visible_mask() if hasattr(self, "segmentation_panel") else None
        if crop is None or sel is None:
            return crop if sel is None else sel
        return crop & sel

    # ------------------------------------------------------------------ losses
    @property
    def _sample_gen(self) -> torch.Generator:
        """The generator of the step's pixel/pair/scale draws, on the model's device (seed 0, made on first use
        per device), so that no random numbers cross between host and device."""
        dev = self.device
        key = str(dev)
        if key not in self._sample_gens:
            self._sample_gens[key] = torch.Generator(device=dev).manual_seed(0)
        return self._sample_gens[key]

    def _sample_pixels(self, pm, mask_scales: Tensor) -> Tuple[Tensor, Tensor]:
        """``num_sample_pixels`` distinct pixels among those covered by a mask with a known scale (see
        ``pixel_sampling``), drawn on the model's device from the per-pixel mask sets ``pm``
        (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`) and the masks' gate scales ``[M]``. Returns flat
        indices ``[P]`` and ``ok [P]`` (False only when the image holds fewer covered pixels than ``P``)."""
        from pepeseg3d_ns.contrast.sampling import draw_pixels, set_draw_weights

        mode = self.config.pixel_sampling
        if mode not in ("uniform", "omega", "mask"):
            raise ValueError(f"pixel_sampling must be 'uniform', 'omega' or 'mask', got {mode!r}")
        weights = set_draw_weights(pm, mask_scales, mode, self.config.mask_balance, region=self.config.pixel_region)
        return draw_pixels(pm, weights, self.config.num_sample_pixels, generator=self._sample_gen)

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        metrics = {"gaussian_count": float(self.num_points)}
        if "features" in outputs:
            metrics["feature_norm"] = outputs["features"].detach().norm(dim=-1).mean()
            metrics["centroids_upper"] = float(len(self.bank_upper))
            metrics["centroids_lower"] = float(len(self.bank_lower))
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """The terms of ``Lcont`` (already weighted; nerfstudio sums them): ``contrast_loss`` (Lm),
        ``perception_loss`` (Lp), ``centroid_loss`` (Lc, both sets), ``norm_loss`` (L2D)."""
        from pepeseg3d_ns.contrast import losses as L
        from pepeseg3d_ns.contrast import perception as P
        from pepeseg3d_ns.contrast import sampling as S

        if not self.training or "features" not in outputs:
            return {}
        for key in ("pixel_masks", "mask_scales", "depth_prior"):
            if key not in batch:
                raise KeyError(
                    f"pepe-contrast needs batch['{key}'] (perception priors and mask scales); train with the "
                    "pepe-contrast datamanager and a priors cache (`pepeseg3d priors --data SCENE`)"
                )
        cfg = self.config
        F = outputs["features"]
        H, W, D = F.shape
        pm = batch["pixel_masks"].to(self.device)
        if (pm.height, pm.width) != (H, W):
            raise ValueError(f"the masks are {pm.height}x{pm.width} but the rendered features {H}x{W}")
        mask_scales = self.gate_scales(batch["mask_scales"].to(self.device).float())
        gen = self._sample_gen
        pix, ok = self._sample_pixels(pm, mask_scales)
        sm = S.gather_sampled(pm, pix, mask_scales)
        losses: Dict[str, Tensor] = {}
        Fp = F.reshape(-1, D)[pix]

        if cfg.lambda_m > 0:
            i, j, s, targets = S.set_sample_pairs(pm, sm, cfg.num_pairs, hard_fraction=cfg.hard_pair_fraction,
                                                  generator=gen)
            if cfg.pixel_weighting:
                w = S.set_pixel_weights(sm)
                weight = w[i] * w[j]
            else:
                weight = torch.ones_like(s)
            g = self._train_gate(s)
            losses["contrast_loss"] = cfg.lambda_m * L.scale_contrastive_loss(
                Fp[i] * g, Fp[j] * g, targets["positive"], weight, targets["valid"], check=False,
                normalise=cfg.lm_normalisation)
            self._last_hard_fraction = targets["hard"].float().mean().detach()  # a tensor: read only when logged

        if cfg.lambda_p > 0:
            image = batch["image"][..., :3].to(self.device).float()
            if image.shape[:2] != (H, W):
                raise ValueError(f"image {tuple(image.shape[:2])} and rendered features {(H, W)} differ")
            s_p = torch.rand(pix.numel(), generator=gen, device=self.device)
            pp = P._perception_pairs(image, batch["depth_prior"].to(self.device)[..., 0].float(), pix, s_p,
                                     generator=gen)
            g = self._train_gate(s_p)
            fq = F.reshape(-1, D)[pp.q]
            losses["perception_loss"] = cfg.lambda_p * L.perception_loss(Fp * g, fq * g, pp.sim & ok, pp.dis & ok)

        # capture / start / merge on their steps, else nothing (the covered pixels are computed on capture steps only)
        self._refresh_centroids(F.detach(), lambda: S.covered_pixels(pm, mask_scales))
        if self._centroids_active():
            g1, g0 = self._train_gate(1.0), self._train_gate(0.0)
            lc = Fp.sum() * 0
            # the sets' device copies (buffers kept equal to the banks at every refresh and load): no copy per step
            if cfg.lambda_c_upper > 0 and self.centroids_upper.shape[0]:
                lc = lc + cfg.lambda_c_upper * L.centroid_pull_loss(Fp * g1, self.centroids_upper,
                                                                    cfg.centroid_tau, valid=ok,
                                                                    normalise=cfg.lc_normalisation)
            if cfg.lambda_c_lower > 0 and self.centroids_lower.shape[0]:
                lc = lc + cfg.lambda_c_lower * L.centroid_pull_loss(Fp * g0, self.centroids_lower,
                                                                    cfg.centroid_tau, valid=ok,
                                                                    normalise=cfg.lc_normalisation)
            losses["centroid_loss"] = lc

        if cfg.lambda_norm > 0:
            losses["norm_loss"] = cfg.lambda_norm * L.norm_regulariser(Fp, valid=ok)
        return losses

    def gate_scales(self, mask_scales: Tensor) -> Tensor:
        """Scales ``s`` ``[M]`` at which masks with quantile scales ``mask_scales`` ``[M]`` (NaN = unknown, kept
        NaN) are learned: ``mask_scales ** scale_power``, still in [0, 1] and in the same order."""
        p = float(self.config.scale_power)
        if not p > 0:
            raise ValueError(f"scale_power must be > 0, got {p}")
        return mask_scales.clamp(min=0.0) ** p if p != 1.0 else mask_scales

    def _train_gate(self, s: Union[float, Tensor]) -> Tensor:
        """``psi(s)`` for the training losses: detached (held at its initial value) during ``gate_warmup``."""
        g = self.gate(s)
        return g.detach() if self.step < self.config.gate_warmup else g

    def _centroids_active(self) -> bool:
        cfg = self.config
        return self.training and (cfg.lambda_c_upper > 0 or cfg.lambda_c_lower > 0) and self.step >= cfg.centroid_start

    def centroid_schedule(self) -> Tuple[int, int, int, int]:
        """``(first, every, lag, views)``: refresh ``r >= 0`` captures views at steps ``t - views + 1 .. t`` with
        ``t = first + r * every``, starts their clustering at ``t`` and merges the centres at ``t + lag``
        (``first = centroid_start - lag``, so the first merge is at ``centroid_start``)."""
        cfg = self.config
        every = max(int(cfg.centroid_every), 1)
        lag = max(int(cfg.centroid_lag), 0)
        return int(cfg.centroid_start) - lag, every, lag, max(1, min(int(cfg.centroid_views), every))

    @torch.no_grad()
    def _refresh_centroids(self, F: Tensor, covered: Callable[[], Tensor]) -> None:
        """The centroid refresh's part of a training step, from the rendered features ``F [H, W, D]`` (ungated,
        detached) and ``covered()``, which returns the pixels in a mask with a known scale (``bool [H, W]``; called
        on capture steps only):

        * on a capture step, keep a random subsample of this view's covered pixels (on the device, no read-back);
        * on a start step, gate the captured pixels at ``s = 1`` and ``s = 0``, copy them to the host (the
          refresh's one read-back) and hand them to the clustering worker (:class:`~pepeseg3d_ns.contrast.cluster.
          ClusterWorker`: a background process, or inline);
        * on a merge step, wait for that refresh's centres (normally long done) and merge them into ``U`` / ``L``.

        Steps are those of :meth:`centroid_schedule`, so training is deterministic whatever the worker's speed.
        """
        cfg = self.config
        if not self.training or not (cfg.lambda_c_upper > 0 or cfg.lambda_c_lower > 0):
            return
        first, every, lag, views = self.centroid_schedule()
        to_start = (first - self.step) % every  # steps until the next start
        if self.step >= first - views + 1 and to_start < views:
            self._capture_centroid_view(F, covered(), views)
            if to_start == 0:
                from pepeseg3d_ns.readback import allow_readback

                with allow_readback("centroid refresh: captured features to the clustering worker"):
                    self._start_centroid_refresh(views)
        while self._centroid_due and self._centroid_due[0] <= self.step:
            self._centroid_due.pop(0)
            from pepeseg3d_ns.readback import allow_readback

            with allow_readback("centroid refresh: merge of the worker's centres"):
                self._merge_centroid_refresh()

    def _capture_centroid_view(self, F: Tensor, covered: Tensor, views: int) -> None:
        H, W, D = F.shape
        n = min(H * W, -(-int(self.config.cluster_max_points) // views))
        if self._centroid_gen is None or self._centroid_gen.device != F.device:
            self._centroid_gen = torch.Generator(device=F.device).manual_seed(0)
        keys = torch.rand(H * W, generator=self._centroid_gen, device=F.device) + (~covered.flatten()).float() * 2
        pick = torch.topk(keys, n, largest=False, sorted=False).indices  # n random covered pixels, if there are n
        self._centroid_captures = [c for c in self._centroid_captures if c[0] > self.step - views]
        self._centroid_captures.append((self.step, F.reshape(-1, D)[pick], covered.flatten()[pick]))

    def _start_centroid_refresh(self, views: int) -> None:
        from pepeseg3d_ns.contrast.cluster import ClusterWorker

        cfg = self.config
        caps = [c for c in self._centroid_captures if c[0] > self.step - views]
        self._centroid_captures = []
        feats = torch.cat([c[1] for c in caps])
        gated = feats[None] * torch.stack([self.gate(1.0)[0], self.gate(0.0)[0]])[:, None]  # [2, n, D]
        gated, valid = gated.float().cpu(), torch.cat([c[2] for c in caps]).cpu()  # the refresh's read-back
        x = gated[:, valid].numpy()
        if x.shape[1] < cfg.cluster_min_size:
            return
        if self._cluster_worker is None:
            self._cluster_worker = ClusterWorker(cfg.centroid_worker)
        kw = dict(min_cluster_size=cfg.cluster_min_size, max_points=cfg.cluster_max_points, seed=self.step)
        self._cluster_worker.submit([(x[0], kw), (x[1], kw)])
        self._centroid_due.append(self.step + max(int(cfg.centroid_lag), 0))

    def _merge_centroid_refresh(self) -> None:
        cfg = self.config
        upper, lower = self._cluster_worker.collect()
        for cents, bank, name in ((upper, self.bank_upper, "centroids_upper"), (lower, self.bank_lower, "centroids_lower")):
            bank.update(torch.from_numpy(cents).to(bank.device), delta=cfg.centroid_delta, momentum=cfg.centroid_momentum)
            setattr(self, name, bank.to_tensor().to(self.device))

    # ------------------------------------------------------------------ evaluation
    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if "feature_pca" in outputs:
            images["feature_pca"] = outputs["feature_pca"]
        return metrics, images
