"""Datamanager and dataset for the PePESeg3D methods.

:class:`PepeDataset` is nerfstudio's ``InputDataset`` with errors that name the file (an image that does not
decode stops training with its path, not a stack trace from inside PIL), and with the perception priors of
each image attached from the on-disk cache (:mod:`pepeseg3d_ns.priors.cache`).

:class:`PepeDatamanager` is ``FullImageDatamanager`` made safe without CUDA (``cache_images="cpu"`` normally
pins host memory, which raises without a GPU; there the images stay in ordinary memory) and it hands every
training step the priors of its image:

* ``batch["pixel_masks"]``: the image's SAM masks as per-pixel mask sets
  (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`: a set id per pixel, the pixels listed by set and small
  tables, 7-10 MiB at 1008x756 with 150-300 masks; built once per image when the image cache is filled, never
  expanded to ``[M, H, W]``), on the model's device; its ``mask_area`` is the ``int64 [M]`` pixel areas;
* ``batch["depth_prior"]``: ``float32 [H, W, 1]`` relative inverse depth (larger = nearer, unknown scale and
  shift), on the model's device;
* ``batch["mask_scales"]``: ``float32 [M]`` each mask's scale in [0, 1] (NaN = unknown), on the model's device,
  only when :attr:`PepeDatamanager.scene_scales` is set (pepe-contrast sets it from ``scales.json``).

All are at the resolution of the (possibly ``camera_res_scale_factor``-scaled) image. On CUDA they are copied
from pinned memory without blocking the host. When splatfacto renders at a further reduced resolution early in
training, :func:`downscale_prior_batch` brings the depth prior to it the same way splatfacto downsamples the
image (the masks stay at full resolution: refinement looks them up at the scaled pixel coordinates).
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


class PepeDataset(InputDataset):
    """InputDataset whose image loading errors name the offending file, with perception priors attached when
    :attr:`prior_cache` is set (see the module docstring)."""

    prior_cache = None  # a pepeseg3d_ns.priors.cache.PriorCache, set by PepeDatamanager

    def get_metadata(self, data: Dict) -> Dict:
        """Priors of image ``data["image_idx"]`` resized to ``data["image"]``'s size: ``pixel_masks``
        (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`, on the host) and ``depth_prior [H, W, 1]`` float32
        (checked finite here, once per image). Empty when no cache is attached."""
        if self.prior_cache is None:
            return {}
        path = Path(self._dataparser_outputs.image_filenames[data["image_idx"]])
        masks = self.prior_cache.load_masks(path.stem)
        depth = torch.from_numpy(self.prior_cache.load_depth(path.stem))
        h, w = data["image"].shape[:2]
        if masks.shape != (h, w):
            masks = masks.resized(h, w)
        if tuple(depth.shape) != (h, w):
            depth = F.interpolate(depth[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        if not bool(torch.isfinite(depth).all()):
            raise ValueError(f"the depth prior of {path} has NaN or infinite values; rebuild the priors "
                             "(`pepeseg3d priors --data SCENE`)")
        return {"pixel_masks": masks.pixel_masks(), "depth_prior": depth[..., None]}

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
    """Full-image datamanager that works with or without CUDA."""

    _target: Type = field(default_factory=lambda: PepeDatamanager)
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    priors: Literal["auto", "require", "off"] = "auto"
    """Perception priors (SAM masks, relative depth) from `pepeseg3d priors`: "auto" attaches them when the cache
    exists, "require" stops with the command to build it when it does not, "off" ignores them."""
    priors_dir: Optional[Path] = None
    """Prior cache folder; default <data>/pepe_priors."""


class PepeDatamanager(FullImageDatamanager[PepeDataset]):
    """FullImageDatamanager with :class:`PepeDataset` and no pinned memory when CUDA is absent."""

    config: PepeDatamanagerConfig

    scene_scales = None  # a pepeseg3d_ns.priors.scales.SceneScales, set by the pepe-contrast pipeline

    @property
    def dataset_type(self) -> Type[PepeDataset]:
        return PepeDataset

    def create_train_dataset(self) -> PepeDataset:
        dataset = super().create_train_dataset()
        dataset.prior_cache = self._open_prior_cache(dataset, "train")
        return dataset

    def create_eval_dataset(self) -> PepeDataset:
        dataset = super().create_eval_dataset()
        dataset.prior_cache = self._open_prior_cache(dataset, "eval")
        return dataset

    def prior_cache_location(self) -> Path:
        """``priors_dir``, else the data folder (which holds ``pepe_priors/``)."""
        data_dir = Path(self.config.data or self.config.dataparser.data)
        return self.config.priors_dir or (data_dir if data_dir.is_dir() else data_dir.parent)

    def _open_prior_cache(self, dataset: PepeDataset, split: str):
        """The validated prior cache for ``dataset``'s images, or None (``priors="off"``, or "auto" without one)."""
        if self.config.priors == "off":
            return None
        from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError

        location = self.prior_cache_location()
        try:
            cache = PriorCache.open(location)
        except PriorCacheError:
            if self.config.priors == "require":
                raise
            if split == "train":
                CONSOLE.log(f"No perception-prior cache under {location}; training without priors.")
            return None
        cache.validate(dataset.image_filenames, check_files=False)
        if split == "train":
            CONSOLE.log(f"Perception priors ({cache.kind}) from {cache.cache_dir}")
        return cache

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """One training image (see the module docstring for the prior keys added to the batch)."""
        camera, data = super().next_train(step)
        if "pixel_masks" in data:
            masks = data["pixel_masks"]
            data["pixel_masks"] = _to_device(masks, self.device)
            data["depth_prior"] = _to_device(data["depth_prior"], self.device)
            if self.scene_scales is not None:
                stem = Path(self.train_dataset.image_filenames[data["image_idx"]]).stem
                scales = torch.from_numpy(np.ascontiguousarray(self.scene_scales.scales(stem), dtype=np.float32))
                if scales.shape[0] != masks.num_masks:
                    raise ValueError(f"{stem}: {scales.shape[0]} mask scales for {masks.num_masks} masks; recompute "
                                     "the scales (`pepeseg3d scales --load-config RECON_RUN/config.yml`)")
                data["mask_scales"] = _to_device(scales, self.device)
        return camera, data

    def _load_images(self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]) -> List[Dict[str, torch.Tensor]]:
        if cache_images_device == "cpu" and not torch.cuda.is_available():
            # pinning needs CUDA; "gpu" mode moves images to self.device, which is the CPU here
            cache_images_device = "gpu"
        return super()._load_images(split, cache_images_device)


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
