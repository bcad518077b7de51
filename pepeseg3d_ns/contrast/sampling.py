"""Pixel and pair sampling of a pepe-contrast training step (PePESeg3D stage 2). Pure functions of tensors (torch only).

Per training step the model has one view ``H x W`` with its per-pixel mask sets
(:class:`~pepeseg3d_ns.priors.pixel_masks.PixelMasks`: for each pixel the ids of the SAM masks that contain it),
their scales ``mask_scales: float [M]`` (``s_M`` in ``[0, 1]``; NaN/inf = unknown, such a mask is treated as absent
everywhere) and draws ``P`` pixels ``pix: long [P]`` (flat indices ``y * W + x`` into ``H * W``). Nothing here
touches a dense ``[M, H, W]`` or reads a tensor back from the device:

* ``set_draw_weights`` + ``draw_pixels`` -- the pixel draw laws ("uniform", "omega", "mask"), without replacement,
  by an exponential race over the pixels (``O(H W)``);
* ``gather_sampled`` -- the sampled pixels' usable masks as bit sets in finest-first order (``O(P L)``);
* ``set_pixel_weights`` -- ``omega(p)`` (paper eq. 7);
* ``set_pair_targets``, ``set_sample_pairs`` -- G(i, j, s) (eq. 6) and the pair draw with uniform scales and
  over-sampled hard pairs (``O(K M / 64)``);
* ``covered_pixels`` -- the covered map (for the centroid refresh);
* ``mask_rank`` -- the finest-first order of masks shared with the reference definitions.

The same quantities on dense masks, the reference definitions the tests compare against, are in
:mod:`pepeseg3d_ns.contrast.dense_reference`; the perception pairs (eq. 4) in :mod:`pepeseg3d_ns.contrast.perception`.

Indices ``i, j, rows`` always index the *sampled* pixels, not the image.

Randomness: every random draw takes an optional ``torch.Generator``; numbers are drawn on the generator's device
(CPU when none is given: then on the device of the inputs) and moved to the inputs' device, so results are
reproducible given the generator's seed.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

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
# the training path: per-pixel mask sets (pepeseg3d_ns.priors.pixel_masks.PixelMasks)
# ----------------------------------------------------------------------------------------------------------------
#
# The reference definitions on a dense ``member [P, M]`` (from ``masks [M, H, W]``) live in
# pepeseg3d_ns.contrast.dense_reference. The functions below compute the same quantities from a PixelMasks, gathering only what the sampled pixels need,
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
