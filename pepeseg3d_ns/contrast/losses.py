"""Losses of pepe-contrast (PePESeg3D stage 2). Pure functions of tensors (torch only).

All features are compared by cosine similarity ``cos(a, b) = <a, b> / (max(|a|, eps) * max(|b|, eps))``.
The features passed in are already *gated*: for a pixel ``p`` at scale ``s`` the model passes
``psi(s) * F[p]`` (``F`` the rendered ungated feature map, ``psi`` the scale gate), so each pair may use its own
scale.

Terms (paper equation numbers):

* ``Lm``  :func:`scale_contrastive_loss` (eq. 3/8): weighted ``(1 - cos)`` on positives, ``relu(cos - margin)`` on
  negatives, normalised by the summed weight of valid pairs; weight ``omega(p) * omega(q)``.
* ``Lp``  :func:`perception_loss` (eq. 4): mean ``(1 - cos)`` over similar window pairs + mean ``relu(cos)`` over
  dissimilar ones.
* ``Lc``  :func:`centroid_pull_loss` (eq. 5): pixels close (cos > tau) to their nearest global centroid are pulled
  to it; evaluated once for the coarse set ``U`` (features at ``s = 1``) and once for the fine set ``L``
  (features at ``s = 0``).
* ``L2D`` :func:`norm_regulariser`: ``mean((|F(p)| - 1)^2)`` on the ungated rendered features.

The model combines them as::

    Lcont = lam_m * Lm + lam_p * Lp + lam_cU * Lc(U) + lam_cL * Lc(L) + L2D
    (lam_m, lam_p, lam_cU, lam_cL) = (1.0, 0.2, 0.3, 0.1)     # Lc terms only after 7k steps

Every loss returns a 0-d tensor; when it has nothing to average it returns ``0`` that is still attached to the
autograd graph of its feature inputs (``features.sum() * 0``), so ``backward()`` always works. Means over a
selection are computed as masked sums over a clamped count, never by indexing with a bool mask or branching on a
tensor's value, so no loss reads anything back from the device (a training step stays free of host-device
synchronisation; :mod:`pepeseg3d_ns.readback`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_EPS = 1e-6


def cosine(a: Tensor, b: Tensor, eps: float = _EPS) -> Tensor:
    """Row-wise cosine similarity of ``a [K, D]`` and ``b [K, D]`` -> ``[K]``.

    Norms are clamped at ``eps`` (1e-6): a zero vector has cosine 0 with everything, and the gradient stays finite
    (its size is at most ``|b| / (max(|a|, eps) |b|)``, i.e. ``1 / eps`` for a vanishing feature).
    """
    na = a.norm(dim=-1).clamp(min=eps)
    nb = b.norm(dim=-1).clamp(min=eps)
    return (a * b).sum(-1) / (na * nb)


def _check_pair_feats(fi: Tensor, fj: Tensor, names=("fi", "fj")) -> None:
    if not isinstance(fi, Tensor) or not isinstance(fj, Tensor) or fi.dim() != 2 or fi.shape != fj.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must be [K, D] tensors of the same shape, got "
            f"{tuple(getattr(fi, 'shape', ()))} and {tuple(getattr(fj, 'shape', ()))}"
        )
    if fi.shape[1] == 0:
        raise ValueError(f"{names[0]}/{names[1]} have feature dimension D = 0")


def _check_flag(x: Tensor, k: int, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.shape != (k,):
        raise ValueError(f"{name} must be a [K] tensor with K={k}, got shape {tuple(getattr(x, 'shape', ()))}")
    return x.bool()


def _masked_mean(x: Tensor, sel: Tensor) -> Tensor:
    """Mean of ``x [K]`` over ``sel [K]`` (bool); 0 when nothing is selected (no read-back)."""
    return torch.where(sel, x, torch.zeros_like(x)).sum() / sel.sum().clamp(min=1).to(x.dtype)


def _zero(*feats: Tensor) -> Tensor:
    out = feats[0].sum() * 0.0
    for f in feats[1:]:
        out = out + f.sum() * 0.0
    return out


def scale_contrastive_loss(
    fi: Tensor,
    fj: Tensor,
    positive: Tensor,
    weight: Optional[Tensor],
    valid: Tensor,
    margin: float = 0.0,
    check: bool = True,
    normalise: str = "weight",
) -> Tensor:
    """Scale-aware contrastive loss ``Lm`` (paper eq. 3/8).

    ``Lm = sum_k v_k w_k l_k / Z`` with ``v_k = valid[k]``, ``w_k = weight[k]``,
    ``l_k = 1 - cos(fi_k, fj_k)`` if ``positive[k]`` else ``relu(cos(fi_k, fj_k) - margin)``, and
    ``Z = sum_k v_k w_k`` (``normalise="weight"``: a weighted average) or ``Z = sum_k v_k`` (``"mean"``: eq. 8's
    mean over the valid pairs of the weighted terms). Minimum 0: positives identical in direction, negatives at
    cosine ``<= margin``.

    Args:
        fi, fj: ``float [K, D]`` gated features of the two pixels of each pair (``psi(s_k) * F[p]``).
        positive: ``bool [K]`` pair targets (:func:`pepeseg3d_ns.contrast.sampling.set_pair_targets`).
        weight: ``float [K]`` non-negative pair weights (``omega(p) * omega(q)``); ``None`` = all ones.
        valid: ``bool [K]``; invalid pairs contribute nothing (also not to the normaliser).
        margin: cosine below which negatives are not pushed further (paper: 0).
        check: verify that the weights of valid pairs are finite and >= 0 (reads a flag back from the device; the
            training step passes False, its weights are built >= 0).
        normalise: ``"weight"`` or ``"mean"`` (see above).

    Returns:
        0-d tensor; ``0`` (graph kept) when no valid pair has positive weight or ``K = 0``.
    """
    _check_pair_feats(fi, fj)
    if normalise not in ("weight", "mean"):
        raise ValueError(f"normalise must be 'weight' or 'mean', got {normalise!r}")
    k = fi.shape[0]
    positive = _check_flag(positive, k, "positive").to(fi.device)
    valid = _check_flag(valid, k, "valid").to(fi.device)
    if weight is None:
        weight = torch.ones(k, dtype=fi.dtype, device=fi.device)
    elif not isinstance(weight, Tensor) or weight.shape != (k,):
        raise ValueError(f"weight must be a [K] tensor with K={k}, got shape {tuple(getattr(weight, 'shape', ()))}")
    weight = weight.to(device=fi.device, dtype=fi.dtype).detach()
    if check and k and not bool(torch.all((torch.isfinite(weight) & (weight >= 0)) | ~valid)):
        raise ValueError("weight must be finite and >= 0 on valid pairs")
    if k == 0:
        return _zero(fi, fj)
    w = torch.where(valid, weight, torch.zeros_like(weight))
    total = w.sum() if normalise == "weight" else valid.sum().to(w.dtype)
    c = cosine(fi, fj)
    per = torch.where(positive, 1.0 - c, torch.relu(c - margin))
    per = torch.where(valid, per, torch.zeros_like(per))  # keeps NaN of invalid rows out
    # no valid weight: every term is 0, and so is the quotient (graph kept)
    return (w * per).sum() / torch.where(total > 0, total, torch.ones_like(total))


def perception_loss(fp: Tensor, fq: Tensor, sim: Tensor, dis: Tensor) -> Tensor:
    """Perception contrastive loss ``Lp`` (paper eq. 4).

    ``Lp = mean_{k: sim_k} (1 - cos(fp_k, fq_k)) + mean_{k: dis_k} relu(cos(fp_k, fq_k))``; each mean is 0 when
    its set is empty. Pairs with neither flag are ignored.

    Args:
        fp, fq: ``float [P, D]`` gated features of anchors and their window partners (same scale per pair).
        sim, dis: ``bool [P]`` from :func:`pepeseg3d_ns.contrast.perception.perception_pairs`.

    Returns:
        0-d tensor (graph kept when both sets are empty).
    """
    _check_pair_feats(fp, fq, ("fp", "fq"))
    k = fp.shape[0]
    sim = _check_flag(sim, k, "sim").to(fp.device)
    dis = _check_flag(dis, k, "dis").to(fp.device)
    if k == 0:
        return _zero(fp, fq)
    c = cosine(fp, fq)
    return _masked_mean(1.0 - c, sim) + _masked_mean(torch.relu(c), dis)


def norm_regulariser(F: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Feature-norm regulariser ``L2D = mean_p (||F(p)||_2 - 1)^2``.

    Args:
        F: ``float [P, D]`` (ungated) rendered features of the sampled pixels.
        valid: optional ``bool [P]``: the mean runs over these rows only (0 when none).

    Returns:
        0-d tensor; ``0`` (graph kept) when ``P = 0``.
    """
    if not isinstance(F, Tensor) or F.dim() != 2 or F.shape[1] == 0:
        raise ValueError(f"F must be a [P, D] tensor with D > 0, got shape {tuple(getattr(F, 'shape', ()))}")
    if F.shape[0] == 0:
        return _zero(F)
    per = (F.norm(dim=-1) - 1.0) ** 2
    if valid is None:
        return per.mean()
    return _masked_mean(per, _check_flag(valid, F.shape[0], "valid").to(F.device))


