"""Depth-Anything-V2 depth prior, from a Hugging Face model id or a local ``save_pretrained`` folder.

What :class:`DepthAnythingSource` returns for an image ``[H, W, 3]`` uint8 RGB is a float32 ``[H, W]`` array at
the image's own resolution holding the model's raw ``predicted_depth``, which for Depth-Anything(-V2) relative
models is

* RELATIVE INVERSE DEPTH (disparity-like): larger values are NEARER the camera; it is not z-depth and not metric;
* affine-ambiguous: ``1 / z  ~  a * D + b`` with an unknown scale ``a > 0`` and shift ``b`` per image, so any use
  must fit ``(a, b)`` (e.g. least squares against rendered inverse depth) before comparing values;
* non-negative (the relative head ends in a ReLU); background / sky tends to 0.

The network runs at the image processor's resolution (Depth-Anything-V2: aspect ratio kept, the side that needs
the least scaling brought to ``input_size`` = 518 by default, both sides rounded to multiples of 14; bicubic) and
its output is resized back to ``[H, W]`` with bilinear interpolation (``align_corners=False``; bilinear rather
than bicubic so that no overshoot below 0 or above the predicted range is introduced).

Models whose config says ``depth_estimation_type == "metric"`` (metric Depth-Anything fine-tunes) output metric
z-depth instead and are refused. ``torch`` / ``transformers`` are imported lazily.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import numpy as np

from pepeseg3d_ns.priors.cache import check_rgb_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
#: Architectures whose relative head outputs inverse depth (DPT / MiDaS-style and Depth-Anything).
_RELATIVE_INVERSE_MODEL_TYPES = ("depth_anything", "dpt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class DepthConfig:
    """Depth-Anything-V2 relative depth prior."""

    model: str = DEFAULT_DEPTH_MODEL
    """Hugging Face model id (downloaded to / read from the HF cache) or a local folder saved by save_pretrained."""
    input_size: Optional[int] = None
    """Network input size (short side, multiple of 14); None = the image processor's default (518 for V2)."""
    local_files_only: bool = False
    """Never contact the Hugging Face Hub; use only the local folder or the HF cache. (A hub id already in the HF
    cache is used from the cache without a network check either way; `hf download` updates it.)"""


