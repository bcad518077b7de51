"""Datamanager and dataset for the PePESeg3D methods.

:class:`PepeDataset` is nerfstudio's ``InputDataset`` with errors that name the file (an image that does not
decode stops training with its path, not a stack trace from inside PIL).

:class:`PepeDatamanager` is ``FullImageDatamanager`` made safe without CUDA (``cache_images="cpu"`` normally
pins host memory, which raises without a GPU; there the images stay in ordinary memory). When training, it
attaches the perception priors of every training image *after* nerfstudio has loaded, undistorted, cropped and
downscaled it: the prior cache (:mod:`pepeseg3d_ns.priors.cache`) is keyed by a digest of exactly those pixels,
and missing entries are computed on them (:mod:`pepeseg3d_ns.priors.compute`), so masks and depth are
pixel-aligned with what the model sees whatever the dataparser and its options. Every training step carries:

* ``batch["pixel_masks"]``: the image's SAM masks as per-pixel mask sets
  (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`: a set id per pixel, the pixels listed by set and small
  tables, 7-10 MiB at 1008x756 with 150-300 masks; built once per image when the priors are attached, never
  expanded to ``[M, H, W]``), on the model's device; its ``mask_area`` is the ``int64 [M]`` pixel areas;
* ``batch["depth_prior"]``: ``float32 [H, W, 1]`` relative inverse depth (larger = nearer, unknown scale and
  shift), on the model's device;
* ``batch["mask_scales"]``: ``float32 [M]`` each mask's scale in [0, 1] (NaN = unknown), on the model's device,
  only when :attr:`PepeDatamanager.mask_scales` is set (the pepe-contrast pipeline measures them on its frozen
  geometry).

All are at the resolution of the image the datamanager hands over. On CUDA they are copied from pinned memory
without blocking the host. When splatfacto renders at a further reduced resolution early in training,
:func:`downscale_prior_batch` brings the depth prior to it the same way splatfacto downsamples the image (the
masks stay at full resolution: refinement looks them up at the scaled pixel coordinates). The image cache also keeps each
image's packed :class:`~pepeseg3d_ns.priors.masks.MaskSet` (``prior_masks``, not handed to steps), on which the
pepe-contrast pipeline measures the mask scales. ns-eval and the viewer
(``test_mode`` "test" / "inference") attach no priors: a trained run opens without the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.utils.rich_utils import CONSOLE

from pepeseg3d_ns.priors.sources import PriorSourcesConfig


class PepeDataset(InputDataset):
    """InputDataset whose image loading errors name the offending file."""

    def get_numpy_image(self, image_idx: int) -> np.ndarray:
        """Image ``[H, W, 3 or 4] uint8`` of training image ``image_idx``; clear errors for unreadable files."""
        path = self._dataparser_outputs.image_filenames[image_idx]
        try:
            image = super().get_numpy_image(image_idx)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Image listed in the dataset does not exist: {path}") from err
        except (UnidentifiedImageError, OSError, SyntaxError, AssertionError) as err:
            raise ValueError(f"Image {path} could not be decoded ({err}); is the file truncated or not an image?") from err
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"Image {path} has shape {image.shape}; expected H x W x 3 (RGB) or 4 (RGBA)")
        return image


@dataclass
class PepeDatamanagerConfig(FullImageDatamanagerConfig):
    """Full-image datamanager that works with or without CUDA and attaches the perception priors of the images it
    trains on."""

    _target: Type = field(default_factory=lambda: PepeDatamanager)
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    priors: Literal["auto", "require", "off"] = "auto"
    """Perception priors (SAM masks, relative depth) of the training images: "auto" uses the cache and computes
    missing ones with prior-sources (simulated for synthetic scenes), "require" uses only what is cached, "off"
    trains without them."""
    priors_dir: Optional[Path] = None
    """Prior cache folder; default <data>/pepe_priors."""
    prior_sources: PriorSourcesConfig = field(default_factory=PriorSourcesConfig)
    """Models that compute missing priors (SAM checkpoint, Depth-Anything model, or folders to import)."""


class PepeDatamanager(FullImageDatamanager[PepeDataset]):
    """FullImageDatamanager with :class:`PepeDataset`, no pinned memory when CUDA is absent, and the priors of
    every training image attached after nerfstudio has undistorted and cached it (see the module docstring)."""

    config: PepeDatamanagerConfig

    mask_scales: Optional[List[np.ndarray]] = None
    """``float32 [M_i]`` scales of the masks of training image ``i`` (set by the pepe-contrast pipeline)."""

    def __init__(self, config: PepeDatamanagerConfig, device="cpu", test_mode: Literal["test", "val", "inference"] = "val",
                 world_size: int = 1, local_rank: int = 0, **kwargs):
        self.prior_keys: Optional[List[str]] = None
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank, **kwargs)
        if self.wants_priors:
            _ = self.cached_train  # undistort, cache and attach priors now: later steps (mask scales) rely on both

    @property
    def dataset_type(self) -> Type[PepeDataset]:
        return PepeDataset

    @property
    def wants_priors(self) -> bool:
        """Priors are attached when training (``test_mode="val"``) unless ``priors="off"``; ns-eval and the viewer
        never need them."""
        return self.config.priors != "off" and self.test_mode == "val"

    def data_dir(self) -> Path:
        """The scene folder (the folder of a transforms.json given as --data)."""
        data = Path(self.config.data or self.config.dataparser.data)
        return data.parent if data.suffix == ".json" else data

    def prior_cache_dir(self) -> Path:
        """``priors_dir``, else ``<data>/pepe_priors``."""
        from pepeseg3d_ns.priors.cache import PriorCache

        return Path(self.config.priors_dir) if self.config.priors_dir else PriorCache.default_dir(self.data_dir())

    def _load_images(self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]) -> List[Dict[str, torch.Tensor]]:
        if cache_images_device == "cpu" and not torch.cuda.is_available():
            # pinning needs CUDA; "gpu" mode moves images to self.device, which is the CPU here
            cache_images_device = "gpu"
        warps = self._gt_mask_warps(split)
        cached = super()._load_images(split, cache_images_device)
        if warps:
            dataset = self.train_dataset if split == "train" else self.eval_dataset
            dataset._dataparser_outputs.metadata["gt_masks"].warps.update(warps)
        if split == "train" and self.wants_priors:
            self._attach_priors(cached)
        return cached

    def _gt_mask_warps(self, split: str) -> Dict[int, object]:
        """Before nerfstudio undistorts a split's images: for every distorted perspective view whose split has
        ground-truth masks, the :class:`~pepeseg3d_ns.data.undistort.MaskWarp` of its undistortion (so that
        evaluation compares masks aligned with the undistorted image)."""
        from nerfstudio.cameras.cameras import CameraType

        from pepeseg3d_ns.data.undistort import MaskWarp

        dataset = self.train_dataset if split == "train" else self.eval_dataset
        if dataset is None or dataset._dataparser_outputs.metadata.get("gt_masks") is None:
            return {}
        cams = dataset.cameras
        if cams.distortion_params is None:
            return {}
        warps = {}
        for i in range(len(cams)):
            d = cams.distortion_params[i].numpy()
            if not np.any(d) or int(cams.camera_type[i]) != CameraType.PERSPECTIVE.value:
                continue
            K = cams[i].get_intrinsics_matrices().numpy()
            warps[i] = MaskWarp(K=K, size=(int(cams.height[i]), int(cams.width[i])), distortion=d.copy())
        return warps

    # ------------------------------------------------------------------ priors
    def _attach_priors(self, cached: List[Dict]) -> None:
        """Put ``prior_masks`` (MaskSet), ``pixel_masks`` (PixelMasks) and ``depth_prior`` (``float32 [H, W, 1]``) into every cached training
        image, from the cache entries of exactly these pixels; compute missing entries when sources are available
        (``priors="auto"``); stop with a message naming the command that computes them otherwise."""
        from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError
        from pepeseg3d_ns.priors.compute import compute_priors, datamanager_images
        from pepeseg3d_ns.priors.pixel_masks import PixelMasks

        images = datamanager_images(self, "train", cached)
        cache = PriorCache.open(self.prior_cache_dir(), create=True)
        broken = {im.key: cache.check_entry(im.key, deep=True) for im in images}
        todo = [im for im in images if broken[im.key] is not None]
        sources_cfg = self.config.prior_sources
        if todo:
            if self.config.priors == "auto" and sources_cfg.available(self.data_dir()):
                mask_source, depth_source = sources_cfg.build(self.data_dir(), flag_prefix="--pipeline.datamanager.prior-sources.")
                CONSOLE.log(f"Computing perception priors of {len(todo)} of {len(images)} training images into "
                            f"{cache.cache_dir} ({getattr(mask_source, 'name', '?')} masks, "
                            f"{getattr(depth_source, 'name', '?')} depth)")
                stats = compute_priors(cache, todo, mask_source, depth_source, progress=True)
                for problem in stats.repaired:
                    CONSOLE.log(f"repaired: {problem}")
                del mask_source, depth_source
            else:
                raise PriorCacheError(self._missing_priors_message(cache, images, todo, broken))
        entries = []
        for im, d in zip(images, cached):
            pri = cache.load(im.key)
            d["prior_masks"] = pri.masks
            d["pixel_masks"] = PixelMasks.from_maskset(pri.masks)
            d["depth_prior"] = torch.from_numpy(pri.depth)[..., None]
            entries.append(pri.entry)
        self._check_one_setting(cache, entries)
        self.prior_keys = [im.key for im in images]
        kinds = sorted({f"{e['masks']['kind']} masks" for e in entries} | {f"{e['depth']['kind']} depth" for e in entries})
        CONSOLE.log(f"Perception priors ({', '.join(kinds)}) of {len(images)} training images from {cache.cache_dir}")

    @staticmethod
    def _check_one_setting(cache, entries: List[dict]) -> None:
        """PriorCacheError when the training images' entries were made by different source settings (two runs of
        `pepeseg3d priors` with different settings on one cache)."""
        from pepeseg3d_ns.priors.cache import PriorCacheError

        for part in ("masks", "depth"):
            groups: Dict[str, List[str]] = {}
            for e in entries:
                groups.setdefault(e[part]["signature_digest"], []).append(e["key"])
            if len(groups) > 1:
                desc = "; ".join(f"{len(v)} by {cache.read_entry(v[0])[part]['source']['name']} "
                                 f"(settings {k}, e.g. {v[0]})" for k, v in groups.items())
                raise PriorCacheError(
                    f"the {part} priors of the training images in {cache.cache_dir} were made with different settings: "
                    f"{desc}. Re-run `pepeseg3d priors` with the settings you want (entries made otherwise are recomputed)"
                )

    def _missing_priors_message(self, cache, images, todo, broken) -> str:
        from pepeseg3d_ns.priors.command_line import priors_command

        first = todo[0]
        damaged = [p for k, p in broken.items() if p is not None and cache.entry_path(k).is_file()]
        lines = [
            f"{len(todo)} of {len(images)} training images have no usable perception priors in {cache.cache_dir} "
            f"(priors belong to the images as nerfstudio hands them to the model: undistorted, cropped, downscaled; "
            f"e.g. {first.source_file} as {first.hw[0]}x{first.hw[1]})."
        ]
        if damaged:
            lines.append(f"{len(damaged)} of them are damaged, e.g.: {damaged[0]}")
        cmd = priors_command(self.config, "--sam-checkpoint sam_vit_h_4b8939.pth")
        lines.append(f"Compute them with:\n  {cmd}\nor let ns-train compute them: add "
                     f"--pipeline.datamanager.prior-sources.sam-checkpoint sam_vit_h_4b8939.pth"
                     + (" (and drop --pipeline.datamanager.priors require)" if self.config.priors == "require" else ""))
        return "\n".join(lines)

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """One training image (see the module docstring for the prior keys added to the batch)."""
        camera, data = super().next_train(step)
        data.pop("prior_masks", None)  # the packed masks stay in the image cache (the pipeline measures scales on them)
        if "pixel_masks" in data:
            masks = data["pixel_masks"]
            data["pixel_masks"] = _to_device(masks, self.device)
            data["depth_prior"] = _to_device(data["depth_prior"], self.device)
            if self.mask_scales is not None:
                data["mask_scales"] = _to_device(torch.from_numpy(self.mask_scales[data["image_idx"]]), self.device)
        return camera, data


def _to_device(x, device):
    """``x`` (a tensor or a PixelMasks) on ``device``; to CUDA through pinned memory, without blocking the host."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def downscale_prior_batch(batch: Dict, factor: int) -> Dict:
    """The depth prior of ``batch`` at ``1/factor`` resolution, downsampled the way splatfacto downsamples the
    image (``factor x factor`` box average with stride ``factor``, so ``H // factor`` rows). Returns a new dict
    with ``depth_prior [H', W', 1]``; other keys (``pixel_masks`` too, which stays at full resolution) are shared
    with ``batch``."""
    if factor <= 1 or "depth_prior" not in batch:
        return batch
    out = dict(batch)
    depth = batch["depth_prior"].permute(2, 0, 1)[None]
    out["depth_prior"] = F.avg_pool2d(depth, kernel_size=factor, stride=factor)[0].permute(1, 2, 0)
    return out
