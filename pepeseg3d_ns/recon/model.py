"""Splatfacto that runs on CPU and CUDA alike; the base of the ``pepe-recon`` method.

Differences from nerfstudio 1.1.5's ``SplatfactoModel`` (and why):

* rendering goes through :func:`pepeseg3d_ns.render.rasterize` (gsplat on CUDA, our C++ kernel on CPU);
* no ``.cuda()`` anywhere: seed colours, intrinsics and the view matrix stay on the model's device;
* the view matrix is computed by :func:`~pepeseg3d_ns.render.cameras.viewmat_from_c2w`, not nerfstudio's
  ``torch.compile``d ``get_viewmat`` (which stalls for tens of seconds on the first CPU call);
* LPIPS is optional: it is built on first use, and when its AlexNet weights cannot be loaded (offline machine)
  evaluation skips it with one warning instead of crashing;
* zero Gaussians (everything pruned, empty point cloud) stop with a clear message.
"""

from __future__ import annotations

import math

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import (
    SplatfactoModel,
    SplatfactoModelConfig,
    num_sh_bases,
    random_quat_tensor,
    RGB2SH,
)
from nerfstudio.utils.colors import get_color

from pepeseg3d_ns.readback import allow_readback
from pepeseg3d_ns.render import rasterize, viewmat_from_c2w


@dataclass
class PepeSplatfactoModelConfig(SplatfactoModelConfig):
    """Splatfacto through pepeseg3d's CPU/CUDA renderer."""

    _target: Type = field(default_factory=lambda: PepeSplatfactoModel)
    compute_lpips: bool = True
    """Report LPIPS in evaluation when its AlexNet weights can be loaded; skipped with one warning otherwise."""


