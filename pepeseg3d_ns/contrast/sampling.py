"""Pixel and pair sampling of pepe-contrast (PePESeg3D stage 2). Pure functions of tensors (torch only).

Per training step the model has one view ``H x W`` with its SAM masks ``masks: bool [M, H, W]``, their scales
``mask_scales: float [M]`` (``s_M`` in ``[0, 1]``; NaN/inf = unknown, such a mask is treated as absent everywhere
in this module), their pixel areas ``mask_areas: [M]``, and ``P`` sampled pixels ``pix: long [P]`` (flat indices
``y * W + x`` into ``H * W``). From those this module builds:

* ``membership``      -- ``member: bool [P, M]``, which masks contain each sampled pixel;
* ``pixel_weights``   -- ``omega(p)`` (paper eq. 7);
* ``mask_balanced_probabilities`` -- pixel draw probabilities giving every mask an equal share (our addition);
* ``active_labels``   -- ``Lambda(s, p)``, the finest mask containing ``p`` whose scale is ``>= s``;
* ``pair_targets``    -- positive / hard / valid flags of pairs ``(i, j)`` at per-pair scales ``s``;
* ``sample_pairs``    -- pairs ``(i, j, s)`` with uniform scales and over-sampled hard pairs;
* ``radius_px`` / ``perception_pairs`` -- window partners and adaptive depth/colour thresholds (paper eq. 4).

Those take dense masks and are the reference definitions. The training step uses their equivalents on the view's
per-pixel mask sets (:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`), which never touch ``[M, H, W]`` and
read nothing back from the device:

* ``set_draw_weights`` + ``draw_pixels`` -- the same draw laws ("uniform", "omega", "mask"), without replacement,
  by an exponential race over the pixels (``O(H W)``);
* ``gather_sampled`` -- the sampled pixels' usable masks as bit sets in finest-first order (``O(P L)``);
* ``set_pixel_weights``, ``set_pair_targets``, ``set_sample_pairs`` -- omega, G and the pair draw (``O(K M / 64)``);
* ``covered_pixels`` -- the covered map (for the centroid refresh).

Indices ``i, j, rows`` always index the *sampled* pixels (rows of ``member``), not the image.

Randomness: every random draw takes an optional ``torch.Generator``; numbers are drawn on the generator's device
(CPU when none is given: then on the device of the inputs) and moved to the inputs' device, so results are
reproducible given the generator's seed.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

ScaleLike = Union[float, Tensor]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_member(member: Tensor) -> Tensor:
    if not isinstance(member, Tensor) or member.dim() != 2:
        raise ValueError(f"member must be a [P, M] tensor, got shape {tuple(getattr(member, 'shape', ()))}")
    return member.bool()


def _check_scales(mask_scales: Tensor, m: int, name: str = "mask_scales") -> Tensor:
    if not isinstance(mask_scales, Tensor) or mask_scales.dim() != 1 or mask_scales.shape[0] != m:
        raise ValueError(f"{name} must be a [M] tensor with M={m}, got shape {tuple(getattr(mask_scales, 'shape', ()))}")
    if not mask_scales.is_floating_point():
        mask_scales = mask_scales.float()
    return mask_scales


def _check_index(idx: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(idx, Tensor) or idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D long tensor, got shape {tuple(getattr(idx, 'shape', ()))}")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name} has entries outside [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
    return idx.long()


def _broadcast_scale(s: ScaleLike, k: int, device: torch.device, name: str = "s") -> Tensor:
    s_t = torch.as_tensor(s, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(s_t).all()):
        raise ValueError(f"{name} (scales) must be finite")
    if s_t.dim() == 0:
        return s_t.expand(k)
    if s_t.dim() != 1 or s_t.shape[0] != k:
        raise ValueError(f"{name} must be a scalar or a [K] tensor with K={k}, got shape {tuple(s_t.shape)}")
    return s_t


def _rand(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """``n`` uniform floats in ``[0, 1)`` (float64), drawn on the generator's device, returned on ``device``."""
    gen_dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_dev, dtype=torch.float64).to(device)


