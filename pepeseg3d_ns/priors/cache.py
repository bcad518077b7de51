"""On-disk cache of the perception priors (SAM masks + relative depth) of the images a model trains on.

**Keyed by the image the model sees.** nerfstudio's datamanager hands the model processed images: undistorted
and cropped (COLMAP's OPENCV cameras), read from ``images_N/`` when it picks a downscale factor, rescaled by
``camera_res_scale_factor``. Priors must be pixel-aligned with *those* images, so they are computed on them (the
datamanager's cached images, :mod:`pepeseg3d_ns.priors.compute`) and stored under a key made of the image's
stem and a digest of its pixels (:func:`image_key`). A changed photo, undistortion, downscale factor or
dataparser option gives other pixels, hence another key: the priors are computed for it, never reused wrongly.

Layout (``<data>/pepe_priors/`` by default)::

    cache.json              {"format": "pepeseg3d-priors", "version": 2}
    entries/<key>.json      one per processed image (below); written last, so it never describes missing files
    masks/<key>.npz         a MaskSet (bit-packed masks) plus its per-pixel index (priors/masks.py)
    depth/<key>.npy         float16 [H, W] relative inverse depth (larger = nearer, unknown scale and shift)
    locks/<key>.lock        advisory lock held while an entry is computed and written
    preview.png             a picture of a few entries (``pepeseg3d priors``)

An entry::

    {"format": "pepeseg3d-prior-entry", "version": 2, "key": ..., "stem": ..., "image_digest": sha256 of the
     pixels, "height": H, "width": W, "source_file": the file the image was read from (informational),
     "masks": {"file": "masks/<key>.npz", "sha256": of the file, "n_masks": M, "kind": "computed" | "simulated" |
               "imported", "source": {"name": ..., "signature": {...}}, "signature_digest": ...},
     "depth": {"file": ..., "sha256": ..., "kind": ..., "source": {...}, "signature_digest": ...,
               "convention": DEPTH_CONVENTION}}

**Concurrency and damage.** Every file is written to a temporary name and renamed. An entry is computed and
written while its lock file is held (``fcntl.flock``), so two ``pepeseg3d priors`` processes (shards of one job,
or two jobs with different settings) never interleave the files of one entry; the entry records the sha256 of
each file, so a file changed behind its back (another writer, a truncated copy) is detected when it is read
(:meth:`PriorCache.load`) or checked (:meth:`PriorCache.check_entry`), and recomputed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from pepeseg3d_ns.priors.masks import MaskSet, atomic_tmp_path

__all__ = [
    "CACHE_DIRNAME",
    "CACHE_VERSION",
    "DEPTH_CONVENTION",
    "PriorCacheError",
    "PriorCache",
    "ImagePriors",
    "image_key",
    "file_sha256",
    "check_rgb_image",
    "signature_digest",
    "source_block",
    "load_image_rgb",
    "check_mask_output",
    "check_depth_output",
]

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "pepe_priors"
CACHE_VERSION = 2
ENTRY_FORMAT = "pepeseg3d-prior-entry"
DEPTH_CONVENTION = ("relative inverse depth (disparity up to an unknown scale and shift; larger = nearer), "
                    "float16, image resolution")
KINDS = ("computed", "simulated", "imported")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PriorCacheError(ValueError):
    """The prior cache is missing, damaged or inconsistent with the images (the message says how to fix it)."""


# --------------------------------------------------------------------------------------------- small helpers


_SHA256_CACHE: dict = {}


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, streamed, memoised per (resolved path, size, mtime): a 2.5 GB SAM
    checkpoint is hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def check_rgb_image(image: np.ndarray, stem: str) -> np.ndarray:
    """``image`` as a contiguous, writable ``[H, W, 3] uint8`` array; ValueError naming ``stem`` otherwise.
    (torch warns when handed read-only arrays, e.g. straight from PIL.)"""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image {stem!r}: expected [H, W, 3] uint8 RGB, got shape {image.shape} {image.dtype}")
    image = np.ascontiguousarray(image)
    return image if image.flags.writeable else image.copy()


def signature_digest(signature: dict) -> str:
    """Short stable digest of a JSON-serialisable signature (canonical JSON, sorted keys)."""
    text = json.dumps(signature, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    """JSON round trip, so a signature compares equal to its copy read back from disk."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def source_block(source: Any) -> dict:
    """``{"name", "signature"}`` of a mask or depth source (any object with ``name`` and ``signature()``)."""
    return {"name": str(getattr(source, "name", type(source).__name__)), "signature": _canonical(source.signature())}