class PepeSplatfactoModel(SplatfactoModel):
    """Splatfacto on any device. See the module docstring for what differs from nerfstudio's."""

    config: PepeSplatfactoModelConfig

    def populate_modules(self) -> None:
        from gsplat.strategy import DefaultStrategy
        from pytorch_msssim import SSIM
        from torchmetrics.image import PeakSignalNoiseRatio

        points, colors = self._initial_points()
        self.gauss_params = torch.nn.ParameterDict(self._init_gaussian_params(points, colors))
        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self._lpips = None
        self._lpips_failed = not self.config.compute_lpips
        self.step = 0
        self.crop_box = None
        if self.config.background_color == "random":
            # viewer's default grey-blue; only used when rendering outside training
            self.background_color = torch.tensor([0.1490, 0.1647, 0.2157])
        else:
            self.background_color = get_color(self.config.background_color)
        if self.config.use_bilateral_grid:
            from nerfstudio.model_components.lib_bilagrid import BilateralGrid

            self.bil_grids = BilateralGrid(
                num=self.num_train_data,
                grid_X=self.config.grid_shape[0],
                grid_Y=self.config.grid_shape[1],
                grid_W=self.config.grid_shape[2],
            )
        cfg = self.config
        self.strategy = DefaultStrategy(
            prune_opa=cfg.cull_alpha_thresh,
            grow_grad2d=cfg.densify_grad_thresh,
            grow_scale3d=cfg.densify_size_thresh,
            grow_scale2d=cfg.split_screen_size,
            prune_scale3d=cfg.cull_scale_thresh,
            prune_scale2d=cfg.cull_screen_size,
            refine_scale2d_stop_iter=cfg.stop_screen_size_at,
            refine_start_iter=cfg.warmup_length,
            refine_stop_iter=cfg.stop_split_at,
            reset_every=cfg.reset_alpha_every * cfg.refine_every,
            refine_every=cfg.refine_every,
            pause_refine_after_reset=self.num_train_data + cfg.refine_every,
            absgrad=cfg.use_absgrad,
            revised_opacity=False,
            verbose=False,
        )
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)

    # ------------------------------------------------------------------ initialisation
    def _initial_points(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Seed points ``[P, 3]`` and colours ``[P, 3]`` in 0..255 (or None), or a random cube when there are none."""
        if self.seed_points is not None and not self.config.random_init:
            points = self.seed_points[0].float()
            colors = self.seed_points[1].float() if self.seed_points[1].shape[0] > 0 else None
            if points.shape[0] == 0:
                raise ValueError(
                    "The scene's initial point cloud is empty (ply_file_path / points3D in the dataparser outputs). "
                    "Provide a point cloud or train with --pipeline.model.random-init True."
                )
            return points, colors
        gen = torch.Generator().manual_seed(0)
        points = (torch.rand((self.config.num_random, 3), generator=gen) - 0.5) * self.config.random_scale
        return points, None

    def _init_gaussian_params(self, points: torch.Tensor, colors: Optional[torch.Tensor]) -> Dict[str, Parameter]:
        """Isotropic Gaussians at ``points [P, 3]``, size = mean distance to the 3 nearest neighbours."""
        n = points.shape[0]
        k = min(3, max(n - 1, 1))
        if n > 1:
            dists, _ = self.k_nearest_sklearn(points, k)
            avg = torch.from_numpy(dists).mean(dim=-1, keepdim=True).clamp(min=1e-7)
        else:
            avg = torch.full((n, 1), 0.01)
        n_sh = num_sh_bases(self.config.sh_degree)
        shs = torch.zeros((n, n_sh, 3))
        if colors is not None:
            rgb = (colors / 255.0).clamp(0.0, 1.0)
            shs[:, 0] = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
        else:
            shs[:, 0] = torch.rand(n, 3)
        return {
            "means": Parameter(points.clone()),
            "scales": Parameter(torch.log(avg.repeat(1, 3))),
            "quats": Parameter(random_quat_tensor(n)),
            "features_dc": Parameter(shs[:, 0, :].contiguous()),
            "features_rest": Parameter(shs[:, 1:, :].contiguous()),
            "opacities": Parameter(torch.logit(0.1 * torch.ones(n, 1))),
        }

    # ------------------------------------------------------------------ rendering
    def _depth_in_training(self) -> bool:
        """Whether training steps render expected depth too (subclasses with depth losses say yes)."""
        return self.config.output_depth_during_training

    def _render_inputs(self, crop_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Activated per-Gaussian tensors (optionally cropped): means [N,3], quats [N,4], scales [N,3],
        opacities [N], colors [N,K,3] (SH) or [N,3] (sh_degree 0)."""
        p = self.gauss_params
        sel = (lambda t: t[crop_ids]) if crop_ids is not None else (lambda t: t)
        colors = torch.cat((sel(p["features_dc"])[:, None, :], sel(p["features_rest"])), dim=1)
        if self.config.sh_degree == 0:
            colors = torch.sigmoid(colors[:, 0, :])
        return {
            "means": sel(p["means"]),
            "quats": sel(p["quats"]),
            "scales": torch.exp(sel(p["scales"])),
            "opacities": torch.sigmoid(sel(p["opacities"])).squeeze(-1),
            "colors": colors,
        }

    def _sh_degree_now(self) -> Optional[int]:
        """SH degree the colours render with at this step (splatfacto's schedule: one more every
        ``sh_degree_interval`` steps up to ``sh_degree``); None = plain RGB (``sh_degree`` 0)."""
        if self.config.sh_degree <= 0:
            return None
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def _visible_ids(self) -> Optional[torch.Tensor]:
        """``bool [N]`` Gaussians rendered outside training (the viewer's crop box), None = all."""
        if self.crop_box is None:
            return None
        return self.crop_box.within(self.means).squeeze()

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        """Render one camera. Returns ``rgb [H, W, 3]``, ``depth [H, W, 1]`` (expected z-depth; only outside
        training unless ``output_depth_during_training``), ``accumulation [H, W, 1]`` and ``background``."""
        if not isinstance(camera, Cameras):
            raise TypeError(f"get_outputs expects a nerfstudio Cameras object, got {type(camera).__name__}")
        if self.num_points == 0:
            raise RuntimeError(
                "The model has zero Gaussians (all were pruned). Lower --pipeline.model.cull-alpha-thresh, check the "
                "initial point cloud, or restart from an earlier checkpoint."
            )
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError("training renders one camera at a time")
            c2w = self.camera_optimizer.apply_to_camera(camera)
        else:
            c2w = camera.camera_to_worlds

        crop_ids = None if self.training else self._visible_ids()
        if crop_ids is not None and crop_ids.sum() == 0:
            return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)

        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        Ks = camera.get_intrinsics_matrices().to(self.device)
        with allow_readback("image size: nerfstudio Cameras hold it in device tensors"):
            W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(scale)
        self.last_size = (H, W)
        viewmats = viewmat_from_c2w(c2w.to(self.device))
        self._last_view = (viewmats[0].detach(), Ks[0])  # for the boundary split (step_post_backward)

        if self.config.rasterize_mode not in ("antialiased", "classic"):
            raise ValueError(f"Unknown rasterize_mode: {self.config.rasterize_mode}")
        render_mode = "RGB+ED" if (self._depth_in_training() or not self.training) else "RGB"
        sh_degree = self._sh_degree_now()

        g = self._render_inputs(crop_ids)
        with allow_readback("rasterizer (gsplat synchronises itself; the CPU path sizes its tile lists)"):
            render, alpha, self.info = rasterize(
                **g, viewmats=viewmats, Ks=Ks, width=W, height=H, packed=False, near_plane=0.01, far_plane=1e10,
                render_mode=render_mode, sh_degree=sh_degree, absgrad=self.strategy.absgrad,
                rasterize_mode=self.config.rasterize_mode,
            )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    # ------------------------------------------------------------------ evaluation
    def _get_lpips(self):
        """The LPIPS metric, or None when its weights cannot be loaded here (warned about once)."""
        if self._lpips is None and not self._lpips_failed:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips = LearnedPerceptualImagePatchSimilarity(normalize=True).to(self.device)
            except Exception as err:  # offline: torchvision cannot fetch the AlexNet weights
                self._lpips_failed = True
                warnings.warn(
                    f"LPIPS is skipped: its AlexNet weights could not be loaded ({type(err).__name__}: {err}). "
                    "Put alexnet-owt-7be5be79.pth in $TORCH_HOME/hub/checkpoints to enable it.",
                    stacklevel=2,
                )
        return self._lpips

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        """PSNR, SSIM (and LPIPS when available) of ``outputs["rgb"]`` against the batch image; images side by side."""
        gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        pred = outputs["rgb"]
        gt_b = torch.moveaxis(gt, -1, 0)[None]
        pred_b = torch.moveaxis(pred, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(gt_b, pred_b).item()), "ssim": float(self.ssim(gt_b, pred_b))}
        lpips = self._get_lpips()
        if lpips is not None:
            metrics["lpips"] = float(lpips(gt_b, pred_b))
        metrics["num_gaussians"] = float(self.num_points)
        return metrics, {"img": torch.cat([gt, pred], dim=1)}


