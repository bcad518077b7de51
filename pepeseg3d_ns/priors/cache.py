"""On-disk cache of the perception priors (masks + relative depth per training image) and the runner that fills it.

Layout (``<data>/pepe_priors/`` by default)::

    manifest.json         what is there, from which image bytes, made by which source configuration
    masks/<stem>.npz      a :class:`~pepeseg3d_ns.priors.masks.MaskSet` (bit-packed masks at image resolution)
    depth/<stem>.npy      float16 [H, W] relative inverse depth (larger = nearer, unknown scale and shift)

``manifest.json``::

    {"version": 1,
     "kind": "computed" | "simulated",
     "mask_source":  {"name": ..., "signature": {...}},
     "depth_source": {"name": ..., "signature": {...}},
     "depth_convention": "relative inverse depth (...)",
     "data_dir": "..",                       # the data folder, relative to the cache folder
     "images": {stem: {"file": "images/frame_00000.png",   # relative to the data folder
                       "sha256": ..., "height": H, "width": W, "n_masks": M,
                       "masks": "masks/<stem>.npz", "depth": "depth/<stem>.npy",
                       "mask_sig": ..., "depth_sig": ...,   # digests of the source signatures used
                       "masks_digest": ...}},                # content digest of the stored masks
     "scales": ...}                          # optional, written by the mask-scale step; never touched here

Files are written atomically (``<file>.tmp-<pid>`` + ``os.replace``) and the manifest is rewritten (atomically)
after every image, so an interrupted run keeps everything that finished and the next run resumes from there;
an entry never points at a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from pepeseg3d_ns.priors.masks import MaskSet, atomic_tmp_path

__all__ = [
    "CACHE_DIRNAME",
    "MANIFEST_VERSION",
    "DEPTH_CONVENTION",
    "PriorCacheError",
    "PriorCache",
    "BuildStats",
    "build_cache",
    "image_paths_for",
    "file_sha256",
    "check_rgb_image",
    "signature_digest",
    "load_image_rgb",
]

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "pepe_priors"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
DEPTH_CONVENTION = ("relative inverse depth (disparity up to an unknown scale and shift; larger = nearer), "
                    "float16, image resolution")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PriorCacheError(ValueError):
    """The prior cache is missing, stale or inconsistent with the images (message says how to fix it)."""


# --------------------------------------------------------------------------------------------- small helpers


_SHA256_CACHE: dict = {}


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, streamed, memoised per (resolved path, size, mtime): a 2.5 GB SAM
    checkpoint is hashed once per process, and re-validating unchanged images costs a ``stat``."""
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


def _canonical(signature: dict) -> Any:
    """JSON round trip, so a signature compares equal to its copy read back from the manifest."""
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def _masks_digest(ms: MaskSet) -> str:
    h = hashlib.sha256()
    h.update(np.array([ms.height, ms.width, len(ms)], np.int64).tobytes())
    h.update(np.ascontiguousarray(ms.bits).tobytes())
    return h.hexdigest()[:16]


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


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return int(h), int(w)


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # different drives (Windows)
        return Path(path).resolve().as_posix()


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = atomic_tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _list_names(items: Sequence[str], limit: int = 10) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def rebuild_command(data_dir: Path, cache_dir: Optional[Path] = None) -> str:
    """The ``pepeseg3d priors`` command line that (re)builds the cache of ``data_dir``."""
    cmd = f"pepeseg3d priors --data {shlex.quote(str(data_dir))}"
    if cache_dir is not None and Path(cache_dir).resolve() != (Path(data_dir) / CACHE_DIRNAME).resolve():
        cmd += f" --cache-dir {shlex.quote(str(cache_dir))}"
    return cmd


