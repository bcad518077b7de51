"""Fill the prior cache with the masks and depth of the images a nerfstudio datamanager trains on.

The one runner, :func:`compute_priors`, is used by ``pepeseg3d priors`` (which builds the same datamanager as
``ns-train``) and by the datamanager itself when it finds images without priors
(:class:`~pepeseg3d_ns.data.datamanager.PepeDatamanager`). Both hand it :class:`PriorImage` records made from the
datamanager's cached images (:func:`datamanager_images`): the undistorted, cropped, downscaled pixels the model
sees, so the priors are pixel-aligned with them by construction.

A *source* is any object with ``name``, ``signature() -> dict`` (everything that changes its output) and
``__call__(image [H, W, 3] uint8, stem) -> output``; masks: ``{"masks": bool [M, H, W], "scores"?, "stability"?,
"labels"?}`` or a :class:`~pepeseg3d_ns.priors.masks.MaskSet`; depth: ``[H, W]`` relative inverse depth (larger =
nearer). An optional ``kind`` attribute labels the entries "computed" (default), "simulated" or "imported". SAM
(:mod:`~pepeseg3d_ns.priors.sam`), Depth-Anything (:mod:`~pepeseg3d_ns.priors.depth`), the simulated sources of the
synthetic scenes and the importers of :mod:`~pepeseg3d_ns.priors.imported` are sources; so is any callable of
yours with those three attributes (bring your own priors from Python).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from pepeseg3d_ns.priors.cache import (PriorCache, PriorCacheError, check_depth_output, check_mask_output, image_key,
                                       signature_digest, source_block, source_kind)

__all__ = ["PriorImage", "BuildStats", "compute_priors", "datamanager_images", "parse_shard", "to_uint8_rgb"]


def to_uint8_rgb(image: Any) -> np.ndarray:
    """``[H, W, 3] uint8`` of a datamanager image (``uint8`` or float in [0, 1], 3 or 4 channels; torch or numpy)."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3 or 4] image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


@dataclass
class PriorImage:
    """One image to compute priors for: its ``stem`` (file stem, unique in the split), the processed pixels
    ``image [H, W, 3] uint8`` and the file it was read from (informational)."""

    stem: str
    image: np.ndarray
    source_file: str = ""
    key: str = field(init=False)
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.image = to_uint8_rgb(self.image)
        self.key, self.digest = image_key(self.stem, self.image)

    @property
    def hw(self) -> Tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class BuildStats:
    """What one :func:`compute_priors` call did."""

    n_images: int = 0  # images of this shard
    computed: int = 0  # images for which at least one prior was (re)computed
    skipped: int = 0  # images whose entry was healthy and made by the same sources
    masks_computed: int = 0
    depth_computed: int = 0
    repaired: List[str] = field(default_factory=list)  # damaged entries found and recomputed (what was wrong)
    seconds: float = 0.0


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None -> ``(0, 1)``. ValueError naming --shard otherwise."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N with integers, e.g. 0/4 (this process does images I, I+N, ...)") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def compute_priors(
    cache: PriorCache,
    images: Sequence[PriorImage],
    mask_source: Any,
    depth_source: Any,
    force: bool = False,
    progress: bool = True,
    shard: Tuple[int, int] = (0, 1),
) -> BuildStats:
    """Make sure every image of ``images[shard[0]::shard[1]]`` has a healthy entry made by these two sources.

    An image is skipped when its entry passes :meth:`PriorCache.check_entry` (files present, sha256 and shapes as
    recorded) and names the same source signatures; a damaged entry is recomputed and reported in
    ``BuildStats.repaired``; a prior whose source changed is recomputed, the other one kept. ``force`` recomputes
    everything. Each entry is computed while its lock is held, so shards and concurrent runs may share a cache.
    """
    t0 = time.perf_counter()
    i0, n = shard
    todo = list(images)[i0::n]
    mblock, dblock = source_block(mask_source), source_block(depth_source)
    mdig, ddig = signature_digest(mblock), signature_digest(dblock)
    mkind, dkind = source_kind(mask_source), source_kind(depth_source)
    stats = BuildStats(n_images=len(todo))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="priors", unit="img", dynamic_ncols=True)
    try:
        for im in todo:
            with cache.lock(im.key):
                problem = cache.check_entry(im.key, deep=True)
                entry = cache.read_entry(im.key) if problem is None else None
                if problem is not None and cache.entry_path(im.key).is_file():
                    stats.repaired.append(problem)
                need_m = force or entry is None or entry["masks"]["signature_digest"] != mdig
                need_d = force or entry is None or entry["depth"]["signature_digest"] != ddig
                if not (need_m or need_d):
                    stats.skipped += 1
                else:
                    what = f"image {im.stem} ({im.source_file or 'processed'}, {im.hw[0]}x{im.hw[1]})"
                    kept = cache.load(im.key, with_masks=not need_m) if not (need_m and need_d) else None
                    masks = check_mask_output(mask_source(im.image, im.stem), mblock["name"], what, im.hw) if need_m else kept.masks
                    depth = (check_depth_output(depth_source(im.image, im.stem), dblock["name"], what, im.hw) if need_d
                             else kept.depth.astype(np.float16))
                    cache.write(im.key, im.stem, im.digest, im.hw, masks, depth,
                                mblock if need_m else entry["masks"]["source"],
                                dblock if need_d else entry["depth"]["source"],
                                mkind if need_m else entry["masks"]["kind"], dkind if need_d else entry["depth"]["kind"],
                                source_file=im.source_file)
                    stats.computed += 1
                    stats.masks_computed += int(need_m)
                    stats.depth_computed += int(need_d)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def datamanager_images(datamanager, split: str = "train", cached: Optional[Sequence[dict]] = None) -> List[PriorImage]:
    """:class:`PriorImage` records of a nerfstudio full-image datamanager's cached ``split`` images (loading and
    undistorting them if needed; or ``cached``, the list being built): exactly the pixels the model trains on."""
    dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
    if cached is None:
        cached = datamanager.cached_train if split == "train" else datamanager.cached_eval
    data_dir = Path(datamanager.config.dataparser.data)
    data_dir = data_dir.parent if data_dir.suffix == ".json" else data_dir
    out: List[PriorImage] = []
    stems = set()
    for i, d in enumerate(cached):
        path = Path(dataset.image_filenames[i])
        if path.stem in stems:
            raise PriorCacheError(f"two {split} images share the file stem {path.stem!r} ({path}); prior entries are "
                                  "named by stem, so stems must be unique")
        stems.add(path.stem)
        try:
            rel = path.resolve().relative_to(data_dir.resolve()).as_posix()
        except ValueError:
            rel = path.as_posix()
        out.append(PriorImage(path.stem, d["image"], rel))
    return out
