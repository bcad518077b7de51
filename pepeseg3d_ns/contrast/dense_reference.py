"""Reference definitions of pepe-contrast's mask terms on dense masks ``masks: bool [M, H, W]`` (torch only).

These are the paper's quantities written directly: for ``P`` sampled pixels ``pix: long [P]`` (flat ``y * W + x``)

* ``membership``      -- ``member: bool [P, M]``, which masks contain each sampled pixel;
* ``pixel_weights``   -- ``omega(p)`` (paper eq. 7);
* ``mask_balanced_probabilities`` -- pixel draw probabilities giving every mask an equal share (our addition);
* ``active_labels``   -- ``Lambda(s, p)``, the finest mask containing ``p`` whose scale is ``>= s``;
* ``pair_targets``    -- positive / hard / valid flags of pairs ``(i, j)`` at per-pair scales ``s`` (eq. 6);
* ``sample_pairs``    -- pairs ``(i, j, s)`` with uniform scales and over-sampled hard pairs.

``mask_scales: float [M]`` in ``[0, 1]`` (NaN/inf = unknown: such a mask is absent everywhere), ``mask_areas: [M]``
pixel areas. They cost ``O(M H W)`` per view and are not used by a training step, which computes the same terms
from per-pixel mask sets (:mod:`pepeseg3d_ns.contrast.sampling`); the tests check one against the other, and
``pepeseg3d bench-step`` times both. Indices ``i, j, rows`` index the sampled pixels (rows of ``member``).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from pepeseg3d_ns.contrast.sampling import (
    ScaleLike,
    _broadcast_scale,
    _check_index,
    _check_member,
    _check_scales,
    _rand,
    _randint_below,
    mask_rank,
)


# ----------------------------------------------------------------------------------------------------------------
# membership, weights, labels
# ----------------------------------------------------------------------------------------------------------------


def membership(masks: Tensor, pix: Tensor) -> Tensor:
    """Which masks contain each sampled pixel.

    Args:
        masks: ``[M, H, W]`` SAM masks (bool, or any dtype where nonzero = inside). ``M`` may be 0.
        pix: ``long [P]`` flat pixel indices ``y * W + x`` in ``[0, H * W)``.

    Returns:
        ``bool [P, M]``: ``member[p, m]`` is True when pixel ``pix[p]`` lies inside mask ``m``.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a [M, H, W] tensor, got shape {tuple(getattr(masks, 'shape', ()))}")
    m, h, w = masks.shape
    pix = _check_index(pix, h * w, "pix").to(masks.device)
    return masks.reshape(m, h * w).index_select(1, pix).bool().t().contiguous()


def pixel_weights(
    member: Tensor, mask_areas: Tensor, mask_scales: Optional[Tensor] = None, w_min: float = 1.0, w_max: float = 10.0
) -> Tensor:
    """Pixel weights ``omega(p)`` of paper eq. 7: pixels inside small masks weigh more.

    ``raw(p) = 1 / mean_{m : member[p, m]} mask_areas[m]`` (the inverse of the mean area of the masks covering
    ``p``), then min-max normalised over the covered sampled pixels to ``[w_min, w_max]`` = ``[1, 10]``:
    ``omega(p) = w_min + (w_max - w_min) * (raw(p) - min raw) / (max raw - min raw)``. When all covered pixels
    have the same ``raw`` (or only one is covered), every covered pixel gets ``w_min`` = 1. Pixels covered by no
    mask get weight 0 (they are excluded from the contrastive loss anyway).

    Args:
        member: ``bool [P, M]`` from :func:`membership`.
        mask_areas: ``[M]`` pixel areas of the masks (any real dtype, must be ``> 0`` for masks that are used).
        mask_scales: optional ``float [M]``; when given, masks with a non-finite scale are ignored (absent).

    Returns:
        ``float32 [P]`` weights on ``member``'s device.
    """
    member = _check_member(member)
    p, m = member.shape
    if not isinstance(mask_areas, Tensor) or mask_areas.shape != (m,):
        raise ValueError(f"mask_areas must be a [M] tensor with M={m}, got shape {tuple(getattr(mask_areas, 'shape', ()))}")
    if not w_max >= w_min:
        raise ValueError(f"need w_max >= w_min, got [{w_min}, {w_max}]")
    areas = mask_areas.to(member.device).double()
    if mask_scales is not None:
        member = member & torch.isfinite(_check_scales(mask_scales, m)).to(member.device)[None, :]
    used = member.any(0)
    if bool(used.any()) and not bool(torch.all(torch.isfinite(areas[used]) & (areas[used] > 0))):
        raise ValueError("mask_areas must be finite and > 0 for every mask that covers a sampled pixel")
    count = member.sum(1)
    covered = count > 0
    out = torch.zeros(p, dtype=torch.float32, device=member.device)
    if not bool(covered.any()):
        return out
    area_sum = member.double() @ torch.where(used, areas, torch.zeros_like(areas))
    raw = count[covered].double() / area_sum[covered]  # 1 / mean area
    lo, hi = raw.min(), raw.max()
    if float(hi - lo) <= 1e-12 * float(hi):
        out[covered] = float(w_min)
    else:
        out[covered] = (w_min + (w_max - w_min) * (raw - lo) / (hi - lo)).float()
    return out


