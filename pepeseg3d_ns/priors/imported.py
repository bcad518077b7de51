"""Bring your own priors: masks from another model (SAM 2, a manual tool) and depth from another estimator.

The files must be of the images the model trains on, pixel for pixel. Those are not always the photos: nerfstudio
undistorts and crops COLMAP images and may train on a downscaled copy. ``pepeseg3d priors --export-images DIR``
writes exactly those images (``<stem>.png``); run your model on them, then import its output with
``pepeseg3d priors --masks-from MASKS --depth-from DEPTH`` (or ``--pipeline.datamanager.prior-sources.masks-from``
in ns-train). Entries made this way are labelled ``"kind": "imported"`` in the cache. A file of another size is
an error naming the expected size; nothing is resampled.

Mask files, looked up by the training image's stem, first match wins:

* ``<stem>.npz`` (array ``masks``, optional ``scores`` [M]) or ``<stem>.npy``: bool / 0-1 ``[M, H, W]``;
* ``<stem>/*.png``: one binary mask per file (nonzero = inside), sorted by file name;
* ``<stem>.png``: an instance-id map (8 or 16 bit; each nonzero id is one mask, 0 = no mask).

Depth files: ``<stem>.npy`` (float ``[H, W]``) or ``<stem>.png`` (16-bit), holding relative inverse depth
(``kind="disparity"``, larger = nearer) or depth (``kind="depth"``, converted to ``1 / depth``; pixels with depth
<= 0 get 0). Values are divided by their maximum when they exceed float16's range (the loss is scale invariant).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from pepeseg3d_ns.priors.cache import PriorCacheError

__all__ = ["ImportedMasks", "ImportedDepth"]


def _folder_digest(folder: Path) -> str:
    """Digest of the names, sizes and modification times of every file under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check_folder(folder: Path, flag: str) -> Path:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PriorCacheError(f"{flag} {folder}: not a folder")
    return folder


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as err:  # noqa: BLE001
        raise PriorCacheError(f"{path} could not be read as an image ({type(err).__name__}: {err})") from None


def _size_error(path: Path, got, hw, flag: str) -> PriorCacheError:
    return PriorCacheError(
        f"{path} is {got[0]}x{got[1]} (HxW) but the training image is {hw[0]}x{hw[1]} (as nerfstudio hands it to the "
        f"model: undistorted, cropped, downscaled); run your model on the images written by "
        f"`pepeseg3d priors --export-images DIR` (same dataparser arguments) and pass that output to {flag}"
    )


class ImportedMasks:
    """Mask source reading a folder of user masks (see the module docstring)."""

    name = "imported-masks"
    kind = "imported"

    def __init__(self, folder: Path, flag: str = "--masks-from"):
        self.flag = flag
        self.folder = _check_folder(folder, flag)
        self._digest = _folder_digest(self.folder)

    def signature(self) -> dict:
        return {"importer": "masks", "folder": str(self.folder.resolve()), "files": self._digest}

    def __call__(self, image: np.ndarray, stem: str) -> Dict[str, np.ndarray]:
        hw = tuple(image.shape[:2])
        f = self.folder
        scores: Optional[np.ndarray] = None
        if (f / f"{stem}.npz").is_file():
            path = f / f"{stem}.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    if "masks" not in z.files:
                        raise PriorCacheError(f"{path} holds no array 'masks' (found {z.files})")
                    masks = np.asarray(z["masks"])
                    scores = np.asarray(z["scores"], np.float32) if "scores" in z.files else None
            except PriorCacheError:
                raise
            except Exception as err:  # noqa: BLE001
                raise PriorCacheError(f"{path} could not be read ({type(err).__name__}: {err})") from None
        elif (f / f"{stem}.npy").is_file():
            path = f / f"{stem}.npy"
            try:
                masks = np.load(path, allow_pickle=False)
            except Exception as err:  # noqa: BLE001
                raise PriorCacheError(f"{path} could not be read ({type(err).__name__}: {err})") from None
        elif (f / stem).is_dir():
            path = f / stem
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
            layers: List[np.ndarray] = []
            for p in files:
                a = _read_png(p)
                a = a[..., 0] if a.ndim == 3 else a
                if a.shape != hw:
                    raise _size_error(p, a.shape, hw, self.flag)
                layers.append(a != 0)
            masks = np.stack(layers) if layers else np.zeros((0,) + hw, bool)
        elif (f / f"{stem}.png").is_file():
            path = f / f"{stem}.png"
            ids = _read_png(path)
            if ids.ndim != 2:
                raise PriorCacheError(f"{path}: an instance-id map must be single-channel (8 or 16 bit), got shape {ids.shape}")
            if ids.shape != hw:
                raise _size_error(path, ids.shape, hw, self.flag)
            values = [v for v in np.unique(ids) if v != 0]
            masks = np.stack([ids == v for v in values]) if values else np.zeros((0,) + hw, bool)
        else:
            raise PriorCacheError(f"{self.flag} {f}: no masks for training image {stem!r} (looked for {stem}.npz, "
                                  f"{stem}.npy, {stem}/*.png, {stem}.png)")
        if masks.ndim != 3:
            raise PriorCacheError(f"{path}: masks must be [M, H, W], got shape {masks.shape}")
        if tuple(masks.shape[1:]) != hw:
            raise _size_error(path, masks.shape[1:], hw, self.flag)
        out = {"masks": masks.astype(bool)}
        if scores is not None:
            out["scores"] = scores
        return out


class ImportedDepth:
    """Depth source reading a folder of user depth maps (see the module docstring)."""

    name = "imported-depth"
    kind = "imported"

    def __init__(self, folder: Path, kind: str = "disparity", flag: str = "--depth-from"):
        if kind not in ("disparity", "depth"):
            raise PriorCacheError(f"depth file kind must be 'disparity' or 'depth', got {kind!r}")
        self.flag = flag
        self.folder = _check_folder(folder, flag)
        self.file_kind = kind
        self._digest = _folder_digest(self.folder)

    def signature(self) -> dict:
        return {"importer": "depth", "folder": str(self.folder.resolve()), "files": self._digest,
                "holds": self.file_kind}

    def __call__(self, image: np.ndarray, stem: str) -> np.ndarray:
        hw = tuple(image.shape[:2])
        f = self.folder
        if (f / f"{stem}.npy").is_file():
            path = f / f"{stem}.npy"
            try:
                d = np.load(path, allow_pickle=False).astype(np.float64)
            except Exception as err:  # noqa: BLE001
                raise PriorCacheError(f"{path} could not be read ({type(err).__name__}: {err})") from None
        elif (f / f"{stem}.png").is_file():
            path = f / f"{stem}.png"
            d = _read_png(path).astype(np.float64)
        else:
            raise PriorCacheError(f"{self.flag} {f}: no depth for training image {stem!r} (looked for {stem}.npy, {stem}.png)")
        if d.ndim == 3 and d.shape[-1] == 1:
            d = d[..., 0]
        if d.ndim != 2:
            raise PriorCacheError(f"{path}: depth must be [H, W], got shape {d.shape}")
        if d.shape != hw:
            raise _size_error(path, d.shape, hw, self.flag)
        if not np.all(np.isfinite(d)):
            raise PriorCacheError(f"{path} holds non-finite values")
        if self.file_kind == "depth":
            d = np.where(d > 0, 1.0 / np.maximum(d, 1e-12), 0.0)
        peak = float(np.abs(d).max()) if d.size else 0.0
        if peak > 6e4:
            d = d / peak
        return d.astype(np.float32)
