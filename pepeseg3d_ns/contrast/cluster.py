"""HDBSCAN clustering of (rendered or per-Gaussian) features for pepe-contrast (PePESeg3D stage 2).

Used for the centroid candidates of the view-consistent loss ``Lc`` (HDBSCAN on rendered features at s=1 and s=0),
for automatic decomposition (HDBSCAN on rendered features at a scale), and for evaluation queries.

Recipe (``cluster_features``):

1. L2-normalise the features, ``x_i = f_i / max(||f_i||, 1e-12)`` (zero rows stay zero).
2. Draw a random subsample of at most ``max_points`` rows (seeded; sorted ascending) and run HDBSCAN on it with the
   Euclidean distance. On unit vectors ``||x - y||^2 = 2 - 2 cos(x, y)``, so Euclidean distance orders pairs like
   cosine distance while keeping the fast tree-based (exact) HDBSCAN code paths, unlike ``metric="cosine"``.
3. Centroids ``c = normalise(mean of the normalised members)`` of the subsample clusters; every point not in the
   subsample (``assign_rest``) and, optionally, every subsample noise point (``assign_noise``) goes to the centroid
   of highest cosine, optionally only when that cosine is at least ``min_similarity``.
4. Clusters are renumbered by final size, largest first (ties: order of HDBSCAN's own labels); final centroids are
   recomputed from all final members.

Defaults, from the measurements in ``docs/contrast_bench.md`` (60k synthetic 32-d unit features, 16 blobs + 5 %
noise, and a 4 x 4 two-level set; this 2-core CPU): ``max_points = 5000``. The adjusted Rand index of the final
labels of *all* points is already at its plateau with a 2k subsample (0.853 / 0.855 / 0.859 / 0.874 at 2k / 5k /
10k / 30k, the small rise being noise points kept as noise), while exact HDBSCAN time grows faster than linearly
(scikit-learn 1.9 / 4.5 / 12.4 / 139 s); 5k rather than 2k keeps an object covering 1 % of the pixels at ~50
sampled points, twice the default ``min_cluster_size``. ``min_cluster_size = max(5, ceil(0.005 * S))`` for a
subsample of ``S`` points (clusters below 0.5 % of the sample are noise); ``min_samples = min(min_cluster_size,
10)`` (counting the point itself, as hdbscan/scikit-learn do).

Implementations (``method``): ``"hdbscan"`` (the hdbscan package of McInnes et al., the paper's HDBSCAN
reference [10]; Euclidean, Borůvka kd-tree) and ``"sklearn"`` (``sklearn.cluster.HDBSCAN``, a port of it).
``"auto"`` = hdbscan, falling back to scikit-learn (one warning) when it does not import. The two are the same
algorithm and take about the same time at the default subsample (docs/contrast.md, "The centroid refresh"); they
can pick different levels of a two-level structure. hdbscan's ``approximate_predict`` (after a fit with
``prediction_data=True``) was measured as the rule for the points outside the subsample and not adopted: about
1000x slower than the nearest-centre rule (11-15 s against 0.013 s for 55k points) and no better on the points of
real clusters; its one gain, leaving noise points unlabelled, is what ``min_similarity`` does here.

If the (sub)sample has fewer than ``min_cluster_size`` points, no cluster can exist and **no cluster** is returned
(all labels -1, ``centroids [0, D]``); HDBSCAN likewise returns no cluster for structureless data unless
``allow_single_cluster=True``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClusterResult", "cluster_features", "cluster_centres", "ClusterWorker", "label_colors", "available_methods",
           "DEFAULT_MAX_POINTS"]

DEFAULT_MAX_POINTS = 5_000
METHODS = ("hdbscan", "sklearn")
_AUTO_ORDER = ("hdbscan", "sklearn")
_warned_fallback = False


@dataclass
class ClusterResult:
    """Result of ``cluster_features`` (all tensors on the device of the input features).

    Attributes:
        labels: ``long [P]``, cluster id in ``[0, C)`` (0 = largest cluster), ``-1`` = noise / not assigned.
        centroids: ``[C, D]`` unit-norm centroids (normalised mean of the normalised members), float32 (float64 for
            float64 input).
        sizes: ``long [C]`` number of points with each label, descending.
        subsample: ``long [S]`` ascending indices of the rows HDBSCAN saw (``S = min(P, max_points)``).
        method: the implementation that ran (``"hdbscan"``, ``"sklearn"``; ``"none"`` when
            there were too few points to run).
    """

    labels: Tensor
    centroids: Tensor
    sizes: Tensor
    subsample: Tensor
    method: str

    @property
    def num_clusters(self) -> int:
        """Number of clusters ``C``."""
        return int(self.sizes.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# backends: numpy float [S, D] (unit rows) -> int labels [S] (-1 noise), HDBSCAN's own numbering
# ----------------------------------------------------------------------------------------------------------------


def _run_hdbscan(x: np.ndarray, mcs: int, ms: int, single: bool) -> np.ndarray:
    import hdbscan

    model = hdbscan.HDBSCAN(
        min_cluster_size=mcs, min_samples=ms, metric="euclidean", allow_single_cluster=single, core_dist_n_jobs=-1
    )
    return np.asarray(model.fit_predict(x.astype(np.float64)), dtype=np.int64)


def _run_sklearn(x: np.ndarray, mcs: int, ms: int, single: bool) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    kw = {}
    if "copy" in inspect.signature(HDBSCAN.__init__).parameters:
        kw["copy"] = False  # the array is our own temporary (also silences a FutureWarning of scikit-learn 1.9)
    model = HDBSCAN(
        min_cluster_size=mcs, min_samples=ms, metric="euclidean", allow_single_cluster=single, n_jobs=-1, **kw
    )
    return np.asarray(model.fit_predict(x.astype(np.float64)), dtype=np.int64)


_RUNNERS = {
    "hdbscan": _run_hdbscan,
    "sklearn": _run_sklearn,
}
_IMPORTS = {
    "hdbscan": "hdbscan",
    "sklearn": "sklearn.cluster",
}


_IMPORT_OK: dict = {}


def _importable(method: str) -> bool:
    """Whether the implementation imports (tried once per process, then cached)."""
    if method not in _IMPORT_OK:
        try:
            __import__(_IMPORTS[method])
            _IMPORT_OK[method] = True
        except Exception:
            _IMPORT_OK[method] = False
    return _IMPORT_OK[method]


def available_methods() -> Tuple[str, ...]:
    """Implementations (of ``"hdbscan"``, ``"sklearn"``) installed on this machine.

    Cheap: looks the modules up (``importlib.util.find_spec``) without importing them; ``cluster_features`` still
    imports for real and falls back if that fails."""
    import importlib.util

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return tuple(m for m in METHODS if found(_IMPORTS[m].split(".")[0]))


def _resolve_method(method: str) -> str:
    global _warned_fallback
    if method == "auto":
        for m in _AUTO_ORDER:
            if _importable(m):
                if m != _AUTO_ORDER[0] and not _warned_fallback:
                    warnings.warn(
                        f"cluster_features: the hdbscan package is not importable, using {m} instead "
                        f"(pip install hdbscan)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    _warned_fallback = True
                return m
        raise ImportError("cluster_features: neither hdbscan nor scikit-learn (>= 1.3) imports: pip install hdbscan")
    if method not in _RUNNERS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if not _importable(method):
        raise ImportError(f"cluster_features: method={method!r} requested but {_IMPORTS[method]} cannot be imported")
    return method


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def default_min_cluster_size(n_sample: int) -> int:
    """``max(5, ceil(0.005 * n_sample))``: the default HDBSCAN ``min_cluster_size`` for a subsample of that size."""
    return max(5, math.ceil(0.005 * n_sample))


def _centroids(x: Tensor, labels: Tensor, c: int) -> Tuple[Tensor, Tensor]:
    """Normalised means of unit rows ``x [P, D]`` per label in ``[0, c)`` -> ``([c, D], counts long [c])``."""
    keep = labels >= 0
    sums = torch.zeros((c, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, labels[keep], x[keep])
    counts = torch.bincount(labels[keep], minlength=c)
    return F.normalize(sums, dim=1, eps=1e-12), counts


def cluster_features(
    feats: Tensor,
    min_cluster_size: Optional[int] = None,
    min_samples: Optional[int] = None,
    max_points: int = DEFAULT_MAX_POINTS,
    method: str = "auto",
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    assign_rest: bool = True,
    assign_noise: bool = False,
    min_similarity: Optional[float] = None,
    allow_single_cluster: bool = False,
    chunk: int = 65536,
) -> ClusterResult:
    """Cluster feature vectors by HDBSCAN on a bounded random subsample of their L2-normalised copies.

    Args:
        feats: ``[P, D]`` float tensor (CPU or CUDA), e.g. rendered features ``[H*W, 32]`` or per-Gaussian
            features; must be finite.
        min_cluster_size: HDBSCAN's minimum cluster size, in subsample points; default
            ``max(5, ceil(0.005 * S))`` for a subsample of ``S`` points.
        min_samples: HDBSCAN's density parameter (neighbourhood size counting the point itself); default
            ``min(min_cluster_size, 10)``.
        max_points: at most this many rows go into HDBSCAN (uniform random subsample without replacement);
            default 5k, see the module docstring.
        method: ``"auto"`` (hdbscan, else scikit-learn), ``"hdbscan"`` or ``"sklearn"``.
        seed: seed of the subsample draw when ``generator`` is None.
        generator: a CPU ``torch.Generator`` for the subsample draw (overrides ``seed``).
        assign_rest: give every row outside the subsample the label of its highest-cosine centroid; if False
            those rows are labelled -1.
        assign_noise: also relabel the subsample's HDBSCAN noise points that way.
        min_similarity: when set, an assignment (of ``assign_rest`` / ``assign_noise``) only happens if the best
            cosine is ``>= min_similarity``; otherwise the row stays -1.
        allow_single_cluster: passed to HDBSCAN (lets it return one cluster for structureless data).
        chunk: rows per block in the cosine assignment (memory ``chunk x C``).

    Returns:
        ``ClusterResult`` (see there): ``labels long [P]``, ``centroids [C, D]`` unit norm, ``sizes long [C]``
        descending, ``subsample long [S]``, ``method``. Deterministic for a fixed seed/generator state and
        method (HDBSCAN runs on CPU numpy; results are moved back to ``feats.device``).

    Raises:
        ValueError: ``feats`` not ``[P, D]`` floating, empty, or containing NaN/inf; bad parameters.
        ImportError: the requested implementation (or, for ``"auto"``, every implementation) cannot be imported.
    """
    if not isinstance(feats, Tensor) or feats.dim() != 2:
        raise ValueError(f"feats must be a [P, D] tensor, got shape {tuple(getattr(feats, 'shape', ()))}")
    if not feats.is_floating_point():
        raise ValueError(f"feats must be floating point, got dtype {feats.dtype}")
    p, d = feats.shape
    if p == 0 or d == 0:
        raise ValueError(f"feats is empty (shape {tuple(feats.shape)}): nothing to cluster")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("feats contain NaN or inf values")
    if not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")
    if min_cluster_size is not None and (not isinstance(min_cluster_size, int) or min_cluster_size < 2):
        raise ValueError(f"min_cluster_size must be an int >= 2, got {min_cluster_size!r}")
    if min_samples is not None and (not isinstance(min_samples, int) or min_samples < 1):
        raise ValueError(f"min_samples must be a positive int, got {min_samples!r}")
    if min_similarity is not None and not -1.0 <= float(min_similarity) <= 1.0:
        raise ValueError(f"min_similarity must be a cosine in [-1, 1], got {min_similarity!r}")
    method = _resolve_method(method)

    dev = feats.device
    work_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x = F.normalize(feats.detach().to(work_dtype), dim=1, eps=1e-12)  # [P, D]
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        if p > max_points:
            sub = torch.sort(torch.randperm(p, generator=gen)[:max_points]).values
        else:
            sub = torch.arange(p)
        s = int(sub.shape[0])
        mcs = min_cluster_size if min_cluster_size is not None else default_min_cluster_size(s)
        ms = min_samples if min_samples is not None else min(mcs, 10)
        sub_dev = sub.to(dev)

        labels = torch.full((p,), -1, dtype=torch.long, device=dev)
        if s < mcs or s < 2:
            empty = torch.zeros((0, d), dtype=work_dtype, device=dev)
            return ClusterResult(labels, empty, torch.zeros(0, dtype=torch.long, device=dev), sub_dev, "none")

        xs = x[sub_dev].cpu().numpy().astype(np.float32 if work_dtype == torch.float32 else np.float64)
        raw = _RUNNERS[method](np.ascontiguousarray(xs), mcs, min(ms, s - 1) if s > 1 else 1, allow_single_cluster)
        raw_t = torch.from_numpy(raw).to(dev)
        c = int(raw_t.max()) + 1 if raw_t.numel() else 0
        labels[sub_dev] = raw_t
        if c == 0:
            empty = torch.zeros((0, d), dtype=work_dtype, device=dev)
            return ClusterResult(labels, empty, torch.zeros(0, dtype=torch.long, device=dev), sub_dev, method)

        cent, _ = _centroids(x, labels, c)
        todo = torch.zeros(p, dtype=torch.bool, device=dev)
        if assign_rest:
            todo[:] = True
            todo[sub_dev] = False
        if assign_noise:
            todo[sub_dev] |= raw_t < 0
        rows = todo.nonzero().squeeze(1)
        for i in range(0, rows.shape[0], chunk):
            r = rows[i : i + chunk]
            sim = x[r] @ cent.T  # [r, C]
            best, arg = sim.max(dim=1)
            if min_similarity is not None:
                arg = torch.where(best >= float(min_similarity), arg, torch.full_like(arg, -1))
            labels[r] = arg

        counts = torch.bincount(labels[labels >= 0], minlength=c)
        order = torch.argsort(-counts, stable=True)  # largest first, ties by HDBSCAN label
        remap = torch.empty(c, dtype=torch.long, device=dev)
        remap[order] = torch.arange(c, device=dev)
        labels = torch.where(labels >= 0, remap[labels.clamp(min=0)], labels)
        cent, sizes = _centroids(x, labels, c)
    return ClusterResult(labels, cent, sizes, sub_dev, method)


def label_colors(labels: Union[Tensor, np.ndarray], seed: int = 0) -> Tensor:
    """Distinct RGB colours per cluster label, for decomposition images.

    Label ``c >= 0`` gets hue ``frac(h0 + 0.618034 * c)`` (golden-ratio steps, so consecutive labels are far apart
    in hue; ``h0`` from ``seed``), saturation 0.65-0.95 and value 0.75-1.0 cycling with ``c``; every label ``< 0``
    (noise) is grey ``(128, 128, 128)``. The same label always gets the same colour for a given seed.

    Args:
        labels: integer tensor or array of any shape ``[...]`` (e.g. ``[P]`` or a label image ``[H, W]``).
        seed: shifts the hue sequence.

    Returns:
        ``uint8 [..., 3]`` tensor on the device of ``labels`` (CPU for numpy input).
    """
    lab = torch.as_tensor(labels)
    if lab.is_floating_point() or lab.dtype == torch.bool or lab.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    lab = lab.long()
    c = lab.clamp(min=0).double()
    h0 = (float(seed) * 0.7548776662) % 1.0
    hue = torch.remainder(h0 + 0.6180339887 * c, 1.0)
    sat = 0.65 + 0.15 * torch.remainder(c, 3)
    val = 1.0 - 0.125 * torch.remainder(torch.floor(c / 3), 3)
    # HSV -> RGB
    h6 = hue * 6.0
    i = torch.floor(h6)
    f = h6 - i
    pp = val * (1 - sat)
    q = val * (1 - sat * f)
    t = val * (1 - sat * (1 - f))
    i = i.long() % 6
    r = torch.stack([val, q, pp, pp, t, val], dim=-1).gather(-1, i[..., None])[..., 0]
    g = torch.stack([t, val, val, q, pp, pp], dim=-1).gather(-1, i[..., None])[..., 0]
    b = torch.stack([pp, pp, t, val, val, q], dim=-1).gather(-1, i[..., None])[..., 0]
    rgb = torch.stack([r, g, b], dim=-1)
    rgb = torch.round(rgb * 255).clamp(0, 255).to(torch.uint8)
    grey = torch.full_like(rgb, 128)
    return torch.where((lab < 0)[..., None], grey, rgb)


# ----------------------------------------------------------------------------------------------------------------
# background worker (the centroid refresh of pepe-contrast)
# ----------------------------------------------------------------------------------------------------------------


def cluster_centres(jobs: Sequence[Tuple[np.ndarray, dict]]) -> List[np.ndarray]:
    """Cluster centres of each job: ``cluster_features(torch.from_numpy(x), assign_rest=False, **kwargs).centroids``
    as ``float32 [C, D]`` arrays, for ``jobs = [(x float32 [S, D], kwargs), ...]``. What :class:`ClusterWorker`
    runs, in its child process or inline."""
    out = []
    for x, kwargs in jobs:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] < 2:
            out.append(np.zeros((0, x.shape[1]), dtype=np.float32))
            continue
        res = cluster_features(torch.from_numpy(x), assign_rest=False, **kwargs)
        out.append(res.centroids.to(torch.float32).numpy())
    return out


class ClusterWorker:
    """Runs :func:`cluster_centres` jobs off the caller's thread: in one child Python process (``mode="process"``)
    or inline, at submission (``mode="inline"``). Results come back in submission order.

    Why a process: HDBSCAN (hdbscan's and scikit-learn's Cython code) holds the GIL, so a thread would stall the
    training step for as long as the clustering runs. The child is ``python -c ...`` importing this module (no
    re-run of the caller's ``__main__``, no fork of a process holding CUDA or OpenMP state); jobs and results are
    numpy arrays framed by :func:`_pack` (a JSON header and raw float32 bytes; nothing is unpickled) over its
    stdin / stdout. It starts on the first :meth:`submit` and ends with
    :meth:`close`, at the caller's exit, or when its stdin closes. Both modes compute the same numbers (the same
    function on the same CPU arrays), so a caller that collects a job at a fixed step trains identically in both.
    If the child fails, a warning is printed and the job (and every later one) runs inline.

    Args:
        mode: ``"process"`` or ``"inline"``.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the child (HDBSCAN's core-distance pass uses them).
    """

    def __init__(self, mode: str = "process", threads: int = 1) -> None:
        if mode not in ("process", "inline"):
            raise ValueError(f"mode must be 'process' or 'inline', got {mode!r}")
        self.mode = mode
        self.threads = max(1, int(threads))
        self._proc = None
        self._pending: List[Tuple[str, object]] = []  # ("inline", results) or ("process", (jobs, writer thread))
        self._finalizer = None

    def __len__(self) -> int:
        """Number of submitted jobs not yet collected."""
        return len(self._pending)

    def _start(self) -> None:
        import os
        import subprocess
        import sys
        import weakref
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding this copy of pepeseg3d_ns
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        code = "from pepeseg3d_ns.contrast.cluster import _worker_main; _worker_main()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env)
        self._finalizer = weakref.finalize(self, _stop_process, self._proc)

    def submit(self, jobs: Sequence[Tuple[np.ndarray, dict]]) -> None:
        """Queue one batch of jobs (see :func:`cluster_centres`); returns at once in ``"process"`` mode."""
        import threading

        jobs = [(np.ascontiguousarray(x, dtype=np.float32), dict(kw)) for x, kw in jobs]
        if self.mode == "process":
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                payload = _pack({"kwargs": [kw for _, kw in jobs]}, [x for x, _ in jobs])
                # a pipe write blocks while the child is still starting: leave it to a thread (it releases the GIL)
                writer = threading.Thread(target=_write_message, args=(self._proc.stdin, payload), daemon=True)
                writer.start()
                self._pending.append(("process", (jobs, writer)))
                return
            except OSError as err:
                self._fail(err)
        self._pending.append(("inline", cluster_centres(jobs)))

    def collect(self) -> List[np.ndarray]:
        """Centroids of the oldest uncollected batch (blocks until the child has them)."""
        if not self._pending:
            raise RuntimeError("ClusterWorker.collect: no job was submitted")
        kind, item = self._pending.pop(0)
        if kind == "inline":
            return item
        jobs, writer = item
        try:
            writer.join()
            header, arrays = _unpack(self._proc.stdout)
            if header.get("status") == "ok":
                return arrays
            raise RuntimeError(str(header.get("error", "no result")))
        except (EOFError, OSError, ValueError, RuntimeError) as err:
            self._fail(err)
            return cluster_centres(jobs)

    def _fail(self, err: BaseException) -> None:
        warnings.warn(f"centroid clustering worker failed ({str(err).strip().splitlines()[-1] if str(err) else err!r}); "
                      "clustering inline from now on", RuntimeWarning, stacklevel=3)
        self.close()
        self.mode = "inline"
        # jobs already queued for the child are recomputed inline when collected
        self._pending = [("inline", cluster_centres(item[0])) if kind == "process" else (kind, item)
                         for kind, item in self._pending]

    def close(self) -> None:
        """Stop the child (pending process jobs are dropped)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._proc = None

    def __getstate__(self):  # a model holding a worker can be deep-copied / pickled: the copy starts its own
        state = dict(self.__dict__)
        state.update(_proc=None, _pending=[], _finalizer=None)
        return state


def _pack(header: dict, arrays: Sequence[np.ndarray]) -> bytes:
    """One message: 8-byte length of a UTF-8 JSON header (``header`` plus each array's shape), the header, then
    each ``float32`` array's C-order bytes. The format the worker and its parent exchange."""
    import json

    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    head = json.dumps(dict(header, shapes=[list(a.shape) for a in arrays])).encode()
    return b"".join([len(head).to_bytes(8, "little"), head] + [a.tobytes() for a in arrays])


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError("clustering worker stream ended mid-message")
    return data


def _unpack(stream) -> Tuple[dict, List[np.ndarray]]:
    """Read one :func:`_pack` message from a binary stream: ``(header, arrays)``; ``EOFError`` at end of stream."""
    import json

    head = json.loads(_read_exact(stream, int.from_bytes(_read_exact(stream, 8), "little")).decode())
    arrays = []
    for shape in head.pop("shapes"):
        n = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(_read_exact(stream, 4 * n), dtype=np.float32).reshape(shape).copy())
    return head, arrays


def _write_message(stream, payload: bytes) -> None:
    try:
        stream.write(payload)
        stream.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the child is gone: collect() notices and recomputes inline


def _stop_process(proc) -> None:
    try:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=10)
    except Exception:
        proc.kill()


def _worker_main() -> None:
    """The child process of :class:`ClusterWorker`: read :func:`_pack` job batches from stdin, write a
    ``{"status": "ok"}`` message with the centroids, or ``{"status": "error"}`` with the traceback, to stdout, until
    stdin closes."""
    import os
    import sys
    import traceback

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of libraries go to stderr, not into the result stream
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    inp = sys.stdin.buffer
    while True:
        try:
            header, arrays = _unpack(inp)
        except EOFError:
            return
        try:
            msg = _pack({"status": "ok"}, cluster_centres(list(zip(arrays, header["kwargs"]))))
        except Exception:
            msg = _pack({"status": "error", "error": traceback.format_exc()}, [])
        out.write(msg)
        out.flush()