def _short_reason(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def folder_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's JSON configs (contents) and weight files (names and sizes)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if p.suffix == ".json" and not p.name.endswith(".index.json"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        elif p.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


@dataclass
class _Resolved:
    kind: str  # "folder" or "hub"
    src: str  # what from_pretrained receives
    revision: Optional[str]  # hub commit
    fingerprint: str  # folder fingerprint or hub commit
    display: str  # folder name or hub id


class DepthAnythingSource:
    """:class:`DepthSource` backed by a transformers depth-estimation model (Depth-Anything-V2 by default).

    ``AutoImageProcessor`` / ``AutoModelForDepthEstimation.from_pretrained(cfg.model, ...)`` is the one loading
    call for hub ids and local folders; a hub id is pinned to the commit found in the HF cache (or downloaded,
    once, when not cached and ``local_files_only`` is off). The model is loaded lazily, on the first call (or by
    :meth:`load`); :meth:`signature` only resolves where the model lives (a folder, or the hub commit via
    ``config.json``), and
    both raise ``FileNotFoundError`` with download instructions when the model is not available.
    """

    name = "depth-anything-v2"

    def __init__(self, cfg: Optional[DepthConfig] = None, device: Union[str, "torch.device"] = "cpu") -> None:
        self.cfg = cfg if cfg is not None else DepthConfig()
        self.device = str(device)
        self._resolved: Optional[_Resolved] = None
        self._model = None
        self._processor = None

    # -- errors
    def _unavailable(self, reason: str) -> FileNotFoundError:
        model = self.cfg.model
        hub_id = model if (_HUB_ID.match(model) and not Path(model).expanduser().exists()) else DEFAULT_DEPTH_MODEL
        return FileNotFoundError(
            f"Depth model {model!r} is not available ({reason}). "
            f"On a machine with internet, download it with `hf download {hub_id} --local-dir PATH` "
            f"(older huggingface_hub: `huggingface-cli download {hub_id} --local-dir PATH`), copy PATH here and pass "
            f"--depth-model PATH; or run once online so it lands in the Hugging Face cache."
        )

    # -- resolution
    def _resolve(self) -> _Resolved:
        if self._resolved is not None:
            return self._resolved
        model = str(self.cfg.model)
        folder = Path(model).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise self._unavailable(f"folder {folder} has no config.json; it is not a save_pretrained folder")
            self._resolved = _Resolved("folder", str(folder), None, folder_fingerprint(folder), folder.name)
        elif folder.exists():
            raise ValueError(f"Depth model {model!r} is a file; pass a model folder or a Hugging Face model id.")
        elif not _HUB_ID.match(model):
            raise self._unavailable(f"folder {folder} does not exist")
        else:
            cfg_path = self._hub_config_path(model)
            commit = cfg_path.parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
            self._resolved = _Resolved("hub", model, commit, commit, model)
        return self._resolved

    def _hub_config_path(self, repo_id: str) -> Path:
        """``config.json`` of a hub model: from the HF cache when it is there (no network), else downloaded
        (unless ``local_files_only``)."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(repo_id, "config.json")
        except Exception as e:  # noqa: BLE001 - e.g. an invalid repo id
            raise self._unavailable(f"not a local folder, and not a valid model id: {_short_reason(e)}") from None
        if isinstance(cached, str):
            return Path(cached)
        if self.cfg.local_files_only:
            raise self._unavailable("not a local folder, and not in the Hugging Face cache; local_files_only is set")
        try:
            return Path(hf_hub_download(repo_id, "config.json"))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network: one message
            reason = f"not a local folder, not in the Hugging Face cache, and {_short_reason(e)}"
            raise self._unavailable(reason) from None

    def signature(self) -> Dict[str, Any]:
        """JSON-serialisable: model id or folder name, hub commit or folder fingerprint, input size, resizing."""
        r = self._resolve()
        return {
            "source": self.name,
            "model": r.display,
            "kind": r.kind,
            ("revision" if r.kind == "hub" else "fingerprint"): r.fingerprint,
            "input_size": None if self.cfg.input_size is None else int(self.cfg.input_size),
            "output": "relative_inverse_depth",
            "resize": "bilinear",
        }

    # -- model
    def load(self) -> None:
        """Load the processor and the model now (idempotent)."""
        if self._model is not None:
            return
        r = self._resolve()
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        kw: Dict[str, Any] = {}
        if r.revision is not None:
            kw["revision"] = r.revision  # the commit the signature names
        # Cache / folder first, without any network look-up (an offline machine would otherwise spend ~25 s in
        # retries per file); only a hub model whose files are not all cached yet is then fetched online.
        attempts = [True] if (r.kind == "folder" or self.cfg.local_files_only) else [True, False]
        for attempt, local_only in enumerate(attempts):
            try:
                processor = AutoImageProcessor.from_pretrained(r.src, local_files_only=local_only, **kw)
                model = AutoModelForDepthEstimation.from_pretrained(r.src, local_files_only=local_only, **kw)
                break
            except OSError as e:  # missing weights / processor files (offline, not cached, incomplete folder)
                if attempt == len(attempts) - 1:
                    raise self._unavailable(_short_reason(e)) from None
            except (ValueError, KeyError, TypeError) as e:  # files there, but not a depth model transformers knows
                raise ValueError(
                    f"Depth model {self.cfg.model!r} cannot be loaded as a depth-estimation model: {_short_reason(e)}"
                ) from None
        conf = model.config
        if conf.model_type not in _RELATIVE_INVERSE_MODEL_TYPES or getattr(
            conf, "depth_estimation_type", "relative"
        ) != "relative":
            raise ValueError(
                f"Depth model {self.cfg.model!r} ({conf.model_type}, "
                f"{getattr(conf, 'depth_estimation_type', 'relative')}) does not output relative inverse depth; "
                f"use a relative Depth-Anything-V2 model such as {DEFAULT_DEPTH_MODEL}."
            )
        self._processor = processor
        self._model = model.to(self.device, dtype=torch.float32).eval()

    def __call__(self, image: np.ndarray, stem: str = "") -> np.ndarray:
        """Relative inverse depth of one image.

        Args:
            image: [H, W, 3] uint8 RGB.
            stem: image file stem (unused; part of the source protocol).

        Returns:
            float32 [H, W]: relative inverse depth (larger = nearer, unknown scale and shift), see module docstring.
        """
        import torch
        import torch.nn.functional as F

        image = check_rgb_image(image, stem)
        self.load()
        h, w = image.shape[:2]
        kw: Dict[str, Any] = {}
        if self.cfg.input_size is not None:
            kw["size"] = {"height": int(self.cfg.input_size), "width": int(self.cfg.input_size)}
        inputs = self._processor(images=image, return_tensors="pt", input_data_format="channels_last", **kw)
        pixels = inputs["pixel_values"].to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            pred = self._model(pixel_values=pixels).predicted_depth  # [1, h', w']
        if pred.ndim == 3:
            pred = pred[:, None]
        pred = F.interpolate(pred.float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return pred.cpu().numpy().astype(np.float32, copy=False)

