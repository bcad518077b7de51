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
* ``"torch"`` (any device, used on CUDA): points are split into a balanced kd-partition of leaves of at most
  ``leaf_size = 32`` points (recursive median splits along the longest box side, two stable sorts per level). For
  each query leaf: (A) the k best among the points of the 16 leaves whose boxes are nearest to its box give every
  query point an upper bound ``U(q)`` of its true k-th squared distance; (B) every leaf whose box lies within
  ``U(q)`` of the point ``q`` (point-to-box distance, ``<=`` so that ties are kept) may hold a neighbour; (C) the
  query leaf's points are compared with all points of the union of those leaves and the k best kept. (C) sees
  every point that can be at most as far as the true k-th neighbour, so the result is exact, with no fallback.
  Memory is ``O(chunk * 1024)`` distances per block plus the ``[chunk / leaf_size, n_leaves]`` box-gap block
  and ``O(N)``; no ``N x N`` matrix is ever formed. On CPU it is ~10-20x slower than cKDTree (see
  docs/contrast_bench.md); it exists for CUDA tensors and for machines without scipy. (The box-gap pass is ``O((N / leaf_size)^2)``: negligible
  up to a few million points.)
* ``"scipy"`` (CPU only): ``scipy.spatial.cKDTree`` queried in chunks, with the same tie rule (boundary ties are
  resolved with a radius query). Much faster on CPU; ``"auto"`` uses it for CPU tensors when scipy imports.