@dataclass
class PepeReconModelConfig(PepeSplatfactoModelConfig):
    """PePESeg3D stage 1: splatfacto + monocular depth constraint.

    ``L_recon = (1 - lambda_ph) * L1 + lambda_ph * D-SSIM + lambda_d * L_depth`` (paper eq. 1). ``lambda_ph`` is
    splatfacto's ``ssim_lambda`` (default 0.2, as in the paper); ``L_depth`` is
    :func:`pepeseg3d_ns.recon.losses.depth_prior_loss` against the Depth-Anything prior of the training image.
    """

    _target: Type = field(default_factory=lambda: PepeReconModel)
    depth_loss_weight: float = 0.05
    """lambda_d: weight of the scale/shift-invariant depth loss against the depth prior (0 disables it)."""
    depth_fit: Literal["robust", "lstsq"] = "robust"
    """Fit of (alpha*, beta*): "robust" (median-of-squares start, least squares on inliers) or "lstsq" (the paper's)."""
    depth_min_alpha: float = 0.5
    """Pixels whose rendered opacity is below this are left out of the depth loss."""
    refine_boundaries: bool = True
    """Boundary-guided refinement: split near-surface Gaussians whose projected major axis crosses a SAM mask edge."""
    refine_start: int = 4000
    """First step of boundary-guided refinement."""
    refine_views_factor: float = 2.0
    """Refinement lasts refine_views_factor x (number of training views) steps, one view per step."""
    refine_close_fraction: float = 0.1
    """lambda_close: of the Gaussians crossing a mask boundary in the view, only this fraction, those nearest the
    rendered surface, split."""
    refine_max_growth: float = 1.0
    """Refinement adds at most this fraction of the Gaussians present when it starts, spread evenly over its
    steps (inf = no cap, the paper's)."""
    refine_split: Literal["symmetric", "boundary"] = "boundary"
    """How a boundary Gaussian splits along its longest axis: "boundary" (each child covers its side of the mask
    edge, shrunk and shifted; the paper's [4]) or "symmetric" (two children keeping its mean and covariance)."""
    paper_exact: bool = False
    """Train with every setting of the paper instead of ours (pepeseg3d_ns/paper.py lists them)."""


