"""Datamanager and dataset for the PePESeg3D methods.

:class:`PepeDataset` is nerfstudio's ``InputDataset`` with errors that name the file: an image that does not
decode, or whose size disagrees with its camera, stops training with the path and the reason instead of a
stack trace from inside PIL. :class:`PepeDatamanager` is ``FullImageDatamanager`` made safe without CUDA:
``cache_images="cpu"`` normally pins host memory, which raises on a machine without a GPU; there the images
are simply kept in ordinary CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Type

import numpy as np
import torch
from PIL import UnidentifiedImageError

from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset


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
    """Full-image datamanager that works with or without CUDA."""

    _target: Type = field(default_factory=lambda: PepeDatamanager)
    cache_images_type: Literal["uint8", "float32"] = "uint8"


class PepeDatamanager(FullImageDatamanager[PepeDataset]):
    """FullImageDatamanager with :class:`PepeDataset` and no pinned memory when CUDA is absent."""

    config: PepeDatamanagerConfig

    @property
    def dataset_type(self) -> Type[PepeDataset]:
        return PepeDataset

    def _load_images(self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]) -> List[Dict[str, torch.Tensor]]:
        if cache_images_device == "cpu" and not torch.cuda.is_available():
            # pinning needs CUDA; "gpu" mode moves images to self.device, which is the CPU here
            cache_images_device = "gpu"
        return super()._load_images(split, cache_images_device)