def source_kind(source: Any) -> str:
    """``"computed"``, ``"simulated"`` or ``"imported"``: a source's ``kind`` attribute (default computed;
    sources named "simulated" are simulated)."""
    kind = getattr(source, "kind", None) or ("simulated" if getattr(source, "name", "") == "simulated" else "computed")
    if kind not in KINDS:
        raise ValueError(f"prior source {getattr(source, 'name', source)!r} has kind {kind!r}; expected one of {KINDS}")
    return kind


def image_key(stem: str, image: np.ndarray) -> Tuple[str, str]:
    """``(key, digest)`` of a processed image ``[H, W, 3] uint8``: digest = sha256 of its shape and pixels,
    key = ``<stem>-<first 16 hex digits of the digest>`` (the cache's file names)."""
    image = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(np.array(image.shape, np.int64).tobytes())
    h.update(str(image.dtype).encode())
    h.update(image.tobytes())
    digest = h.hexdigest()
    safe = "".join(c if (c.isalnum() or c in "._-") else "_" for c in stem)
    return f"{safe}-{digest[:16]}", digest


def load_image_rgb(path: Union[str, Path]) -> np.ndarray:
    """[H, W, 3] uint8 RGB of an image file (grey / RGBA / palette images converted)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Exception as err:  # PIL.UnidentifiedImageError, OSError (truncated file) ...
        raise PriorCacheError(f"image {path} could not be read ({type(err).__name__}: {err})") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        import errno

        if err.errno == errno.ENOSPC:
            raise PriorCacheError(f"disk full while writing {path}; free space and re-run (finished entries are kept)") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _list_names(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def check_mask_output(out: Any, source_name: str, what: str, hw: Tuple[int, int]) -> MaskSet:
    """A mask source's output (``{"masks": bool [M, H, W], "scores"?: [M], "stability"?: [M], "labels"?: [M]}``,
    or a :class:`MaskSet`) as a MaskSet of size ``hw``; PriorCacheError naming ``what`` otherwise."""
    if isinstance(out, MaskSet):
        if out.shape != tuple(hw):
            raise PriorCacheError(f"mask source {source_name!r} returned masks of size {out.height}x{out.width} for "
                                  f"{what}, which is {hw[0]}x{hw[1]}")
        return out
    if not isinstance(out, dict) or "masks" not in out:
        raise PriorCacheError(f"mask source {source_name!r} must return a dict with 'masks' (and optionally 'scores', "
                              f"'stability', 'labels') or a MaskSet; got {type(out).__name__} for {what}")
    masks = out["masks"]
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(hw):
        raise PriorCacheError(
            f"mask source {source_name!r} returned masks of shape {tuple(masks.shape)} for {what} "
            f"({hw[0]}x{hw[1]}); expected [M, {hw[0]}, {hw[1]}]"
        )
    m = masks.shape[0]

    def _vec(key: str) -> Optional[np.ndarray]:
        v = out.get(key)
        if v is None:
            return None
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        v = np.asarray(v, np.float32).reshape(-1)
        if v.shape != (m,):
            raise PriorCacheError(f"mask source {source_name!r} returned {key} of length {v.shape[0]} for {m} masks ({what})")
        return v

    meta = {"source": source_name}
    labels = out.get("labels")
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != m:
            raise PriorCacheError(f"mask source {source_name!r} returned {len(labels)} labels for {m} masks ({what})")
        meta["labels"] = labels
    return MaskSet.from_dense(masks, _vec("scores"), _vec("stability"), meta=meta)


def check_depth_output(out: Any, source_name: str, what: str, hw: Tuple[int, int]) -> np.ndarray:
    """A depth source's output (``[H, W]`` relative inverse depth) as float16; PriorCacheError naming ``what``
    when its shape differs from ``hw``, it holds non-finite values or it exceeds the float16 range."""
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    d = np.asarray(out, dtype=np.float32)
    if d.ndim == 3 and d.shape[-1] == 1:
        d = d[..., 0]
    if d.shape != tuple(hw):
        raise PriorCacheError(f"depth source {source_name!r} returned shape {d.shape} for {what}; expected {tuple(hw)}")
    if not np.all(np.isfinite(d)):
        raise PriorCacheError(f"depth source {source_name!r} returned non-finite values for {what}")
    peak = float(np.abs(d).max()) if d.size else 0.0
    if peak > _FLOAT16_MAX:
        raise PriorCacheError(f"depth source {source_name!r} returned values up to {peak:g} for {what}, beyond the "
                              f"float16 range of the cache; normalise the output of the source")
    return d.astype(np.float16)


# --------------------------------------------------------------------------------------------- the cache


@dataclass
class ImagePriors:
    """The priors of one processed image: ``masks`` (a :class:`MaskSet` of ``height x width``), ``depth``
    (``float32 [H, W]`` relative inverse depth) and the ``entry`` they were read from."""

    key: str
    masks: MaskSet
    depth: np.ndarray
    entry: dict = field(repr=False)


class PriorCache:
    """A prior cache folder (see the module docstring). Use :meth:`open`."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)

    # ------------------------------------------------------------------ opening
    @staticmethod
    def default_dir(data_dir: Union[str, Path]) -> Path:
        """``<data>/pepe_priors`` for a data folder (the folder of a transforms.json file given as --data)."""
        data_dir = Path(data_dir)
        if data_dir.suffix == ".json":
            data_dir = data_dir.parent
        return data_dir / CACHE_DIRNAME

    @classmethod
    def open(cls, cache_dir: Union[str, Path], create: bool = False) -> "PriorCache":
        """Open the cache folder ``cache_dir`` (creating an empty one when ``create``).

        Raises :class:`PriorCacheError` when the folder holds no cache (and ``create`` is False) or a cache of an
        older layout (v1: ``manifest.json``, keyed by file): then re-run ``pepeseg3d priors``."""
        cache_dir = Path(cache_dir)
        header = cache_dir / "cache.json"
        if header.is_file():
            try:
                h = json.loads(header.read_text())
            except (OSError, ValueError) as err:
                if not create:
                    raise PriorCacheError(f"{header} is not valid JSON ({err}); re-run `pepeseg3d priors` to rewrite it") from None
                h = None
            if h is not None and (not isinstance(h, dict) or h.get("version") != CACHE_VERSION):
                got = h.get("version") if isinstance(h, dict) else h
                if not create:
                    raise PriorCacheError(f"{header} names cache version {got!r}; this pepeseg3d reads version "
                                          f"{CACHE_VERSION}: re-run `pepeseg3d priors` to rebuild it")
                h = None
            if h is not None:
                return cls(cache_dir)
        elif not create:
            if (cache_dir / "manifest.json").is_file():
                raise PriorCacheError(
                    f"{cache_dir} holds a prior cache of an older pepeseg3d (manifest.json, keyed by image file); "
                    f"priors are now keyed by the images nerfstudio trains on: re-run `pepeseg3d priors` (or let "
                    f"ns-train compute them) to rebuild it"
                )
            raise PriorCacheError(f"no perception-prior cache at {cache_dir} (missing cache.json)")
        for sub in ("entries", "masks", "depth", "locks"):
            (cache_dir / sub).mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(header, json.dumps({"format": "pepeseg3d-priors", "version": CACHE_VERSION}).encode())
        return cls(cache_dir)

    # ------------------------------------------------------------------ paths
    def entry_path(self, key: str) -> Path:
        return self.cache_dir / "entries" / f"{key}.json"

    def keys(self) -> List[str]:
        """Keys of every entry file present (sorted)."""
        folder = self.cache_dir / "entries"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the advisory lock of entry ``key`` (blocks while another process holds it)."""
        path = self.cache_dir / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except ImportError:  # no fcntl (Windows): entries still detect interleaved writes by their digests
                pass
            try:
                yield
            finally:
                try:
                    import fcntl

                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                except ImportError:
                    pass

    # ------------------------------------------------------------------ entries
    def read_entry(self, key: str) -> Optional[dict]:
        """The entry of ``key``; None when there is none. PriorCacheError naming the file when it is unreadable or
        not an entry (wrong JSON shape, missing or mistyped fields)."""
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            e = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PriorCacheError(f"entry {path} is not valid JSON ({err})") from None
        problem = _entry_problem(e, key)
        if problem:
            raise PriorCacheError(f"entry {path} is damaged: {problem}")
        return e

    def check_entry(self, key: str, deep: bool = True) -> Optional[str]:
        """None when entry ``key`` is healthy, else what is wrong with it (one line naming the file).

        Healthy: the entry reads (:meth:`read_entry`), both files exist and, with ``deep``, their sha256 match the
        entry and their headers give the entry's shape and dtype. A missing entry is reported as missing."""
        try:
            e = self.read_entry(key)
        except PriorCacheError as err:
            return str(err)
        if e is None:
            return f"no entry {self.entry_path(key)}"
        for part in ("masks", "depth"):
            path = self.cache_dir / e[part]["file"]
            if not path.is_file():
                return f"{part} file {path} of entry {key} is missing"
            if deep and file_sha256(path) != e[part]["sha256"]:
                return f"{part} file {path} does not match its entry (changed, truncated or written by another run)"
        if deep:
            hw = (int(e["height"]), int(e["width"]))
            mpath, dpath = self.cache_dir / e["masks"]["file"], self.cache_dir / e["depth"]["file"]
            try:
                mshape = MaskSet.read_shape(mpath)
            except (ValueError, FileNotFoundError) as err:
                return str(err)
            if mshape != hw:
                return f"mask file {mpath} holds masks of size {mshape[0]}x{mshape[1]}, its entry says {hw[0]}x{hw[1]}"
            try:
                arr = np.load(dpath, mmap_mode="r", allow_pickle=False)
            except Exception as err:  # noqa: BLE001 - any unreadable file is one message
                return f"depth file {dpath} could not be read ({type(err).__name__}: {err})"
            if arr.shape != hw or arr.dtype != np.float16:
                return f"depth file {dpath} holds {arr.dtype} {arr.shape}, its entry says float16 {hw}"
        return None

    def load(self, key: str, with_masks: bool = True) -> ImagePriors:
        """Masks and depth of entry ``key``, checked against the entry (sha256 of each file, shapes).

        Raises PriorCacheError naming the file (and the command that repairs it) when anything disagrees."""
        e = self.read_entry(key)
        if e is None:
            raise PriorCacheError(f"no prior entry {self.entry_path(key)}; compute it with `pepeseg3d priors`")
        hw = (int(e["height"]), int(e["width"]))
        masks = None
        if with_masks:
            data = self._read_verified(e, "masks")
            try:
                masks = MaskSet.load(io.BytesIO(data), expected_shape=hw, name=str(self.cache_dir / e["masks"]["file"]))
            except ValueError as err:
                raise PriorCacheError(f"{err}; re-run `pepeseg3d priors` to recompute it") from None
            if len(masks) != int(e["masks"]["n_masks"]):
                raise PriorCacheError(f"mask file {self.cache_dir / e['masks']['file']} holds {len(masks)} masks, its "
                                      f"entry says {e['masks']['n_masks']}; re-run `pepeseg3d priors` to recompute it")
        data = self._read_verified(e, "depth")
        dpath = self.cache_dir / e["depth"]["file"]
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001
            raise PriorCacheError(f"depth file {dpath} could not be read ({type(err).__name__}: {err}); re-run "
                                  f"`pepeseg3d priors` to recompute it") from None
        if arr.shape != hw:
            raise PriorCacheError(f"depth file {dpath} has shape {arr.shape} but its image is {hw[0]}x{hw[1]}; re-run "
                                  f"`pepeseg3d priors` to recompute it")
        return ImagePriors(key, masks, np.asarray(arr, dtype=np.float32), e)

    def _read_verified(self, e: dict, part: str) -> bytes:
        path = self.cache_dir / e[part]["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PriorCacheError(f"{part} file {path} is missing; re-run `pepeseg3d priors` to recompute it") from None
        if hashlib.sha256(data).hexdigest() != e[part]["sha256"]:
            raise PriorCacheError(f"{part} file {path} does not match its entry {self.entry_path(e['key'])} (changed, "
                                  f"truncated or written by another run); re-run `pepeseg3d priors` to recompute it")
        return data

    def write(self, key: str, stem: str, image_digest: str, hw: Tuple[int, int], masks: MaskSet, depth: np.ndarray,
              mask_block: dict, depth_block: dict, mask_kind: str, depth_kind: str, source_file: str = "") -> dict:
        """Write the files of entry ``key`` then the entry itself (each atomically); returns the entry. Call it
        while holding :meth:`lock` of ``key``. ``depth`` must be float16 ``[H, W]`` and ``masks`` of size ``hw``."""
        if masks.shape != tuple(hw) or tuple(depth.shape) != tuple(hw) or depth.dtype != np.float16:
            raise ValueError(f"entry {key}: masks {masks.shape} / depth {depth.dtype} {depth.shape} do not match {hw}")
        mrel, drel = f"masks/{key}.npz", f"depth/{key}.npy"
        mbytes = masks.to_bytes()
        dbytes = _npy_bytes(depth)
        _atomic_write_bytes(self.cache_dir / mrel, mbytes)
        _atomic_write_bytes(self.cache_dir / drel, dbytes)
        entry = {
            "format": ENTRY_FORMAT,
            "version": CACHE_VERSION,
            "key": key,
            "stem": stem,
            "image_digest": image_digest,
            "height": int(hw[0]),
            "width": int(hw[1]),
            "source_file": str(source_file),
            "masks": {"file": mrel, "sha256": hashlib.sha256(mbytes).hexdigest(), "n_masks": len(masks),
                      "kind": mask_kind, "source": mask_block, "signature_digest": signature_digest(mask_block)},
            "depth": {"file": drel, "sha256": hashlib.sha256(dbytes).hexdigest(), "kind": depth_kind,
                      "source": depth_block, "signature_digest": signature_digest(depth_block),
                      "convention": DEPTH_CONVENTION},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _atomic_write_bytes(self.entry_path(key), json.dumps(entry, indent=1).encode())
        return entry

    def size_bytes(self, keys: Optional[Sequence[str]] = None) -> int:
        """Bytes on disk of the entries ``keys`` (default all) and their files."""
        total = 0
        for key in (self.keys() if keys is None else keys):
            for p in (self.entry_path(key), self.cache_dir / "masks" / f"{key}.npz", self.cache_dir / "depth" / f"{key}.npy"):
                if p.exists():
                    total += p.stat().st_size
        return total


def _entry_problem(e: Any, key: str) -> Optional[str]:
    """What is wrong with the parsed JSON ``e`` as the entry of ``key`` (None when nothing is)."""
    if not isinstance(e, dict):
        return f"expected a JSON object, got {type(e).__name__}"
    if e.get("format") != ENTRY_FORMAT or e.get("version") != CACHE_VERSION:
        return f"format {e.get('format')!r} version {e.get('version')!r}, expected {ENTRY_FORMAT!r} {CACHE_VERSION}"
    if e.get("key") != key:
        return f"its key is {e.get('key')!r}, the file is named {key!r}"
    for name, typ in (("stem", str), ("image_digest", str), ("height", int), ("width", int)):
        if not isinstance(e.get(name), typ) or isinstance(e.get(name), bool):
            return f"field {name!r} is {e.get(name)!r}, expected {typ.__name__}"
    if e["height"] < 1 or e["width"] < 1:
        return f"image size {e['height']}x{e['width']} is not positive"
    for part in ("masks", "depth"):
        b = e.get(part)
        if not isinstance(b, dict):
            return f"field {part!r} is {b!r}, expected an object"
        for name in ("file", "sha256", "kind", "signature_digest"):
            if not isinstance(b.get(name), str):
                return f"field {part}.{name} is {b.get(name)!r}, expected a string"
        if b["file"] != f"{part}/{key}.{'npz' if part == 'masks' else 'npy'}":
            return f"field {part}.file is {b['file']!r}, expected {part}/{key}.{'npz' if part == 'masks' else 'npy'}"
        if b["kind"] not in KINDS:
            return f"field {part}.kind is {b['kind']!r}, expected one of {KINDS}"
        if not isinstance(b.get("source"), dict):
            return f"field {part}.source is {b.get('source')!r}, expected an object"
    n = e["masks"].get("n_masks")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"field masks.n_masks is {n!r}, expected a count"
    return None