class PepeReconModel(PepeSplatfactoModel):
    """Splatfacto with the PePE depth constraint (see :class:`PepeReconModelConfig`)."""

    config: PepeReconModelConfig

    def _depth_in_training(self) -> bool:
        return (
            self.config.output_depth_during_training
            or self.config.depth_loss_weight > 0
            or (self.training and self._refining(self.step))
        )

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """Splatfacto's photometric losses plus ``depth_loss = lambda_d * L_depth`` when the batch carries a
        ``depth_prior`` (attached by the datamanager from the priors cache)."""
        from pepeseg3d_ns.data.datamanager import downscale_prior_batch
        from pepeseg3d_ns.recon.losses import depth_prior_loss

        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.config.depth_loss_weight <= 0 or not self.training:
            return loss_dict
        if "depth_prior" not in batch:
            if not getattr(self, "_warned_no_prior", False):
                self._warned_no_prior = True
                warnings.warn("depth_loss_weight > 0 but the batch has no depth prior: the depth loss is off. "
                              "Build the priors with `pepeseg3d priors --data SCENE`.", stacklevel=2)
            return loss_dict
        prior = downscale_prior_batch(batch, self._get_downscale_factor())["depth_prior"]
        depth = outputs["depth"]
        if depth.shape[:2] != prior.shape[:2]:
            raise ValueError(f"rendered depth {tuple(depth.shape[:2])} and depth prior {tuple(prior.shape[:2])} differ")
        valid = outputs["accumulation"] >= self.config.depth_min_alpha
        loss, _, _ = depth_prior_loss(depth, prior.to(depth), valid, fit=self.config.depth_fit)
        loss_dict["depth_loss"] = self.config.depth_loss_weight * loss
        return loss_dict

    # ------------------------------------------------------------------ boundary-guided refinement
    def _refining(self, step: int) -> bool:
        cfg = self.config
        end = cfg.refine_start + int(cfg.refine_views_factor * self.num_train_data)
        return cfg.refine_boundaries and cfg.refine_start <= step < end

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        """Splatfacto's metrics; during the refinement window also stashes this view's per-pixel mask sets, rendered
        depth and downscale factor for :meth:`step_post_backward` (outside the window the masks are not touched),
        and reports the last step's ``refine_splits`` and the run's ``refine_splits_total`` so far."""
        metrics = super().get_metrics_dict(outputs, batch)
        self._refine_inputs = None
        if self.training and self._refining(self.step) and "pixel_masks" in batch and outputs.get("depth") is not None:
            self._refine_inputs = (batch["pixel_masks"], outputs["depth"][..., 0].detach(), self._get_downscale_factor())
        metrics["refine_splits"] = float(getattr(self, "_last_splits", 0))
        metrics["refine_splits_total"] = float(getattr(self, "_total_splits", 0))
        return metrics

    def step_post_backward(self, step):
        """Splatfacto's densification, then (inside the refinement window) boundary-guided splits in this
        step's view."""
        super().step_post_backward(step)
        self._last_splits = 0
        inputs = getattr(self, "_refine_inputs", None)
        if inputs is None or not self._refining(step):
            return
        from pepeseg3d_ns.recon.refine import (boundary_fractions, crosses_set_boundary, near_surface,
                                               split_along_major_axis, split_at_boundary, visible_gaussians)

        pm, depth, factor = inputs
        info = self.info
        n = self.num_points
        if info["means2d"].shape[1] != n:  # densification changed the set this step; next view then
            return
        means2d, conics = info["means2d"][0].detach(), info["conics"][0].detach()
        radii, depths = info["radii"][0], info["depths"][0].detach()
        cfg = self.config
        window = max(1, int(cfg.refine_views_factor * self.num_train_data))
        if getattr(self, "_refine_n0", None) is None or step == cfg.refine_start:
            self._refine_n0 = n
        budget = (None if not math.isfinite(cfg.refine_max_growth)
                  else int(math.ceil(cfg.refine_max_growth * self._refine_n0 / window)))
        # the boundary test runs on the Gaussians drawn in this view only; the masks are read at their own
        # resolution (render coordinates x the downscale factor)
        vis = visible_gaussians(radii, depths)
        crossing = torch.zeros(n, dtype=torch.bool, device=means2d.device)
        pixel_set = pm.to(means2d.device).pixel_set.view(pm.height, pm.width)
        crossing[vis] = crosses_set_boundary(means2d[vis], conics[vis], pixel_set, scale=factor)
        split = near_surface(depths, means2d, radii, depth, cfg.refine_close_fraction, candidates=crossing,
                             max_count=budget)
        if cfg.refine_split == "boundary":
            fraction = torch.zeros(n, dtype=means2d.dtype, device=means2d.device)
            fraction[split] = boundary_fractions(means2d[split], conics[split], pixel_set, scale=factor)
            viewmat, K = self._last_view
            self._last_splits = split_at_boundary(self.gauss_params, self.optimizers, self.strategy_state, split,
                                                  fraction, means2d, conics, viewmat, K)
        elif cfg.refine_split == "symmetric":
            self._last_splits = split_along_major_axis(self.gauss_params, self.optimizers, self.strategy_state, split)
        else:
            raise ValueError(f"refine_split must be 'symmetric' or 'boundary', got {cfg.refine_split!r}")
        self._total_splits = getattr(self, "_total_splits", 0) + self._last_splits
        self._refine_inputs = None
