"""Features as a picture: a deterministic PCA colouring of rendered features, the viewer's ``feature_pca`` output
(:mod:`pepeseg3d_ns.viewer.controls`). A low module (torch only): the viewer imports it without importing the
model that imports the viewer's panel."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def feature_pca(features: Tensor, basis: Optional[Tensor] = None) -> Tensor:
    """Colour image ``[H, W, 3]`` in [0, 1] from features ``[H, W, D]``: the L2-normalised features projected on
    their first three principal components (or on ``basis [D, 3]``), each channel min-max stretched.
    Deterministic (eigen-decomposition of the D x D covariance)."""
    H, W, D = features.shape
    x = torch.nn.functional.normalize(features.reshape(-1, D).double(), dim=-1)
    if basis is None:
        centred = x - x.mean(0, keepdim=True)
        _, vecs = torch.linalg.eigh(centred.T @ centred)
        basis = vecs[:, -3:].flip(1) if D >= 3 else torch.nn.functional.pad(vecs, (0, 3 - D))
        basis = basis * torch.sign(basis.sum(0, keepdim=True) + 1e-12)  # fix each component's sign
    y = x @ basis.double()
    lo, hi = y.min(0).values, y.max(0).values
    return ((y - lo) / (hi - lo).clamp(min=1e-8)).reshape(H, W, 3).float()
