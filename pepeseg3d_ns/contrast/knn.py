"""Exact k-nearest-neighbour graph of Gaussian centres and kNN feature smoothing (pepe-contrast, PePESeg3D stage 2).

Stage 2 smooths every Gaussian's feature by averaging it with its 16 nearest neighbours (in 3D, Euclidean) before
rendering. The geometry is frozen in stage 2, so the neighbour graph is computed once (``knn_indices``) and the
smoothing is a fixed sparse linear map applied every step: ``KnnSmoother(neighbours)`` builds it once as a sparse
CSR matrix (fastest for repeated use), ``smooth_features(features, neighbours)`` computes it without setup.

Conventions
-----------
* Neighbour order is fully deterministic: neighbours are sorted by ``(squared distance, index)`` ascending, i.e.
  equal distances (duplicated points, points on a grid) are broken by the smaller point index. This holds for every
  backend, so ``backend="torch"`` and ``backend="scipy"`` give identical indices whenever the distances they compute
  agree (always for exactly representable coordinates; otherwise up to last-bit rounding of near-equal distances).
* ``include_self=False`` (default): the ``k`` nearest *other* points (a duplicate of point ``i`` at distance 0 is
  another point and is a neighbour). ``include_self=True``: column 0 is the point itself, columns ``1..k-1`` its
  ``k - 1`` nearest other points.
* Distances are computed in float64 for float64 input, in float32 otherwise (as ``sum((x - y) ** 2)``, never via
  the ``|x|^2 + |y|^2 - 2 x.y`` expansion, which loses ties).

Backends
--------
* ``"scipy"``: ``scipy.spatial.cKDTree`` queried in chunks, with the same tie rule (boundary ties are resolved with
  a radius query). Runs on the CPU for points on any device (CUDA points are copied to the host once and the index
  copied back: the graph is built once per run). ``"auto"`` uses it whenever scipy imports.
* ``"torch"`` (any device, no dependency): exact chunked brute force, ``O(N^2)`` distances in blocks of query rows
  (:func:`_knn_brute`). It grows as ``N^2``: far slower than cKDTree on a CPU, and memory-bound on a GPU, where
  cKDTree's ``O(N log N)`` still wins at a million points (measurements and estimates: docs/contrast.md, "kNN
  graph").
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["knn_indices", "smooth_features", "KnnSmoother"]

_BACKENDS = ("auto", "torch", "scipy")


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------


def _check_points(points: Tensor, k: int, include_self: bool) -> int:
    if not isinstance(points, Tensor):
        raise ValueError(f"points must be a torch.Tensor [N, 3], got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating point tensor, got dtype {points.dtype}")
    n = points.shape[0]
    if n == 0:
        raise ValueError("points is empty (N = 0): no neighbours to compute")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n_others = k - 1 if include_self else k
    if n_others > n - 1:
        raise ValueError(
            f"k = {k} neighbours{' (including self)' if include_self else ''} requested but there are only N = {n} "
            f"points (at most {n - 1 + int(include_self)} possible); lower k"
        )
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or inf coordinates")
    return n_others


def _dist_dtype(points: Tensor) -> torch.dtype:
    return torch.float64 if points.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# torch backend: chunked brute force
# ----------------------------------------------------------------------------------------------------------------


def _knn_brute(points: Tensor, k: int, chunk: int, progress: bool) -> Tensor:
    """Exact kNN (others only) by brute force: blocks of query rows against all ``N`` points. Returns ``long [N, k]``.

    A block holds ``rows = max(1, chunk * 16384 // N)`` rows of exact squared distances ``[rows, N]`` (summed over
    x, y, z in that order, as the scipy path does); the ``k`` smallest are ``topk``-selected and put in
    ``(distance, index)`` order. A row with more than ``k`` entries at or below its ``k``-th distance (a tie at the
    boundary, where ``topk`` may pick any of the tied points) is redone with a stable sort of the whole row.
    """
    from tqdm.auto import tqdm

    n, dev = points.shape[0], points.device
    pts = points.to(_dist_dtype(points))
    out = torch.empty((n, k), dtype=torch.long, device=dev)
    rows = max(1, min(n, chunk * 16384 // n))
    with tqdm(total=n, desc="kNN", unit="pt", disable=not progress, leave=False) as bar:
        for s in range(0, n, rows):
            q = pts[s : s + rows]
            d = (q[:, None, 0] - pts[None, :, 0]).square_()
            d.add_((q[:, None, 1] - pts[None, :, 1]).square_()).add_((q[:, None, 2] - pts[None, :, 2]).square_())
            r = torch.arange(q.shape[0], device=dev)
            d[r, s + r] = float("inf")  # not its own neighbour
            vals, ids = torch.topk(d, k, dim=1, largest=False, sorted=False)
            o = torch.argsort(ids, dim=1)
            vals, ids = vals.gather(1, o), ids.gather(1, o)
            o = torch.argsort(vals, dim=1, stable=True)  # (distance, index) order
            ids = ids.gather(1, o)
            tie = (d <= vals.gather(1, o)[:, -1:]).sum(dim=1) > k
            if bool(tie.any()):
                t = tie.nonzero().squeeze(1)
                ids[t] = torch.sort(d[t], dim=1, stable=True).indices[:, :k]
            out[s : s + rows] = ids
            bar.update(q.shape[0])
    return out


# ----------------------------------------------------------------------------------------------------------------
# scipy backend
# ----------------------------------------------------------------------------------------------------------------


def _scipy_available() -> bool:
    try:
        import scipy.spatial  # noqa: F401
    except Exception:
        return False
    return True


def _knn_scipy(points: Tensor, k: int, chunk: int, progress: bool) -> Tensor:
    import numpy as np
    from scipy.spatial import cKDTree
    from tqdm.auto import tqdm

    x = points.detach().to(_dist_dtype(points)).cpu().numpy()  # working dtype: distances as in the torch path
    xd = x.astype(np.float64)
    n = x.shape[0]
    tree = cKDTree(xd)
    out = np.empty((n, k), dtype=np.int64)
    kq = min(k + 2, n)  # self + k others + one more, to see whether the k-th distance is tied beyond the result
    step = max(chunk, 16384)
    with tqdm(total=n, desc="kNN", unit="pt", disable=not progress, leave=False) as bar:
        for s in range(0, n, step):
            rows = np.arange(s, min(s + step, n))
            _, ii = tree.query(xd[rows], k=kq, workers=-1)
            ii = ii.reshape(len(rows), kq)
            diff = x[ii] - x[rows][:, None, :]
            d2 = (diff * diff).sum(axis=2)
            d2[ii == rows[:, None]] = np.inf  # self is not its own neighbour here
            o = np.lexsort((ii, d2), axis=1)
            d2s = np.take_along_axis(d2, o, 1)
            iis = np.take_along_axis(ii, o, 1)
            out[rows] = iis[:, :k]
            if kq < n:
                # points not returned are at least as far as the farthest returned one: if that one is (nearly)
                # as close as the k-th, unreturned points may tie with it -> redo the row with a radius query
                dk = d2s[:, k - 1].astype(np.float64)
                last = np.where(np.isinf(d2s), -np.inf, d2s).max(axis=1).astype(np.float64)
                amb = np.nonzero(last <= dk * (1 + 1e-5) + 1e-300)[0]
                if amb.size:
                    rad = np.sqrt(dk[amb]) * (1 + 1e-5) + 1e-150
                    balls = tree.query_ball_point(xd[rows[amb]], rad, workers=-1)
                    for a, cand in zip(amb, balls):
                        r = rows[a]
                        cand = np.asarray(cand, dtype=np.int64)
                        cand = cand[cand != r]
                        dc = ((x[cand] - x[r][None]) ** 2).sum(axis=1)
                        out[r] = cand[np.lexsort((cand, dc))[:k]]
            bar.update(len(rows))
    return torch.from_numpy(out).to(points.device)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def knn_indices(
    points: Tensor,
    k: int = 16,
    chunk: int = 4096,
    include_self: bool = False,
    progress: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Exact k nearest neighbours (Euclidean) of every point among all points.

    Args:
        points: ``[N, 3]`` float tensor (any float dtype, CPU or CUDA), all coordinates finite.
        k: neighbours per point (``k <= N - 1``, or ``k <= N`` with ``include_self``).
        chunk: bounds memory: the torch backend holds about ``chunk * 16384`` distances (two blocks of them) at a
            time, the scipy backend queries ``max(chunk, 16384)`` points at a time.
        include_self: if True, column 0 is the point itself and columns ``1..k-1`` its ``k - 1`` nearest others;
            if False, the ``k`` nearest other points.
        progress: show a tqdm progress bar over the query points.
        backend: ``"auto"`` (scipy's cKDTree when scipy imports, else torch), ``"scipy"`` (cKDTree on the CPU;
            points on another device are copied to the host and back) or ``"torch"`` (brute force on the points'
            device).

    Returns:
        ``long [N, k]`` on the device of ``points``: row ``i`` holds neighbour indices sorted by
        ``(squared distance, index)`` ascending (ties broken by the smaller index).

    Raises:
        ValueError: wrong shape/dtype, empty input, non-finite coordinates, ``k`` out of range, unknown backend
            (``"scipy"`` when scipy does not import).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    n_others = _check_points(points, k, include_self)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    n = points.shape[0]
    if backend == "auto":
        backend = "scipy" if _scipy_available() else "torch"
    if backend == "scipy" and not _scipy_available():
        raise ValueError("backend='scipy' needs scipy (pip install scipy), or use backend='torch'")
    with torch.no_grad():
        if n_others == 0:
            others = torch.empty((n, 0), dtype=torch.long, device=points.device)
        elif backend == "scipy":
            others = _knn_scipy(points.detach(), n_others, chunk, progress)
        else:
            others = _knn_brute(points.detach(), n_others, chunk, progress)
    if include_self:
        self_col = torch.arange(n, device=points.device)[:, None]
        return torch.cat([self_col, others], dim=1)
    return others


class _NeighbourMean(torch.autograd.Function):
    """``out[i] = (f[i] * self_w + sum_j f[nbr[i, j]]) / denom``, chunked forward and backward."""

    @staticmethod
    def forward(ctx, features: Tensor, neighbours: Tensor, include_self: bool, chunk: int) -> Tensor:  # type: ignore[override]
        n, k = neighbours.shape
        denom = k + int(include_self)
        out = features.clone() if include_self else torch.zeros_like(features)
        for s in range(0, n, chunk):
            nb = neighbours[s : s + chunk]
            out[s : s + chunk] += features[nb].sum(dim=1)
        out /= denom
        ctx.save_for_backward(neighbours)
        ctx.include_self = include_self
        ctx.chunk = chunk
        ctx.feat_rows = features.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (neighbours,) = ctx.saved_tensors
        n, k = neighbours.shape
        denom = k + int(ctx.include_self)
        g = grad_out / denom
        grad = g.clone() if ctx.include_self else torch.zeros_like(g)
        for s in range(0, n, ctx.chunk):
            nb = neighbours[s : s + ctx.chunk]
            gs = g[s : s + ctx.chunk]
            grad.index_add_(0, nb.reshape(-1), gs[:, None, :].expand(-1, k, -1).reshape(-1, g.shape[1]))
        return grad, None, None, None


def smooth_features(
    features: Tensor, neighbours: Tensor, include_self: bool = True, chunk: int = 65536
) -> Tensor:
    """Average every Gaussian's feature with its k nearest neighbours (paper: 3D feature smoothing).

    ``out[i] = (f[i] + sum_{j < k} f[neighbours[i, j]]) / (k + 1)`` with ``include_self=True`` (the default: the
    mean of self and its k neighbours); ``out[i] = mean_j f[neighbours[i, j]]`` with ``include_self=False``.
    (Pass neighbours from ``knn_indices(..., include_self=False)``; with ``include_self=True`` there, the point
    itself would be counted twice.)

    For a fixed graph applied every step (stage 2), ``KnnSmoother(neighbours)`` computes the same thing 4-5x faster
    (prebuilt sparse matrix; see docs/contrast_bench.md); this function needs no setup.

    Differentiable w.r.t. ``features`` through a custom autograd function that only saves ``neighbours``: forward
    and backward both run in row chunks (a gather / ``index_add_`` of ``[chunk, k, D]``), so the memory beyond the
    input/output is ``O(chunk * k * D)``, never ``O(N * k * D)``. On CUDA the backward's ``index_add_`` uses atomics
    (float sums in a nondeterministic order); on CPU it is deterministic.

    Args:
        features: ``[N, D]`` float tensor.
        neighbours: ``long [N, k]`` (``k >= 1``) indices into ``features`` rows, same device.
        include_self: include ``features[i]`` itself in the mean.
        chunk: rows per chunk.

    Returns:
        ``[N, D]`` tensor, same dtype/device as ``features``.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a [N, D] tensor, got shape {tuple(getattr(features, 'shape', ()))}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {features.dtype}")
    if not isinstance(neighbours, Tensor) or neighbours.dim() != 2:
        raise ValueError(
            f"neighbours must be a long [N, k] tensor, got shape {tuple(getattr(neighbours, 'shape', ()))}"
        )
    if neighbours.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"neighbours must be an integer (long) tensor, got dtype {neighbours.dtype}")
    n = features.shape[0]
    if neighbours.shape[0] != n:
        raise ValueError(f"neighbours has {neighbours.shape[0]} rows but features has N = {n}")
    if n == 0:
        raise ValueError("features is empty (N = 0)")
    if neighbours.shape[1] == 0:
        raise ValueError("neighbours has k = 0 columns")
    if neighbours.device != features.device:
        raise ValueError(f"neighbours is on {neighbours.device} but features on {features.device}")
    if int(neighbours.min()) < 0 or int(neighbours.max()) >= n:
        raise ValueError(f"neighbours contains indices outside [0, {n - 1}]")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return _NeighbourMean.apply(features, neighbours.long(), bool(include_self), chunk)