def image_paths_for(data_dir: Union[str, Path]) -> list[Path]:
    """Images of a nerfstudio dataset: ``transforms.json`` ``frames[*].file_path`` (relative to ``data_dir``),
    sorted by path.  Raises ``FileNotFoundError`` when ``transforms.json`` or a listed image is missing."""
    data_dir = Path(data_dir)
    tf = data_dir / "transforms.json"
    if not tf.is_file():
        raise FileNotFoundError(
            f"{tf} not found: --data must be a nerfstudio dataset folder holding transforms.json "
            f"(e.g. made by `ns-process-data` or `pepeseg3d synth`)"
        )
    try:
        meta = json.loads(tf.read_text())
    except json.JSONDecodeError as err:
        raise PriorCacheError(f"{tf} is not valid JSON: {err}") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise PriorCacheError(f"{tf} has no 'frames' list; nothing to compute priors for")
    paths = []
    for i, fr in enumerate(frames):
        fp = fr.get("file_path") if isinstance(fr, dict) else None
        if not fp:
            raise PriorCacheError(f"{tf}: frame {i} has no 'file_path'")
        p = Path(fp)
        paths.append(p if p.is_absolute() else data_dir / p)
    paths = sorted(set(paths), key=lambda p: p.as_posix())
    missing = [p.as_posix() for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{tf} lists {len(missing)} image(s) that do not exist: {_list_names(missing)}")
    return paths


def _stems(image_paths: Sequence[Path]) -> list[str]:
    stems = [Path(p).stem for p in image_paths]
    seen: dict[str, Path] = {}
    for stem, p in zip(stems, image_paths):
        if stem in seen:
            raise PriorCacheError(
                f"two images share the file stem {stem!r} ({seen[stem]} and {p}); prior files are named by stem, "
                f"so image stems must be unique"
            )
        seen[stem] = Path(p)
    return stems


# --------------------------------------------------------------------------------------------- the cache


class PriorCache:
    """Read access to a prior cache folder.  Use :meth:`open`."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest

    # ------------------------------------------------------------------ opening
    @staticmethod
    def resolve_dir(path: Union[str, Path]) -> Path:
        """The cache folder for ``path`` (a cache folder itself, or a data folder holding ``pepe_priors/``)."""
        path = Path(path)
        if (path / MANIFEST_NAME).is_file():
            return path
        return path / CACHE_DIRNAME

    @classmethod
    def open(cls, path: Union[str, Path]) -> "PriorCache":
        """Open the cache of a data folder (``<data>/pepe_priors``) or a cache folder given directly."""
        path = Path(path)
        cache_dir = cls.resolve_dir(path)
        mf = cache_dir / MANIFEST_NAME
        if not mf.is_file():
            data_dir = path if cache_dir == path / CACHE_DIRNAME else path.parent
            raise PriorCacheError(
                f"no perception-prior cache at {cache_dir} (missing {MANIFEST_NAME}); build it with:\n"
                f"  {rebuild_command(data_dir)}"
            )
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as err:
            raise PriorCacheError(f"{mf} is not valid JSON ({err}); delete it and rebuild the priors") from None
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            got = manifest.get("version") if isinstance(manifest, dict) else None
            raise PriorCacheError(f"{mf} has manifest version {got!r}, this code reads version {MANIFEST_VERSION}; "
                                  f"rebuild the priors with --force")
        manifest.setdefault("images", {})
        return cls(cache_dir, manifest)

    # ------------------------------------------------------------------ info
    @property
    def manifest_path(self) -> Path:
        return self.cache_dir / MANIFEST_NAME

    @property
    def data_dir(self) -> Path:
        """The data folder the image paths in the manifest are relative to."""
        rel = self.manifest.get("data_dir", "..")
        return (self.cache_dir / rel) if not Path(rel).is_absolute() else Path(rel)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "computed"))

    @property
    def stems(self) -> list[str]:
        return sorted(self.manifest.get("images", {}))

    def entry(self, stem: str) -> dict:
        try:
            return self.manifest["images"][stem]
        except KeyError:
            raise PriorCacheError(
                f"image {stem!r} is not in the prior cache {self.cache_dir}; rebuild it with:\n"
                f"  {rebuild_command(self.data_dir, self.cache_dir)}"
            ) from None

    def _current_sigs(self) -> tuple[Optional[str], Optional[str]]:
        ms = self.manifest.get("mask_source", {})
        ds = self.manifest.get("depth_source", {})
        return (signature_digest(ms["signature"]) if "signature" in ms else None,
                signature_digest(ds["signature"]) if "signature" in ds else None)

    def _is_current(self, entry: dict) -> bool:
        msig, dsig = self._current_sigs()
        return entry.get("mask_sig") == msig and entry.get("depth_sig") == dsig

    def has(self, stem: str) -> bool:
        """True when ``stem`` has both files, made with the source configuration the manifest names."""
        e = self.manifest.get("images", {}).get(stem)
        if e is None or not self._is_current(e):
            return False
        return (self.cache_dir / e["masks"]).is_file() and (self.cache_dir / e["depth"]).is_file()

    def size_bytes(self) -> int:
        """Bytes on disk of the manifest and every file it lists."""
        total = self.manifest_path.stat().st_size if self.manifest_path.exists() else 0
        for e in self.manifest.get("images", {}).values():
            for key in ("masks", "depth"):
                p = self.cache_dir / e[key]
                if p.exists():
                    total += p.stat().st_size
        return total

    def mean_masks(self) -> float:
        n = [int(e.get("n_masks", 0)) for e in self.manifest.get("images", {}).values()]
        return float(np.mean(n)) if n else 0.0

    # ------------------------------------------------------------------ loading
    def load_masks(self, stem: str) -> MaskSet:
        """The :class:`MaskSet` of ``stem`` at the resolution of its image (checked against the manifest)."""
        e = self.entry(stem)
        try:
            return MaskSet.load(self.cache_dir / e["masks"], expected_shape=(int(e["height"]), int(e["width"])))
        except ValueError as err:
            raise PriorCacheError(
                f"{err}\nrebuild the priors with: {rebuild_command(self.data_dir, self.cache_dir)} --force"
            ) from None

    def load_depth(self, stem: str) -> np.ndarray:
        """float32 [H, W] relative inverse depth of ``stem`` (larger = nearer; unknown scale and shift)."""
        e = self.entry(stem)
        path = self.cache_dir / e["depth"]
        arr = self._read_depth(path, mmap=False)
        expected = (int(e["height"]), int(e["width"]))
        if arr.shape != expected:
            raise PriorCacheError(
                f"depth file {path} has shape {arr.shape} but the image is {expected[0]}x{expected[1]} (HxW); "
                f"rebuild the priors with: {rebuild_command(self.data_dir, self.cache_dir)} --force"
            )
        return np.asarray(arr, dtype=np.float32)

    @staticmethod
    def _read_depth(path: Path, mmap: bool) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"depth file {path} does not exist")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as err:
            raise PriorCacheError(f"depth file {path} could not be read ({type(err).__name__}: {err})") from None
        if arr.ndim != 2:
            raise PriorCacheError(f"depth file {path} must hold a 2-D [H, W] array, got shape {arr.shape}")
        return arr

    def validate(self, image_paths: Iterable[Union[str, Path]], check_files: bool = True) -> None:
        """Check that every image is cached, unchanged since the cache was built, and sized like its files.

        Raises :class:`PriorCacheError` listing the offending images and the command that rebuilds the cache.
        Reads every image file (to hash it) and the headers of the stored files, not the masks themselves.
        """
        image_paths = [Path(p) for p in image_paths]
        missing, changed, stale, broken = [], [], [], []
        for p, stem in zip(image_paths, _stems(image_paths)):
            e = self.manifest.get("images", {}).get(stem)
            if e is None:
                missing.append(p.as_posix())
                continue
            if not p.is_file():
                raise FileNotFoundError(f"image {p} does not exist")
            if file_sha256(p) != e.get("sha256"):
                changed.append(p.as_posix())
                continue
            if not self._is_current(e):
                stale.append(p.as_posix())
                continue
            if not check_files:
                continue
            h, w = _image_size(p)
            if (h, w) != (int(e["height"]), int(e["width"])):
                broken.append(f"{p.as_posix()} is {h}x{w} but the manifest says {e['height']}x{e['width']}")
                continue
            mpath, dpath = self.cache_dir / e["masks"], self.cache_dir / e["depth"]
            if not mpath.is_file() or not dpath.is_file():
                broken.append(f"{stem}: missing {mpath if not mpath.is_file() else dpath}")
                continue
            try:
                mshape = MaskSet.read_shape(mpath)
            except ValueError as err:
                broken.append(str(err))
                continue
            if mshape != (h, w):
                broken.append(f"mask file {mpath} holds masks of size {mshape[0]}x{mshape[1]} but the image "
                              f"{p.as_posix()} is {h}x{w}")
                continue
            dshape = self._read_depth(dpath, mmap=True).shape
            if dshape != (h, w):
                broken.append(f"depth file {dpath} has shape {dshape} but the image {p.as_posix()} is {h}x{w}")
        if not (missing or changed or stale or broken):
            return
        lines = [f"the perception-prior cache {self.cache_dir} does not match the images:"]
        if missing:
            lines.append(f"  {len(missing)} image(s) missing from the cache: {_list_names(missing)}")
        if changed:
            lines.append(f"  {len(changed)} image(s) changed since the cache was built: {_list_names(changed)}")
        if stale:
            lines.append(f"  {len(stale)} image(s) computed with a different source configuration than the "
                         f"manifest names (interrupted rebuild?): {_list_names(stale)}")
        for b in broken[:10]:
            lines.append(f"  {b}")
        if len(broken) > 10:
            lines.append(f"  ... and {len(broken) - 10} more inconsistent file(s)")
        cmd = rebuild_command(self.data_dir, self.cache_dir)
        lines.append(f"rebuild it with:\n  {cmd}" + ("  --force" if broken and not (missing or changed) else ""))
        raise PriorCacheError("\n".join(lines))


# --------------------------------------------------------------------------------------------- the runner


@dataclass
class BuildStats:
    """What one :func:`build_cache` call did."""

    n_images: int = 0
    computed: int = 0  # images for which at least one prior was (re)computed
    skipped: int = 0  # images already complete
    masks_computed: int = 0
    depth_computed: int = 0
    seconds: float = 0.0


def _source_block(source: Any) -> dict:
    return {"name": str(getattr(source, "name", type(source).__name__)), "signature": _canonical(source.signature())}


def _check_mask_output(out: Any, source_name: str, path: Path, hw: tuple[int, int]) -> MaskSet:
    if not isinstance(out, dict) or "masks" not in out:
        raise TypeError(f"mask source {source_name!r} must return a dict with 'masks', 'scores', 'stability'")
    masks = out["masks"]
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != hw:
        raise PriorCacheError(
            f"mask source {source_name!r} returned masks of shape {tuple(masks.shape)} for {path} "
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
            raise PriorCacheError(f"mask source {source_name!r} returned {key} of length {v.shape[0]} for {m} masks")
        return v

    meta = {"source": source_name}
    labels = out.get("labels")
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != m:
            raise PriorCacheError(f"mask source {source_name!r} returned {len(labels)} labels for {m} masks")
        meta["labels"] = labels
    return MaskSet.from_dense(masks, _vec("scores"), _vec("stability"), meta=meta)


def _check_depth_output(out: Any, source_name: str, path: Path, hw: tuple[int, int]) -> np.ndarray:
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    d = np.asarray(out, dtype=np.float32)
    if d.shape != hw:
        raise PriorCacheError(f"depth source {source_name!r} returned shape {d.shape} for {path}; expected {hw}")
    if not np.all(np.isfinite(d)):
        raise PriorCacheError(f"depth source {source_name!r} returned non-finite values for {path}")
    peak = float(np.abs(d).max()) if d.size else 0.0
    if peak > _FLOAT16_MAX:
        raise PriorCacheError(f"depth source {source_name!r} returned values up to {peak:g} for {path}, beyond the "
                              f"float16 range of the cache; normalise the output of the source")
    return d.astype(np.float16)


def build_cache(
    data_dir: Union[str, Path],
    image_paths: Sequence[Union[str, Path]],
    mask_source: Any,
    depth_source: Any,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    force: bool = False,
) -> PriorCache:
    """Compute (or reuse) masks and depth for every image and return the :class:`PriorCache`.

    An image is skipped when the manifest already has it with the same file sha256, made with the same source
    signatures, and both files exist.  A changed source signature recomputes that source for every image (one log
    line says so); ``force`` recomputes everything.  ``cache.last_build`` holds a :class:`BuildStats`.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / CACHE_DIRNAME
    image_paths = [Path(p) for p in image_paths]
    stems = _stems(image_paths)
    (cache_dir / "masks").mkdir(parents=True, exist_ok=True)
    (cache_dir / "depth").mkdir(parents=True, exist_ok=True)

    mf_path = cache_dir / MANIFEST_NAME
    manifest: dict = {}
    if mf_path.is_file():
        try:
            manifest = json.loads(mf_path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; starting a fresh manifest", mf_path)
            manifest = {}
        if manifest.get("version") != MANIFEST_VERSION:
            if manifest:
                logger.warning("%s has manifest version %r; recomputing everything", mf_path, manifest.get("version"))
            manifest = {k: v for k, v in manifest.items() if k == "scales"} if isinstance(manifest, dict) else {}
    images: dict = manifest.get("images") if isinstance(manifest.get("images"), dict) else {}

    mblock, dblock = _source_block(mask_source), _source_block(depth_source)
    msig, dsig = signature_digest(mblock["signature"]), signature_digest(dblock["signature"])
    for label, old, new in (("mask", manifest.get("mask_source"), mblock),
                            ("depth", manifest.get("depth_source"), dblock)):
        if images and old is not None and old != new:
            logger.warning("%s source changed (%s -> %s): recomputing %s priors for all images",
                           label, json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True), label)
    simulated = "simulated" in (mblock["name"], dblock["name"])
    header = {
        "version": MANIFEST_VERSION,
        "kind": "simulated" if simulated else "computed",
        "mask_source": mblock,
        "depth_source": dblock,
        "depth_convention": DEPTH_CONVENTION,
        "data_dir": _rel(data_dir, cache_dir),
    }
    extra = {k: v for k, v in manifest.items() if k not in header and k != "images"}  # e.g. "scales"
    manifest = {**header, "images": images, **extra}

    def write_manifest() -> None:
        _atomic_write_json(mf_path, manifest)

    write_manifest()
    stats = BuildStats(n_images=len(image_paths))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(image_paths), desc="priors", unit="img", dynamic_ncols=True)
    try:
        for path, stem in zip(image_paths, stems):
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            sha = file_sha256(path)
            old = images.get(stem)
            masks_rel, depth_rel = f"masks/{stem}.npz", f"depth/{stem}.npy"
            same_image = old is not None and old.get("sha256") == sha and not force
            need_masks = not (same_image and old.get("mask_sig") == msig and (cache_dir / masks_rel).is_file())
            need_depth = not (same_image and old.get("depth_sig") == dsig and (cache_dir / depth_rel).is_file())
            if not (need_masks or need_depth):
                stats.skipped += 1
                if bar is not None:
                    bar.update(1)
                continue

            image = load_image_rgb(path)
            hw = (int(image.shape[0]), int(image.shape[1]))
            if old is not None and (int(old.get("height", -1)), int(old.get("width", -1))) != hw:
                need_masks = need_depth = True
            ms = depth = None
            if need_masks:
                ms = _check_mask_output(mask_source(image, stem), mblock["name"], path, hw)
            if need_depth:
                depth = _check_depth_output(depth_source(image, stem), dblock["name"], path, hw)

            # Drop the entry before touching its files, so that a crash in between never leaves an entry whose
            # sha256/signatures describe files that were already overwritten.
            if old is not None:
                images.pop(stem)
                write_manifest()
            if ms is not None:
                ms.save(cache_dir / masks_rel)
                stats.masks_computed += 1
            if depth is not None:
                _atomic_save_npy(cache_dir / depth_rel, depth)
                stats.depth_computed += 1
            n_masks = len(ms) if ms is not None else int(old["n_masks"])
            digest = _masks_digest(ms) if ms is not None else old.get("masks_digest")
            images[stem] = {
                "file": _rel(path, data_dir),
                "sha256": sha,
                "height": hw[0],
                "width": hw[1],
                "n_masks": n_masks,
                "masks": masks_rel,
                "depth": depth_rel,
                "mask_sig": msig,
                "depth_sig": dsig,
                "masks_digest": digest,
            }
            write_manifest()
            stats.computed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(masks=n_masks, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    cache = PriorCache(cache_dir, manifest)
    cache.last_build = stats  # type: ignore[attr-defined]
    return cache
