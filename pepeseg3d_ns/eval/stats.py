"""Confidence intervals for benchmark means: a two-way (seeds x objects) percentile bootstrap.

The suite's score of a row at one hierarchy level is the mean of a ``[S, O]`` matrix: one value per training seed
``s`` and ground-truth object ``o`` (an object's IoU averaged over its evaluation views). Both the seeds and the
objects are samples (of training randomness and of the objects a scene could hold), so each bootstrap replicate
draws ``S`` seeds and ``O`` objects with replacement, independently, and takes the mean of the selected cells.
A difference between two rows is bootstrapped the same way from the matrix of differences on the same seeds and
objects (a paired interval), which is much narrower than the two rows' intervals side by side.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "bootstrap_interval"]


class Interval(NamedTuple):
    """A mean with its bootstrap interval ``[lo, hi]``; ``n_seeds`` / ``n_objects`` count the rows / columns with at
    least one finite value."""

    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_objects: int


def bootstrap_interval(scores, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> Interval:
    """Mean of ``scores`` and its percentile bootstrap interval over seeds and objects.

    Args:
        scores: ``[S, O]`` array (seeds x objects; a 1-D ``[O]`` array is one seed). NaN marks a missing cell
            (an object not evaluated for that seed); it is left out of every mean.
        confidence: coverage of the interval, e.g. 0.95 -> the 2.5 % and 97.5 % quantiles of the replicates.
        n_boot: bootstrap replicates.
        seed: seed of the resampling (the interval is deterministic for a fixed seed).

    Returns:
        :class:`Interval`: ``mean`` is the mean over all finite cells; ``lo`` / ``hi`` the quantiles of the
        replicate means, each replicate drawing ``S`` seed rows and ``O`` object columns with replacement
        (replicates that select only missing cells are dropped). One seed row: only objects are resampled;
        one object column: only seeds.

    Raises:
        ValueError: not 1-D / 2-D, no finite value, or ``confidence`` outside (0, 1).
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"scores must be a non-empty [S, O] array, got shape {np.shape(scores)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("scores hold no finite value")
    keep_s, keep_o = finite.any(1), finite.any(0)
    x, finite = x[keep_s][:, keep_o], finite[keep_s][:, keep_o]
    n_s, n_o = x.shape
    x0 = np.where(finite, x, 0.0)
    w = finite.astype(np.float64)
    mean = float(x0.sum() / w.sum())
    rng = np.random.default_rng(seed)
    # multiplicity of each seed / object in each replicate: [B, S] and [B, O]
    cs = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=n_boot).astype(np.float64)
    co = rng.multinomial(n_o, np.full(n_o, 1.0 / n_o), size=n_boot).astype(np.float64)
    num = np.einsum("bs,so,bo->b", cs, x0, co)
    den = np.einsum("bs,so,bo->b", cs, w, co)
    reps = num[den > 0] / den[den > 0]
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return Interval(mean, float(lo), float(hi), int(n_s), int(n_o))