"""

from __future__ import annotations

import math
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
# selection with the (distance, index) tie rule
# ----------------------------------------------------------------------------------------------------------------


def _select_k(d: Tensor, idx: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """k smallest of each row of ``d`` ordered by (d, idx); ``d [R, C]`` float (inf = invalid), ``idx [R, C]`` long.

    Returns ``(dk [R, k], ik [R, k])``. Rows with fewer than ``k`` finite entries end with ``inf`` distances.
    """
    vals, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)
    ids = idx.gather(1, pos)
    # order the selected k by (d, idx): stable sort by index, then stable sort by distance
    o = torch.argsort(ids, dim=1, stable=True)
    vals, ids = vals.gather(1, o), ids.gather(1, o)
    o = torch.argsort(vals, dim=1, stable=True)
    vals, ids = vals.gather(1, o), ids.gather(1, o)
    # rows where more candidates than k share the k-th distance: the selected set depends on the tie rule
    kth = vals[:, -1:]
    tie = ((d <= kth).sum(dim=1) > k) & torch.isfinite(kth[:, 0])
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        dr, ir = d[rows], idx[rows]
        o = torch.argsort(ir, dim=1, stable=True)
        dr, ir = dr.gather(1, o), ir.gather(1, o)
        o = torch.argsort(dr, dim=1, stable=True)[:, :k]
        vals[rows] = dr.gather(1, o)
        ids[rows] = ir.gather(1, o)
    return vals, ids


# ----------------------------------------------------------------------------------------------------------------
# torch backend: balanced kd-leaves + nearest-box candidate search + certification
# ----------------------------------------------------------------------------------------------------------------


def _build_leaves(pts: Tensor, leaf_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced kd-partition. Returns ``table [L, B] long`` (point ids, -1 padded), ``lo [L, 3]``, ``hi [L, 3]``
    (leaf bounding boxes) and ``leaf_of [N] long``."""
    n, dev = pts.shape[0], pts.device
    levels = max(0, math.ceil(math.log2(max(n / leaf_size, 1.0))))
    order = torch.arange(n, device=dev)
    group = torch.zeros(n, dtype=torch.long, device=dev)
    for level in range(levels):
        g = 1 << level
        p = pts[order]
        lo = torch.full((g, 3), float("inf"), dtype=pts.dtype, device=dev)
        hi = torch.full((g, 3), float("-inf"), dtype=pts.dtype, device=dev)
        gi = group[:, None].expand(-1, 3)
        lo = lo.scatter_reduce(0, gi, p, reduce="amin")
        hi = hi.scatter_reduce(0, gi, p, reduce="amax")
        axis = (hi - lo).argmax(dim=1)  # [g]
        coord = p.gather(1, axis[group][:, None]).squeeze(1)
        o1 = torch.argsort(coord, stable=True)
        o2 = torch.argsort(group[o1], stable=True)
        perm = o1[o2]
        order, group = order[perm], group[perm]
        counts = torch.bincount(group, minlength=g)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=dev) - starts[group]
        group = 2 * group + (rank >= counts[group] // 2).long()
    n_leaves = 1 << levels
    counts = torch.bincount(group, minlength=n_leaves)
    starts = torch.cumsum(counts, 0) - counts
    bmax = int(counts.max())
    rank = torch.arange(n, device=dev) - starts[group]
    table = torch.full((n_leaves, bmax), -1, dtype=torch.long, device=dev)
    table[group, rank] = order
    leaf_of = torch.empty(n, dtype=torch.long, device=dev)
    leaf_of[order] = group
    gi = group[:, None].expand(-1, 3)
    p = pts[order]
    lo = torch.full((n_leaves, 3), float("inf"), dtype=pts.dtype, device=dev).scatter_reduce(0, gi, p, reduce="amin")
    hi = torch.full((n_leaves, 3), float("-inf"), dtype=pts.dtype, device=dev).scatter_reduce(0, gi, p, reduce="amax")
    return table, lo, hi, leaf_of


def _box_gap2(qlo: Tensor, qhi: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Squared distance between boxes ``[Q, 3]`` and boxes ``[L, 3]`` -> ``[Q, L]`` (0 when they overlap)."""
    gap = torch.clamp(torch.maximum(lo[None] - qhi[:, None], qlo[:, None] - hi[None]), min=0)
    return _sum_sq3(gap)


def _sum_sq3(g: Tensor) -> Tensor:
    """``g[..., 0]^2 + g[..., 1]^2 + g[..., 2]^2`` summed left to right (the order used for point distances, so that
    float rounding keeps box distances <= point distances)."""
    return (g[..., 0].square() + g[..., 1].square()) + g[..., 2].square()


def _candidates(
    pts: Tensor, q_ids: Tensor, cand: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    """Best k other points among ``cand [R, C]`` (ids, -1 = none) for queries ``q_ids [R, Q]`` (-1 = none).

    Returns ``(d2 [R, Q, k], ids [R, Q, k])``."""
    r, q = q_ids.shape
    qp = pts[q_ids.clamp(min=0)]  # [R, Q, 3]
    cp = pts[cand.clamp(min=0)]  # [R, C, 3]
    d = (qp[:, :, None, 0] - cp[:, None, :, 0]).square_()
    for ax in (1, 2):  # same summation order as numpy's (x - y) ** 2 summed over 3 columns
        d.add_((qp[:, :, None, ax] - cp[:, None, :, ax]).square_())
    d.masked_fill_(cand[:, None, :] == q_ids[:, :, None], float("inf"))  # not its own neighbour
    d.masked_fill_((cand < 0)[:, None, :], float("inf"))  # padding
    c = cand.shape[1]
    vals, ids = _select_k(d.reshape(r * q, c), cand[:, None, :].expand(r, q, c).reshape(r * q, c), k)
    return vals.reshape(r, q, k), ids.reshape(r, q, k)


def _knn_torch(
    points: Tensor, k: int, chunk: int, progress: bool, leaf_size: int = 32, n_seed_leaves: int = 16
) -> Tensor:
    """Exact kNN (others only) with balanced kd-leaves; see the module docstring. Returns ``long [N, k]``."""
    from tqdm.auto import tqdm

    n, dev = points.shape[0], points.device
    pts = points.to(_dist_dtype(points))
    table, lo, hi, _ = _build_leaves(pts, leaf_size)
    n_leaf, bmax = table.shape
    out = torch.empty((n, k), dtype=torch.long, device=dev)
    m0 = min(n_seed_leaves, n_leaf)
    leaves_per_chunk = max(1, chunk // bmax)
    budget = max(chunk, 1) * 1024  # query x candidate distances held at once in the exact pass
    with tqdm(total=n, desc="kNN", unit="pt", disable=not progress, leave=False) as bar:
        for s in range(0, n_leaf, leaves_per_chunk):
            ql = torch.arange(s, min(s + leaves_per_chunk, n_leaf), device=dev)
            c = len(ql)
            q_ids = table[ql]  # [c, B]
            valid = q_ids >= 0
            gap = _box_gap2(lo[ql], hi[ql], lo, hi)  # [c, L]
            # (A) upper bound U(q) >= true k-th distance from the m0 nearest leaves (real points, real distances)
            seed = torch.topk(gap, m0, dim=1, largest=False, sorted=False).indices
            d2, _ = _candidates(pts, q_ids, table[seed].reshape(c, -1), k)
            upper = d2[:, :, -1].masked_fill(~valid, float("-inf"))  # [c, B]; inf if < k points were seen
            # (B) leaves a query point may need: point-to-box distance <= U(q); superset by box gap <= max U
            need_box = gap <= upper.max(dim=1).values[:, None]  # [c, L]
            n_sup = need_box.sum(dim=1)
            sup_order = torch.argsort(n_sup, descending=True)
            sup_sorted = n_sup[sup_order].tolist()
            j = 0
            while j < c:  # groups of query leaves with similar superset sizes (bounded memory)
                smax = max(1, sup_sorted[j])
                grp = sup_order[j : j + max(1, budget // (bmax * smax))]
                j += len(grp)
                sv, sidx = torch.topk(need_box[grp].to(torch.int8), smax, dim=1, sorted=False)  # superset ids
                qg, ug = q_ids[grp], upper[grp]
                qp = pts[qg.clamp(min=0)]  # [g, B, 3]
                gb = torch.clamp(
                    torch.maximum(lo[sidx][:, None] - qp[:, :, None], qp[:, :, None] - hi[sidx][:, None]), min=0
                )
                need = (_sum_sq3(gb) <= ug[:, :, None]) & sv.bool()[:, None, :]  # [g, B, smax]
                need_leaf = need.any(dim=1)  # [g, smax]: union over the leaf's points
                counts = need_leaf.sum(dim=1)
                # (C) exact pass: every point against all points of its leaf's needed leaves; leaves with
                # similar candidate counts are batched together to bound padding and memory
                order = torch.argsort(counts, descending=True)
                counts_sorted = counts[order].tolist()
                i = 0
                while i < len(grp):
                    mcount = max(1, counts_sorted[i])
                    rows = order[i : i + max(1, budget // (bmax * mcount * bmax))]
                    i += len(rows)
                    nv, nid = torch.topk(need_leaf[rows].to(torch.int8), mcount, dim=1, sorted=False)
                    leaves = sidx[rows].gather(1, nid)
                    cand = table[leaves].reshape(len(rows), -1)
                    cand = cand.masked_fill(~nv.bool().repeat_interleave(bmax, dim=1), -1)
                    _, ids = _candidates(pts, qg[rows], cand, k)
                    vr = qg[rows] >= 0
                    out[qg[rows][vr]] = ids[vr]
            bar.update(int(valid.sum()))
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
        chunk: query points per block, bounds memory: the torch backend holds about ``chunk * 1024`` candidate
            distances at a time (more only when a single 32-point leaf needs more candidates, e.g. isolated
            points), the scipy backend queries ``max(chunk, 16384)`` points at a time.
        include_self: if True, column 0 is the point itself and columns ``1..k-1`` its ``k - 1`` nearest others;
            if False, the ``k`` nearest other points.
        progress: show a tqdm progress bar over the query points.
        backend: ``"auto"`` (scipy's cKDTree for CPU tensors when scipy imports, else torch), ``"torch"``
            (any device) or ``"scipy"`` (CPU tensors only).

    Returns:
        ``long [N, k]`` on the device of ``points``: row ``i`` holds neighbour indices sorted by
        ``(squared distance, index)`` ascending (ties broken by the smaller index).

    Raises:
        ValueError: wrong shape/dtype, empty input, non-finite coordinates, ``k`` out of range, unknown backend,
            or ``backend="scipy"`` for a CUDA tensor.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    n_others = _check_points(points, k, include_self)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    n = points.shape[0]
    if backend == "auto":
        backend = "scipy" if points.device.type == "cpu" and _scipy_available() else "torch"
    if backend == "scipy" and points.device.type != "cpu":
        raise ValueError(f"backend='scipy' needs a CPU tensor, points are on {points.device}")
    with torch.no_grad():
        if n_others == 0:
            others = torch.empty((n, 0), dtype=torch.long, device=points.device)
        elif backend == "scipy":
            others = _knn_scipy(points.detach(), n_others, chunk, progress)
        else:
            others = _knn_torch(points.detach(), n_others, chunk, progress)
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