def _randint_below(high: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Independent uniform integers ``u[k]`` in ``[0, high[k])`` for a long tensor ``high [K]`` (all ``>= 1``)."""
    u = _rand(high.shape[0], generator, high.device)
    return torch.minimum((u * high.double()).long(), high - 1)


def mask_rank(mask_scales: Tensor, mask_areas: Optional[Tensor] = None) -> Tensor:
    """Rank of every mask in the "finest first" order used by :func:`active_labels`.

    Args:
        mask_scales: ``float [M]``; non-finite scales sort last.
        mask_areas: optional ``[M]`` pixel areas (tie-break: smaller area first); ``None`` = no area tie-break.

    Returns:
        ``long [M]``: ``rank[m]`` is the position of mask ``m`` when masks are sorted by (scale ascending, area
        ascending, index ascending). Ranks are a permutation of ``0..M-1``.
    """
    m = mask_scales.shape[0]
    dev = mask_scales.device
    order = torch.arange(m, device=dev)
    keys = [torch.where(torch.isfinite(mask_scales), mask_scales.double(), torch.full_like(mask_scales.double(), float("inf")))]
    if mask_areas is not None:
        keys.insert(0, mask_areas.to(dev).double())  # applied first, so it is the secondary key
    # lexicographic order by successive stable sorts, least significant key first (index order is the start)
    for key in keys:
        _, perm = torch.sort(key[order], stable=True)
        order = order[perm]
    rank = torch.empty(m, dtype=torch.long, device=dev)
    rank[order] = torch.arange(m, device=dev)
    return rank


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


# ----------------------------------------------------------------------------------------------------------------
# the training path: per-pixel mask sets (pepeseg3d_ns.priors.pixel_masks.PixelMasks)
# ----------------------------------------------------------------------------------------------------------------
#
# The functions above take a dense ``member [P, M]`` (from ``masks [M, H, W]``) and are the reference definitions.
# The functions below compute the same quantities from a PixelMasks, gathering only what the sampled pixels need,
# with static shapes and no host-device synchronisation: nothing reads a tensor back, the number of sampled pixels
# is fixed, and a sampled pixel that is not covered (possible only when the image holds fewer covered pixels than
# the step samples) is flagged instead of removed. Their inputs come from the model's own draws and are not
# re-validated (validation of the priors happens once, when they are loaded).

PAIR_CHUNK = 65536
"""Pairs evaluated at once by :func:`set_pair_targets` (bounds its ``[chunk, W]`` temporaries)."""


def _usable(pm, mask_scales: Tensor) -> Tensor:
    """bool [M]: masks with a finite scale and at least one pixel."""
    return torch.isfinite(mask_scales) & (pm.mask_area > 0)


def _set_terms(pm, mask_scales: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per set ``c``: ``count [C]`` (usable masks), ``area_sum [C]`` float64 (their summed areas) and
    ``inv_area_sum [C]`` float64 (sum of ``1 / area``). ``O(C L)``."""
    c = pm.num_sets
    if pm.num_masks == 0:
        z = torch.zeros(c, dtype=torch.float64, device=pm.device)
        return torch.zeros(c, dtype=torch.long, device=pm.device), z, z.clone()
    m = pm.num_masks
    usable = _usable(pm, mask_scales)
    zero = torch.zeros(1, dtype=torch.float64, device=pm.device)
    area = pm.mask_area.double()
    area_of = torch.cat([torch.where(usable, area, 0.0), zero])  # entry m: padding
    inv_of = torch.cat([torch.where(usable, 1.0 / area.clamp(min=1), 0.0), zero])
    ok_of = torch.cat([usable, torch.zeros(1, dtype=torch.bool, device=pm.device)])
    idx = torch.remainder(pm.set_masks.long(), m + 1).view(-1)  # -1 -> m
    shape = pm.set_masks.shape
    count = ok_of.index_select(0, idx).view(shape).sum(1)
    return (count, area_of.index_select(0, idx).view(shape).sum(1), inv_of.index_select(0, idx).view(shape).sum(1))


def _omega_from_raw(raw: Tensor, covered: Tensor, w_min: float, w_max: float) -> Tensor:
    """``omega`` of eq. 7 from ``raw = 1 / mean area`` (float64 [K]), min-max over ``covered [K]``; 0 elsewhere
    (float32). The same arithmetic as :func:`pixel_weights`, without reading anything back."""
    inf = torch.full_like(raw, float("inf"))
    lo = torch.where(covered, raw, inf).min() if raw.numel() else raw.new_zeros(())
    hi = torch.where(covered, raw, -inf).max() if raw.numel() else raw.new_zeros(())
    flat = (hi - lo) <= 1e-12 * hi
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    w = torch.where(flat, torch.full_like(raw, float(w_min)), w_min + (w_max - w_min) * (raw - lo) / span)
    return torch.where(covered, w, torch.zeros_like(w)).float()


def set_draw_weights(pm, mask_scales: Tensor, mode: str = "mask", mix: float = 0.5,
                     w_min: float = 1.0, w_max: float = 10.0, region: str = "covered") -> Tensor:
    """float64 ``[C]``: the draw weight of *each pixel* of set ``c``.

    ``region="covered"``: only pixels in a usable mask (known scale) can be drawn (0 elsewhere):

    * ``"uniform"``: 1 on covered pixels;
    * ``"omega"``: ``omega(p)`` of eq. 7 normalised over the image's covered pixels (what :func:`pixel_weights`
      gives on all covered pixels; each set has at least one pixel, so min and max over sets are those over pixels);
    * ``"mask"``: the probability of :func:`mask_balanced_probabilities`,
      ``(1 - mix) / n_covered + mix / M' * sum_{m in c} 1 / area(m)``.

    ``region="image"``: every pixel can be drawn (the paper's draw, whose Lm then uses the covered ones only):
    ``"uniform"`` is 1 everywhere, ``"omega"`` gives uncovered pixels ``w_min``, ``"mask"`` spreads its uniform
    share ``1 - mix`` over all ``H W`` pixels.

    Args:
        pm: :class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`; mask_scales: ``float [M]`` (NaN = unknown).
    """
    if region not in ("covered", "image"):
        raise ValueError(f"pixel region must be 'covered' or 'image', got {region!r}")
    count, area_sum, inv = _set_terms(pm, mask_scales)
    covered = count > 0
    everywhere = region == "image"
    if mode == "uniform":
        return torch.ones_like(covered, dtype=torch.float64) if everywhere else covered.double()
    if mode == "omega":
        raw = count.double() / area_sum.clamp(min=1)
        w = _omega_from_raw(raw, covered, w_min, w_max).double()
        return torch.where(covered, w, torch.full_like(w, float(w_min))) if everywhere else w
    if mode == "mask":
        n_base = (pm.set_area.sum() if everywhere else (covered.long() * pm.set_area).sum()).clamp(min=1).double()
        m_used = _usable(pm, mask_scales).sum().clamp(min=1).double()
        w = (1.0 - mix) / n_base + mix * torch.where(covered, inv, torch.zeros_like(inv)) / m_used
        return w if everywhere else torch.where(covered, w, torch.zeros_like(w))
    raise ValueError(f"pixel sampling mode must be 'uniform', 'omega' or 'mask', got {mode!r}")


def draw_pixels(pm, set_weights: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """``n`` distinct pixels drawn without replacement with probability proportional to their set's weight.

    The draw is the exponential race ("Gumbel top-k"): every pixel gets the key ``w(p) / E_p`` with
    ``E_p ~ Exp(1)`` i.i.d., and the ``n`` largest keys win. That is the law of drawing pixels one after another
    with probability proportional to ``w`` among those not yet drawn (what ``torch.multinomial(w, n,
    replacement=False)`` does). ``O(H W)`` elementwise work and a top-k, no ``O(H W M)``; numbers come from
    ``generator`` on its device (the model's).

    Args:
        pm: PixelMasks; set_weights: ``float [C]`` from :func:`set_draw_weights` (>= 0).
        n: pixels to draw (at most ``H * W``).

    Returns:
        ``pix``: long ``[n]`` flat indices ``y * W + x``; ``ok``: bool ``[n]``, False for a pixel of weight 0 (drawn
        only when fewer than ``n`` pixels have a positive weight; such a pixel is to be ignored).
    """
    hw = pm.height * pm.width
    n = min(int(n), hw)
    w = set_weights.float().index_select(0, pm.pixel_set)  # [H*W]
    gen_dev = generator.device if generator is not None else w.device
    # log U = -E with U uniform in [0, 1) (E ~ Exp(1), never 0; U = 0 gives -inf, key 0): the n smallest
    # w / log U = -w / E are the n largest w / E. (Uniforms and a log: 4x cheaper than exponential_ on CPU.)
    log_u = torch.rand(hw, generator=generator, device=gen_dev).log_().to(w.device)
    pix = torch.topk(w / log_u, n, largest=False, sorted=False).indices
    return pix, w.index_select(0, pix) > 0


def covered_pixels(pm, mask_scales: Tensor) -> Tensor:
    """bool ``[H, W]``: pixels inside at least one usable mask (``O(H W)``; the centroid refresh needs it)."""
    count, _, _ = _set_terms(pm, mask_scales)
    return (count > 0).index_select(0, pm.pixel_set).reshape(pm.height, pm.width)


class SampledMasks(NamedTuple):
    """The usable masks of ``P`` sampled pixels as bit sets in "finest first" order.

    Masks are numbered by their rank (:func:`mask_rank` with the areas as tie-break: scale ascending, then area,
    then index; unknown scales last). Since ranks sort by scale first, the masks with ``s_M < s`` are exactly the
    ranks below ``r(s) = #{m : s_m < s}``, for every ``s``; so "a common mask finer than ``s``" is one AND against
    the low ``r(s)`` bits, and the active label is the pixel's first rank at or above ``r(s)`` (the finest mask with
    ``s_M >= s``), read from a table. Per pair that is one gather per label and ``W = ceil(M / 64)`` word
    operations for the common finer mask, whatever the masks' depth.

    ``sets [P]`` each pixel's set id, ``bits [P, W]`` int64 (bit ``r % 64`` of word ``r // 64`` = the mask of rank
    ``r`` holds the pixel and is usable), ``next_rank [P, M + 1]`` int32 (column ``M - t``: the pixel's smallest
    usable rank ``>= t``, ``M`` = none), ``count [P]`` usable masks, ``area_sum [P]`` float64 their summed areas, ``by_rank [M]`` mask id
    of each rank, ``rank_scales [M]`` their scales in rank order (+inf = unknown).
    """

    sets: Tensor
    bits: Tensor
    next_rank: Tensor
    count: Tensor
    area_sum: Tensor
    by_rank: Tensor
    rank_scales: Tensor


def gather_sampled(pm, pix: Tensor, mask_scales: Tensor) -> SampledMasks:
    """:class:`SampledMasks` of the pixels ``pix [P]`` (flat indices). ``O(P (L + M) + M log M)`` (the
    ``next_rank`` table is ``P x (M + 1)``: 4.8 MB for 4000 pixels and 300 masks)."""
    sets = pm.sets_of(pix)
    p, m = sets.shape[0], pm.num_masks
    dev = sets.device
    nw = max(1, (m + 63) // 64)
    if m == 0:
        z = torch.zeros(p, dtype=torch.long, device=dev)
        return SampledMasks(sets, torch.zeros(p, 1, dtype=torch.long, device=dev),
                            torch.zeros(p, 1, dtype=torch.int32, device=dev), z,
                            torch.zeros(p, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                            torch.zeros(0, dtype=mask_scales.dtype, device=dev))
    rank = mask_rank(mask_scales, pm.mask_area)
    by_rank = torch.empty_like(rank)
    by_rank[rank] = torch.arange(m, device=dev)
    finite = torch.isfinite(mask_scales)
    rank_scales = torch.where(finite, mask_scales, torch.full_like(mask_scales, float("inf"))).index_select(0, by_rank)
    # per mask id (entry m = padding): its rank when usable, else m; its area when usable, else 0
    usable = _usable(pm, mask_scales)
    pad = torch.full((1,), m, dtype=torch.long, device=dev)
    rank_of = torch.cat([torch.where(usable, rank, pad), pad])
    area_of = torch.cat([torch.where(usable, pm.mask_area.double(), 0.0), torch.zeros(1, dtype=torch.float64, device=dev)])
    raw = pm.set_masks.index_select(0, sets).long()  # [P, L] ascending ids, -1 padded
    L = raw.shape[1]
    idx = torch.remainder(raw, m + 1).view(-1)  # -1 -> m
    pos = rank_of.index_select(0, idx).view(p, L)  # ranks of the usable masks, m elsewhere
    ok = pos < m
    word = torch.where(ok, pos >> 6, nw)  # column nw: discarded
    bits = torch.zeros(p, nw + 1, dtype=torch.long, device=dev).scatter_add_(
        1, word, torch.bitwise_left_shift(ok.long(), pos & 63))[:, :nw]  # distinct bits: + is |
    # column u holds rank m - u: a running minimum along the columns is then the smallest rank >= m - u
    table = torch.full((p, m + 1), m, dtype=torch.int32, device=dev).scatter_(1, m - pos, pos.to(torch.int32))
    next_rank = torch.cummin(table, dim=1).values
    area_sum = area_of.index_select(0, idx).view(p, L).sum(1)
    return SampledMasks(sets, bits.contiguous(), next_rank, ok.sum(1), area_sum, by_rank,
                        rank_scales.contiguous())


def set_pixel_weights(sm: SampledMasks, w_min: float = 1.0, w_max: float = 10.0) -> Tensor:
    """``omega(p)`` (eq. 7) of the sampled pixels, min-max normalised over the covered ones: float32 ``[P]``, equal
    to :func:`pixel_weights` on the same pixels (0 for an uncovered one)."""
    covered = sm.count > 0
    raw = sm.count.double() / sm.area_sum.clamp(min=1)
    return _omega_from_raw(raw, covered, w_min, w_max)


def _rank_split(r: Tensor) -> Tuple[Tensor, Tensor]:
    """Word ``q = r // 64`` and in-word mask ``below = 2^(r % 64) - 1`` of ranks ``r [K]``."""
    return r >> 6, torch.bitwise_left_shift(torch.ones_like(r), r & 63) - 1


def _any_below(words: Tensor, q: Tensor, below: Tensor) -> Tensor:
    """bool ``[K]``: whether ``words [K, W]`` has a set bit below the ranks given as :func:`_rank_split`."""
    hit = torch.zeros(words.shape[0], dtype=torch.bool, device=words.device)
    for w in range(words.shape[1]):
        x = words[:, w]
        hit |= torch.where(q > w, x, torch.where(q == w, x & below, torch.zeros_like(x))) != 0
    return hit


def set_pair_targets(pm, sm: SampledMasks, i: Tensor, j: Tensor, s: Tensor) -> Dict[str, Tensor]:
    """:func:`pair_targets` of pairs ``(i[k], j[k])`` of sampled pixels (rows of ``sm``) at scales ``s [K]``: dict
    of ``positive``, ``hard``, ``valid`` (bool [K]), ``label_i``, ``label_j`` (long [K]). With ``r = r(s)`` (see
    :class:`SampledMasks`): labels are each pixel's first rank ``>= r`` (``next_rank``), ``finer`` is a common bit
    ``< r``; ``O(K W)`` word operations, in chunks of :data:`PAIR_CHUNK` pairs."""
    covered = sm.count > 0
    dev = sm.bits.device
    out: Dict[str, list] = {k: [] for k in ("positive", "hard", "valid", "label_i", "label_j")}
    m = sm.by_rank.numel()
    by_rank = torch.cat([sm.by_rank, torch.full((1,), -1, dtype=sm.by_rank.dtype, device=dev)])  # entry m: no label
    for a in range(0, i.shape[0], PAIR_CHUNK):
        ii, jj, ss = i[a : a + PAIR_CHUNK], j[a : a + PAIR_CHUNK], s[a : a + PAIR_CHUNK]
        valid = covered.index_select(0, ii) & covered.index_select(0, jj) & (ii != jj)
        r = torch.searchsorted(sm.rank_scales, ss.to(sm.rank_scales.dtype).contiguous())  # [k] in [0, M]
        flat = sm.next_rank.view(-1)
        ri = flat.index_select(0, ii * (m + 1) + (m - r)).long()
        rj = flat.index_select(0, jj * (m + 1) + (m - r)).long()
        same = (ri == rj) & (ri < m)
        q, below = _rank_split(r)
        finer = _any_below(sm.bits.index_select(0, ii) & sm.bits.index_select(0, jj), q, below)
        out["positive"].append(valid & (same | finer))
        out["hard"].append(valid & same & ~finer)
        out["valid"].append(valid)
        out["label_i"].append(by_rank.index_select(0, ri))  # rank m: the appended -1
        out["label_j"].append(by_rank.index_select(0, rj))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long if k.startswith("label") else torch.bool,
                                                   device=dev) for k, v in out.items()}


def set_sample_pairs(
    pm,
    sm: SampledMasks,
    n_pairs: int,
    hard_fraction: float = 0.25,
    candidate_factor: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
    """:func:`sample_pairs` on sampled pixels described by ``sm``, returning the pairs' targets too.

    Same procedure and the same random numbers in the same order (so, with equal generator states and at least two
    covered pixels, the same pairs as :func:`sample_pairs` on the dense membership of the same pixels), but with
    static shapes: the covered rows are the first ``v`` entries of a stable sort instead of a ``nonzero``, ``v`` stays
    a tensor, and when ``v < 2`` the ``n_pairs`` pairs come out flagged invalid instead of the output being empty.

    Returns:
        ``i, j`` long ``[n_pairs]``, ``s`` float32 ``[n_pairs]``, and :func:`set_pair_targets` of those pairs.
    """
    dev = sm.bits.device
    covered = sm.count > 0
    v = covered.sum()
    covered_rows = torch.argsort((~covered).to(torch.int8), stable=True)  # covered rows first, ascending
    n_pairs, candidate_factor = int(n_pairs), int(candidate_factor)
    n_c = candidate_factor * n_pairs
    ia = _randint_below(v.expand(n_c), generator).clamp(min=0)
    off = 1 + _randint_below((v - 1).expand(n_c), generator)
    ja = (ia + off) % v.clamp(min=1)
    s_c = _rand(n_c, generator, dev).float()
    i_c, j_c = covered_rows.index_select(0, ia), covered_rows.index_select(0, ja)
    n_h = int(round(hard_fraction * n_pairs))
    n_u = n_pairs - n_h
    t_c = set_pair_targets(pm, sm, i_c, j_c, s_c)
    keep = torch.arange(n_u, device=dev)
    if n_h > 0:
        hard = t_c["hard"][n_u:]
        # hard candidates first, in draw order, then the others in draw order (a stable partition, by cumsums)
        n_hard = hard.sum()
        place = torch.where(hard, torch.cumsum(hard, 0) - 1, n_hard + torch.cumsum(~hard, 0) - 1)
        order = torch.empty_like(place).scatter_(0, place, torch.arange(place.shape[0], device=dev))
        keep = torch.cat([keep, n_u + order[:n_h]])
    keep = keep.index_select(0, torch.argsort(_rand(n_pairs, generator, dev)))
    pick = lambda t: t.index_select(0, keep)  # noqa: E731
    return pick(i_c), pick(j_c), pick(s_c), {k: pick(val) for k, val in t_c.items()}


# ----------------------------------------------------------------------------------------------------------------
# perception pairs (paper eq. 4)
# ----------------------------------------------------------------------------------------------------------------


def radius_px(s: ScaleLike, H: int, W: int, r_min: float = 2.0, r_max_frac: float = 0.25) -> Tensor:
    """Window radius in pixels for scale ``s``: ``r(s) = max(1, round(r_min + clamp(s, 0, 1) * (r_max - r_min)))``.

    ``r_max = max(r_min, r_max_frac * min(H, W))`` (defaults: ``r_min = 2`` px, ``r_max = 0.25 * min(H, W)``).
    The window of radius ``r`` around ``p`` is the square ``[y - r, y + r] x [x - r, x + r]`` (clamped to the image).

    Args:
        s: float or ``float [P]``. H, W: image size.

    Returns:
        ``long`` tensor of ``s``'s shape (0-d for a float).
    """
    if H < 1 or W < 1:
        raise ValueError(f"image size must be positive, got H={H}, W={W}")
    s_t = torch.as_tensor(s, dtype=torch.float64)
    r_max = max(float(r_min), r_max_frac * min(H, W))
    r = torch.round(r_min + s_t.clamp(0.0, 1.0) * (r_max - r_min))
    return r.clamp(min=1).long()


class PerceptionPairs(NamedTuple):
    """Output of :func:`perception_pairs` (all ``[P]``, on the input's device)."""

    q: Tensor  # long [P]: flat index (y * W + x) of the partner pixel of each anchor
    sim: Tensor  # bool [P]: similar in depth AND colour -> pulled together
    dis: Tensor  # bool [P]: dissimilar in depth AND colour -> pushed apart
    radius: Tensor  # long [P]: window radius r(s_p) used
    theta_d: Tensor  # float [P]: depth threshold (normalised depth units)
    theta_c: Tensor  # float [P]: colour threshold (RGB Euclidean units)


def _perception_integral(d: Tensor, image: Tensor) -> Tensor:
    """Zero-padded 2-D integral images (float64) ``[6, H + 1, W + 1]`` of ``D, D^2, R, G, B, R^2 + G^2 + B^2`` for
    ``d [H, W]`` (float64) and ``image [H, W, 3]``: the channels are written into one buffer and summed in place
    (one ``6 x (H+1) x (W+1)`` allocation, no full-image temporaries). Channels first: torch's CPU cumsum is several
    times faster along contiguous dimensions."""
    h, w = d.shape
    out = torch.empty(6, h + 1, w + 1, dtype=torch.float64, device=d.device)
    out[:, 0, :] = 0
    out[:, :, 0] = 0
    body = out[:, 1:, 1:]
    body[0].copy_(d)
    torch.mul(body[0], body[0], out=body[1])
    body[2:5].copy_(image.permute(2, 0, 1))
    torch.mul(body[2], body[2], out=body[5])
    body[5].addcmul_(body[3], body[3]).addcmul_(body[4], body[4])
    out.cumsum_(2)
    out.cumsum_(1)
    return out


def _box_sum(integral: Tensor, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    """Sums over the inclusive boxes ``[y0, y1] x [x0, x1]`` (each ``long [P]``) of ``integral [C, H+1, W+1]`` -> ``[P, C]``."""
    c, hp, wp = integral.shape
    flat = integral.reshape(c, hp * wp)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.index_select(1, yy * wp + xx)

    return (at(y1 + 1, x1 + 1) - at(y0, x1 + 1) - at(y1 + 1, x0) + at(y0, x0)).t()


def normalise_depth(depth_prior: Tensor) -> Tensor:
    """Per-image normalisation of a relative depth prior: ``(D - median(D)) / mean|D - median(D)|`` (float64).

    A constant map becomes all zeros. ``depth_prior`` must be finite, any shape.
    """
    med = depth_prior.flatten().median().double()  # an element of the map: the same value in any precision
    d = depth_prior.to(torch.float64, copy=True).sub_(med)
    mad = d.abs().mean()
    return d.div_(torch.where(mad > 0, mad, torch.ones_like(mad)))  # mad = 0 only for a constant map: d is 0 there


def perception_pairs(
    image: Tensor,
    depth_prior: Tensor,
    pix: Tensor,
    s: ScaleLike,
    radius_fn: Optional[Callable[[Tensor, int, int], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    k_depth: float = 1.0,
    k_colour: float = 1.0,
    eps: float = 1e-6,
) -> PerceptionPairs:
    """Window partners and adaptive similar/dissimilar decisions for the perception loss ``Lp`` (paper eq. 4).

    For each anchor ``p = pix[k]`` with scale ``s_k``:

    * ``r = radius_fn(s, H, W)[k]`` (default :func:`radius_px`); the window ``N(p)`` is the square of radius ``r``
      around ``p`` clamped to the image; the partner ``q`` is uniform over ``N(p) \\ {p}``.
    * Depth: ``D`` = :func:`normalise_depth` of the prior (median 0, mean absolute deviation 1 per image, so the
      thresholds are scale-free). With the window statistics ``mu_D(p) = mean_N(p) D``,
      ``sigma_D(p) = sqrt(mean_N(p) (D - mu_D)^2)``, the threshold is ``theta_d(p) = k_depth * sigma_D(p)``.
    * Colour: ``sigma_C(p) = sqrt(sum_c var_N(p)(I_c))`` (square root of the summed per-channel variance over the
      window = RMS Euclidean distance of the window's colours to their mean), ``theta_c(p) = k_colour * sigma_C(p)``.
    * ``sim = |D(p) - D(q)| < theta_d and ||I(p) - I(q)||_2 < theta_c``;
      ``dis = |D(p) - D(q)| > theta_d and ||I(p) - I(q)||_2 > theta_c``; pairs in neither are ignored by ``Lp``.
    * A cue whose window std is ``<= eps`` (a flat window) counts as *similar* for that cue (and never
      dissimilar): inside a flat window every partner has the anchor's value.

    For a window holding two flat regions with values ``a, b`` and fractions ``f, 1 - f``,
    ``sigma = |a - b| sqrt(f (1 - f)) <= |a - b| / 2``: with ``k = 1`` partners across the border are always
    dissimilar and partners on the anchor's side always similar. Window means/variances come from integral images
    (``O(HW)`` per call, independent of ``r``), evaluated at the anchors only.

    Args:
        image: ``float [H, W, 3]`` in ``[0, 1]``.
        depth_prior: ``float [H, W]`` (or ``[H, W, 1]``) relative inverse depth, finite.
        pix: ``long [P]`` anchor flat indices ``y * W + x``.
        s: float or ``float [P]`` anchor scales in ``[0, 1]``.
        radius_fn: ``(s [P], H, W) -> long [P]``; default :func:`radius_px`. Radii are clamped to ``>= 1``.
        generator: optional ``torch.Generator`` for the partner draw.
        k_depth, k_colour: threshold multipliers ``k`` (paper-style adaptive thresholds ``theta = k * sigma``).
        eps: std below which a window is flat.

    Returns:
        :class:`PerceptionPairs` ``(q, sim, dis, radius, theta_d, theta_c)``.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {tuple(getattr(image, 'shape', ()))}")
    h, w, _ = image.shape
    if h * w < 2:
        raise ValueError(f"image must have at least 2 pixels, got {h}x{w}")
    if not isinstance(depth_prior, Tensor):
        raise ValueError("depth_prior must be a tensor")
    if depth_prior.dim() == 3 and depth_prior.shape[-1] == 1:
        depth_prior = depth_prior[..., 0]
    if depth_prior.shape != (h, w):
        raise ValueError(f"depth_prior must be [H, W] = [{h}, {w}], got shape {tuple(depth_prior.shape)}")
    if not bool(torch.isfinite(depth_prior).all()):
        raise ValueError("depth_prior has non-finite values")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image has non-finite values")
    dev = image.device
    pix = _check_index(pix, h * w, "pix").to(dev)
    s_t = _broadcast_scale(s, pix.shape[0], dev)
    return _perception_pairs(image, depth_prior.to(dev), pix, s_t, radius_fn, generator, k_depth, k_colour, eps)


def _perception_pairs(image: Tensor, depth_prior: Tensor, pix: Tensor, s_t: Tensor,
                      radius_fn: Optional[Callable[[Tensor, int, int], Tensor]] = None,
                      generator: Optional[torch.Generator] = None, k_depth: float = 1.0, k_colour: float = 1.0,
                      eps: float = 1e-6) -> PerceptionPairs:
    """:func:`perception_pairs` without validation (no read-back): ``image [H, W, 3]`` and ``depth_prior [H, W]``
    finite and on one device, ``pix`` long ``[P]`` in range, ``s_t [P]`` finite (the training step's own inputs)."""
    h, w, _ = image.shape
    dev = image.device
    n = pix.shape[0]
    fn = radius_fn if radius_fn is not None else radius_px
    r = torch.as_tensor(fn(s_t, h, w), device=dev).long().reshape(-1)
    if r.shape[0] != n:
        raise ValueError(f"radius_fn returned {r.shape[0]} radii for {n} anchors")
    r = r.clamp(min=1)

    py, px = pix // w, pix % w
    y0, y1 = (py - r).clamp(min=0), (py + r).clamp(max=h - 1)
    x0, x1 = (px - r).clamp(min=0), (px + r).clamp(max=w - 1)
    ww = x1 - x0 + 1
    area = (y1 - y0 + 1) * ww  # >= 2 since r >= 1 and the image has >= 2 pixels
    # partner: uniform over the window minus the anchor
    u = _randint_below(area - 1, generator)
    a_idx = (py - y0) * ww + (px - x0)
    u = u + (u >= a_idx).long()
    qy, qx = y0 + u // ww, x0 + u % ww
    q = qy * w + qx

    d = normalise_depth(depth_prior.to(dev))
    sums = _box_sum(_perception_integral(d, image), y0, y1, x0, x1) / area[:, None].double()  # window means [P, 6]
    var_d = (sums[:, 1] - sums[:, 0] ** 2).clamp(min=0)
    var_c = (sums[:, 5] - (sums[:, 2:5] ** 2).sum(1)).clamp(min=0)  # summed channel variances
    sig_d, sig_c = var_d.sqrt(), var_c.sqrt()
    theta_d, theta_c = k_depth * sig_d, k_colour * sig_c

    dd = (d[py, px] - d[qy, qx]).abs()
    dc = (image[py, px].double() - image[qy, qx].double()).norm(dim=-1)
    flat_d, flat_c = sig_d <= eps, sig_c <= eps
    sim_d = flat_d | (dd < theta_d)
    sim_c = flat_c | (dc < theta_c)
    dis_d = ~flat_d & (dd > theta_d)
    dis_c = ~flat_c & (dc > theta_c)
    return PerceptionPairs(
        q=q,
        sim=sim_d & sim_c,
        dis=dis_d & dis_c,
        radius=r,
        theta_d=theta_d.float(),
        theta_c=theta_c.float(),
    )