def mask_balanced_probabilities(masks: Tensor, mask_scales: Tensor, mix: float = 0.5) -> Tensor:
    """Per-pixel draw probabilities that give every SAM mask an equal share of the sampled pixels.

    A pixel is drawn by one of two routes: with probability ``1 - mix`` uniformly among the covered pixels (the
    pixels inside at least one mask with a finite scale), with probability ``mix`` by first picking one of those
    masks uniformly and then a uniform pixel inside it. The marginal probability of pixel ``p`` is therefore

    ``prob(p) = (1 - mix) / n_covered + mix * (1 / M') * sum_{m : p in m} 1 / area(m)``

    with ``M'`` the number of non-empty masks with a finite scale and ``area(m)`` its pixel count. A mask of
    ``a`` pixels receives about ``mix / M'`` of the draws whatever ``a`` is, so a 50-pixel object gets the same
    number of samples as a 5000-pixel table (uniform drawing would give it 1 %). ``mix = 0`` is uniform.

    Args:
        masks: ``[M, H, W]`` SAM masks (bool, or nonzero = inside); ``M`` may be 0.
        mask_scales: ``float [M]``; masks with a non-finite scale are ignored.
        mix: share of the mask-first route, in ``[0, 1]``.

    Returns:
        ``float64 [H * W]`` (flat ``y * W + x``), summing to 1 over the covered pixels and 0 elsewhere; all zeros
        when no pixel is covered.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a [M, H, W] tensor, got shape {tuple(getattr(masks, 'shape', ()))}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    m, h, w = masks.shape
    scales = _check_scales(mask_scales, m).to(masks.device)
    flat = masks.reshape(m, h * w).bool() & torch.isfinite(scales)[:, None]
    area = flat.sum(1)
    flat = flat[area > 0]
    area = area[area > 0].double()
    covered = flat.any(0)
    out = torch.zeros(h * w, dtype=torch.float64, device=masks.device)
    n = int(covered.sum())
    if n == 0:
        return out
    out[covered] = (1.0 - mix) / n
    out += mix * (flat.double() / area[:, None]).sum(0) / flat.shape[0]
    return out


class _MaskLists(NamedTuple):
    """Per sampled pixel, its usable masks in "finest first" order (see :func:`mask_rank`), padded.

    ``masks [P, L]`` mask indices (-1 = padding), ``scales [P, L]`` their scales (+inf = padding, nondecreasing
    along each row), ``count [P]`` number of usable masks, ``known [P, M]`` membership restricted to masks with a
    finite scale. ``L = max(1, max count)``: the maximum number of masks over one pixel, usually far below ``M``,
    so per-pair work is ``O(K L)`` instead of ``O(K M)``.
    """

    masks: Tensor
    scales: Tensor
    count: Tensor
    known: Tensor


def _mask_lists(member: Tensor, scales: Tensor, mask_areas: Optional[Tensor]) -> _MaskLists:
    p, m = member.shape
    dev = member.device
    known = member & torch.isfinite(scales)[None, :]
    count = known.sum(1)
    L = max(1, int(count.max())) if p else 1
    if m == 0:
        return _MaskLists(
            torch.full((p, 1), -1, dtype=torch.long, device=dev),
            torch.full((p, 1), float("inf"), dtype=torch.float64, device=dev),
            count,
            known,
        )
    if mask_areas is not None:
        if not isinstance(mask_areas, Tensor) or mask_areas.shape != (m,):
            raise ValueError(f"mask_areas must be a [M] tensor with M={m}, got shape {tuple(getattr(mask_areas, 'shape', ()))}")
        mask_areas = mask_areas.to(dev)
    rank = mask_rank(scales, mask_areas)
    inv = torch.empty_like(rank)
    inv[rank] = torch.arange(m, device=dev)  # rank -> mask index
    key = torch.where(known, rank[None, :], torch.full_like(rank[None, :], m))
    r = torch.sort(key, dim=1).values[:, :L]  # ranks of each pixel's masks, ascending, padded with m
    pad = r >= m
    masks = torch.where(pad, torch.full_like(r, -1), inv[r.clamp(max=m - 1)])
    sc = torch.where(pad, torch.full(r.shape, float("inf"), dtype=torch.float64, device=dev), scales.double()[masks.clamp(min=0)])
    return _MaskLists(masks, sc.contiguous(), count, known)


def _labels_from_lists(lists: _MaskLists, rows: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
    """Active labels ``[K]`` and ``t [K]``, the number of masks of ``rows[k]`` with scale ``< s[k]``."""
    seq = lists.scales.index_select(0, rows)  # [K, L] nondecreasing
    t = torch.searchsorted(seq, s.double()[:, None].contiguous(), side="left").squeeze(1)  # first scale >= s
    L = seq.shape[1]
    lab = lists.masks.flatten()[rows * L + t.clamp(max=L - 1)]
    lab = torch.where(t < lists.count[rows], lab, torch.full_like(lab, -1))
    return lab, t


def active_labels(
    member: Tensor, mask_scales: Tensor, s: ScaleLike, rows: Tensor, mask_areas: Optional[Tensor] = None
) -> Tensor:
    """Active label ``Lambda(s_k, p_k)``: the finest mask containing sampled pixel ``rows[k]`` with ``s_M >= s_k``.

    "Finest" = smallest ``s_M``; ties broken by smallest area (when ``mask_areas`` is given), then lowest mask
    index. Masks with a non-finite scale never count.

    Args:
        member: ``bool [P, M]`` from :func:`membership`.
        mask_scales: ``float [M]``.
        s: scale per query, a float or ``float [K]`` (a 0-d tensor/float is broadcast to ``K``); finite.
        rows: ``long [K]`` rows of ``member`` (indices of sampled pixels).
        mask_areas: optional ``[M]`` areas for the tie-break.

    Returns:
        ``long [K]``: mask index in ``[0, M)``, or ``-1`` when no mask containing the pixel has ``s_M >= s_k``.
    """
    member = _check_member(member)
    p, m = member.shape
    dev = member.device
    scales = _check_scales(mask_scales, m).to(dev)
    rows = _check_index(rows, p, "rows").to(dev)
    s_t = _broadcast_scale(s, rows.shape[0], dev)
    return _labels_from_lists(_mask_lists(member, scales, mask_areas), rows, s_t)[0]


def _targets_from_lists(lists: _MaskLists, i: Tensor, j: Tensor, s: Tensor) -> Dict[str, Tensor]:
    covered = lists.count > 0
    valid = covered[i] & covered[j] & (i != j)
    li, ti = _labels_from_lists(lists, i, s)
    lj, _ = _labels_from_lists(lists, j, s)
    same = (li == lj) & (li >= 0)
    # the masks of i finer than s are its first ti list entries; one of them also containing j -> grouped
    m = lists.known.shape[1]
    if m == 0:
        finer = torch.zeros_like(valid)
    else:
        mi = lists.masks.index_select(0, i)  # [K, L]
        pos = torch.arange(mi.shape[1], device=mi.device)[None, :]
        in_j = lists.known.flatten()[(j[:, None] * m + mi.clamp(min=0)).flatten()].view(mi.shape)
        finer = (in_j & (pos < ti[:, None])).any(1)
    return {
        "positive": valid & (same | finer),
        "hard": valid & same & ~finer,
        "valid": valid,
        "label_i": li,
        "label_j": lj,
    }


def pair_targets(
    member: Tensor,
    mask_scales: Tensor,
    i: Tensor,
    j: Tensor,
    s: ScaleLike,
    mask_areas: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Targets of pairs ``(i[k], j[k])`` of sampled pixels at scales ``s[k]`` (the grouping ``G`` of eq. 3/8).

    With ``A = {m : s_m finite}``, ``Lambda`` from :func:`active_labels` and
    ``finer(k) = exists m in A: member[i_k, m] and member[j_k, m] and s_m < s_k`` (a common mask strictly finer
    than ``s_k``; being grouped at a finer scale implies being grouped at ``s_k``):

    * ``valid[k]    = covered(i_k) and covered(j_k) and i_k != j_k``, where ``covered(p)`` = ``p`` lies in at least
      one mask of ``A``;
    * ``same[k]     = Lambda(s_k, i_k) == Lambda(s_k, j_k) >= 0``;
    * ``positive[k] = valid[k] and (same[k] or finer(k))``;
    * ``hard[k]     = valid[k] and same[k] and not finer(k)`` -- positive only because of the scale: at any scale
      below the common label's scale the two pixels would be negatives.

    Every valid pair that is not positive is a negative. ``positive`` and ``hard`` are False on invalid pairs.
    Cost ``O(P M log M + K L)`` with ``L`` the largest number of masks over one sampled pixel.

    Args:
        member: ``bool [P, M]``; mask_scales: ``float [M]``; i, j: ``long [K]`` rows of ``member``;
        s: float or ``float [K]`` (finite); mask_areas: optional ``[M]`` (tie-break of :func:`active_labels`).

    Returns:
        dict with ``positive``, ``hard``, ``valid`` (each ``bool [K]``) and ``label_i``, ``label_j``
        (``long [K]``, the active labels, -1 = none).
    """
    member = _check_member(member)
    p, m = member.shape
    dev = member.device
    scales = _check_scales(mask_scales, m).to(dev)
    i = _check_index(i, p, "i").to(dev)
    j = _check_index(j, p, "j").to(dev)
    if i.shape != j.shape:
        raise ValueError(f"i and j must have the same shape, got {tuple(i.shape)} and {tuple(j.shape)}")
    s_t = _broadcast_scale(s, i.shape[0], dev)
    return _targets_from_lists(_mask_lists(member, scales, mask_areas), i, j, s_t)