def centroid_pull_loss(feats: Tensor, centroids: Tensor, tau: float = 0.9, valid: Optional[Tensor] = None,
                       normalise: str = "confident") -> Tensor:
    """View-consistent centroid loss ``Lc`` for one centroid set (paper eq. 5).

    With ``c*(p) = argmax_c cos(feats_p, c)`` over the (detached) centroids and ``Q = {p : cos(feats_p, c*(p)) > tau}``:
    ``Lc = sum_{p in Q} (1 - cos(feats_p, c*(p))) / Z`` with ``Z = |Q|`` (``normalise="confident"``: the mean over
    the confident pixels) or ``Z`` = the number of (valid) pixels (``"all"``: eq. 5's mean over all pixels, in
    which the unconfident ones count 0); 0 when there is no centroid or ``Q`` is empty. Pixels with cosine
    ``<= tau`` to every centroid contribute nothing (they are not confidently part of any cluster).
    No gradient reaches ``centroids``.

    Args:
        feats: ``float [P, D]`` gated features (``s = 1`` for the coarse set ``U``, ``s = 0`` for the fine set ``L``).
        centroids: ``float [C, D]`` (need not be unit norm; only directions matter). ``C`` may be 0.
        tau: confidence threshold on the cosine.
        valid: optional ``bool [P]``: only these rows can be in ``Q`` (and, with ``"all"``, count in ``Z``).
        normalise: ``"confident"`` or ``"all"`` (see above).

    Returns:
        0-d tensor (graph to ``feats`` kept when 0).
    """
    if normalise not in ("confident", "all"):
        raise ValueError(f"normalise must be 'confident' or 'all', got {normalise!r}")
    if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[1] == 0:
        raise ValueError(f"feats must be a [P, D] tensor with D > 0, got shape {tuple(getattr(feats, 'shape', ()))}")
    if not isinstance(centroids, Tensor) or centroids.dim() != 2 or centroids.shape[1] != feats.shape[1]:
        raise ValueError(
            f"centroids must be [C, D] with D={feats.shape[1]} (the features' dimension), got shape "
            f"{tuple(getattr(centroids, 'shape', ()))}"
        )
    if centroids.shape[0] == 0 or feats.shape[0] == 0:
        return _zero(feats)
    c = centroids.detach().to(device=feats.device, dtype=feats.dtype)
    c = c / c.norm(dim=-1, keepdim=True).clamp(min=_EPS)
    f = feats / feats.norm(dim=-1, keepdim=True).clamp(min=_EPS)
    best = (f @ c.t()).max(dim=1).values  # [P]
    q = best > tau
    rows = None
    if valid is not None:
        rows = _check_flag(valid, feats.shape[0], "valid").to(q.device)
        q = q & rows
    if normalise == "confident":
        return _masked_mean(1.0 - best, q)
    n = rows.sum().to(best.dtype) if rows is not None else torch.tensor(float(best.shape[0]), dtype=best.dtype,
                                                                         device=best.device)
    return torch.where(q, 1.0 - best, torch.zeros_like(best)).sum() / n.clamp(min=1.0)