class _SparseApply(torch.autograd.Function):
    """``out = A @ f`` with ``grad_f = A^T @ grad_out``; ``A`` and ``A^T`` are prebuilt sparse CSR matrices."""

    @staticmethod
    def forward(ctx, features: Tensor, a: Tensor, a_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.a_t = a_t
        return a @ features

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return ctx.a_t @ grad_out.contiguous(), None, None


def _check_neighbours(neighbours: Tensor) -> None:
    if not isinstance(neighbours, Tensor) or neighbours.dim() != 2:
        raise ValueError(
            f"neighbours must be a long [N, k] tensor, got shape {tuple(getattr(neighbours, 'shape', ()))}"
        )
    if neighbours.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"neighbours must be an integer (long) tensor, got dtype {neighbours.dtype}")
    n = neighbours.shape[0]
    if n == 0:
        raise ValueError("neighbours is empty (N = 0)")
    if neighbours.shape[1] == 0:
        raise ValueError("neighbours has k = 0 columns")
    if int(neighbours.min()) < 0 or int(neighbours.max()) >= n:
        raise ValueError(f"neighbours contains indices outside [0, {n - 1}]")


class KnnSmoother:
    """The smoothing of ``smooth_features`` as a prebuilt sparse averaging matrix, for repeated use.

    ``A [N, N]`` (sparse CSR, values ``1 / (k + include_self)``, repeated neighbours summed) and its transpose are
    built once from ``neighbours``; ``smoother(features)`` returns ``A @ features`` (``[N, D]``), differentiable
    w.r.t. ``features`` (custom backward ``A^T @ grad``). Same result as ``smooth_features(features, neighbours,
    include_self)`` up to float summation order, and faster when the graph is fixed (stage 2: frozen geometry).
    Memory: two CSR matrices of ``N * (k + 1)`` entries. The matrices follow the features' device (built on the
    neighbours' device, copied once per new device and cached).

    Args:
        neighbours: ``long [N, k]`` indices in ``[0, N)`` (e.g. from ``knn_indices(..., include_self=False)``).
        include_self: include the point itself in the mean.
    """

    def __init__(self, neighbours: Tensor, include_self: bool = True) -> None:
        _check_neighbours(neighbours)
        n, k = neighbours.shape
        nb = neighbours.long()
        dev = nb.device
        rows = torch.arange(n, device=dev)
        cols = torch.cat([rows[:, None], nb], dim=1) if include_self else nb
        kk = cols.shape[1]
        cols = torch.sort(cols, dim=1).values  # CSR with sorted column indices within each row
        if bool((cols[:, 1:] == cols[:, :-1]).any()):  # repeated entries: merge them (sum) via COO coalesce
            r = rows[:, None].expand(n, kk).reshape(-1)
            v = torch.full((n * kk,), 1.0 / kk, dtype=torch.float64, device=dev)
            a = torch.sparse_coo_tensor(torch.stack([r, cols.reshape(-1)]), v, (n, n), check_invariants=False)
            a = a.coalesce()
            r, c, v = a.indices()[0], a.indices()[1], a.values()
        else:
            r = rows[:, None].expand(n, kk).reshape(-1)
            c = cols.reshape(-1)
            v = torch.full((n * kk,), 1.0 / kk, dtype=torch.float64, device=dev)
        # A: entries already in row-major order; A^T: the same entries grouped by column (stable: rows ascending)
        crow = torch.zeros(n + 1, dtype=torch.long, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
        o = torch.argsort(c, stable=True)
        crow_t = torch.zeros(n + 1, dtype=torch.long, device=dev)
        crow_t[1:] = torch.cumsum(torch.bincount(c, minlength=n), 0)
        self.n = n
        self.include_self = bool(include_self)
        self._parts = ((crow, c, v), (crow_t, r[o], v[o]))
        self._cache: dict = {}

    def _mats(self, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            mats = []
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR "beta" notice
                for crow, col, val in self._parts:
                    mats.append(
                        torch.sparse_csr_tensor(
                            crow.to(device),
                            col.to(device),
                            val.to(device=device, dtype=dtype),
                            (self.n, self.n),
                            check_invariants=False,
                        )
                    )
            self._cache[key] = (mats[0], mats[1])
        return self._cache[key]

    def __call__(self, features: Tensor) -> Tensor:
        """``[N, D]`` float features -> ``[N, D]`` smoothed features (same dtype/device)."""
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a [N, D] tensor, got shape {tuple(getattr(features, 'shape', ()))}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if features.shape[0] != self.n:
            raise ValueError(f"features has {features.shape[0]} rows but the neighbour graph has N = {self.n}")
        a, a_t = self._mats(features.device, features.dtype)
        return _SparseApply.apply(features.contiguous(), a, a_t)