def sample_pairs(
    member: Tensor,
    mask_scales: Tensor,
    n_pairs: int,
    hard_fraction: float = 0.25,
    candidate_factor: int = 8,
    generator: Optional[torch.Generator] = None,
    mask_areas: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample ``n_pairs`` training pairs ``(i, j, s)`` among covered sampled pixels, over-sampling hard pairs.

    Procedure: let ``V`` be the covered rows (pixels in at least one mask with a finite scale). Draw
    ``N_c = candidate_factor * n_pairs`` i.i.d. candidates: ``i`` uniform in ``V``, ``j`` uniform in ``V \\ {i}``,
    ``s ~ U(0, 1)``. The first ``n_u = n_pairs - round(hard_fraction * n_pairs)`` candidates are kept as they are
    (the uniform part, which contains hard pairs at their natural rate); from the remaining ``N_c - n_u``
    candidates the hard ones (:func:`pair_targets`) are taken in draw order up to ``n_h = n_pairs - n_u``; if
    fewer exist, the shortfall is filled with the first non-hard remaining candidates. The result is shuffled.
    So the output holds at least ``min(n_h, #hard in the pool)`` hard pairs plus the uniform part's own.

    Args:
        member: ``bool [P, M]``; mask_scales: ``float [M]``.
        n_pairs: number of pairs ``K`` to return (``>= 0``).
        hard_fraction: share of the output reserved for hard candidates, in ``[0, 1]`` (0 = plain uniform).
        candidate_factor: candidates drawn per output pair (``>= 1``).
        generator: optional ``torch.Generator``; the result is a deterministic function of its state.
        mask_areas: optional ``[M]`` for the active-label tie-break.

    Returns:
        ``i, j``: ``long [K]`` rows of ``member`` with ``i != j``; ``s``: ``float32 [K]`` scales in ``[0, 1)``.
        When fewer than 2 pixels are covered, all three are empty (``K = 0``).
    """
    member = _check_member(member)
    p, m = member.shape
    dev = member.device
    scales = _check_scales(mask_scales, m).to(dev)
    if int(n_pairs) != n_pairs or n_pairs < 0:
        raise ValueError(f"n_pairs must be a non-negative integer, got {n_pairs}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if int(candidate_factor) != candidate_factor or candidate_factor < 1:
        raise ValueError(f"candidate_factor must be an integer >= 1, got {candidate_factor}")
    n_pairs, candidate_factor = int(n_pairs), int(candidate_factor)
    lists = _mask_lists(member, scales, mask_areas)
    covered_rows = torch.nonzero(lists.count > 0).flatten()
    v = covered_rows.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if v < 2 or n_pairs == 0:
        return empty, empty.clone(), torch.zeros(0, dtype=torch.float32, device=dev)
    n_c = candidate_factor * n_pairs
    ia = _randint_below(torch.full((n_c,), v, dtype=torch.long, device=dev), generator)
    off = 1 + _randint_below(torch.full((n_c,), v - 1, dtype=torch.long, device=dev), generator)
    ja = (ia + off) % v
    s_c = _rand(n_c, generator, dev).float()
    i_c, j_c = covered_rows.index_select(0, ia), covered_rows.index_select(0, ja)
    n_h = int(round(hard_fraction * n_pairs))
    n_u = n_pairs - n_h
    keep = torch.arange(n_u, device=dev)
    if n_h > 0:
        pool = torch.arange(n_u, n_c, device=dev)
        hard = _targets_from_lists(lists, i_c[pool], j_c[pool], s_c[pool])["hard"]
        # hard ones first (in draw order), then the rest (in draw order); take n_h of them
        order = torch.argsort((~hard).to(torch.int8), stable=True)
        keep = torch.cat([keep, pool[order[:n_h]]])
    shuffle = torch.argsort(_rand(n_pairs, generator, dev))
    keep = keep[shuffle]
    return i_c[keep], j_c[keep], s_c[keep]
