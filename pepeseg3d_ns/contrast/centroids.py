"""Global centroid bank behind the view-consistent centroid loss ``Lc`` (paper eq. 5). Torch only.

Every refresh (paper: every 200 steps after 7k) the model clusters rendered features (HDBSCAN, at ``s = 1`` for
the coarse set ``U`` and ``s = 0`` for the fine set ``L``) and hands the cluster centres to
:meth:`CentroidBank.update`; one call = one refresh. Each candidate ``x`` (L2-normalised) is compared with the bank:

* if its most similar centroid ``c`` has ``cos(x, c) > delta`` (paper ``delta = 0.9``), it is merged by EMA:
  ``c <- normalise(momentum * c + (1 - momentum) * x)``, and ``c`` counts as *matched* in this refresh;
* otherwise it is appended as a new centroid (matched in this refresh too).

The bound and the stale rule (not in the paper, which lets the sets grow):

* ``max_size``: at most this many centroids. When the bank is full, a new candidate replaces the
  least-recently-matched centroid (smallest ``last_update``, ties: lowest index).
* ``stale_after = K``: at the end of an update, every centroid that no candidate has matched in the last ``K``
  refreshes (``step - last_update >= K``) is dropped: a centre of features that training has since moved away from
  would otherwise stay in the set for good.

Candidates are processed one after another in the given order, so a candidate can merge into a centroid
appended earlier in the same call (two near-identical candidates from one view become one centroid).

Checkpointing (variable size): the bank is a plain object, not an ``nn.Module``. The model keeps a registered
buffer per set, e.g. ``self.register_buffer("centroids_U", torch.zeros(0, D))``, assigns
``self.centroids_U = bank.to_tensor()`` after each :meth:`update`, and, because the saved buffer's ``C`` differs
from the fresh ``[0, D]`` one, resizes it before the copy in an ``_load_from_state_dict`` override::

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "centroids_U"
        if key in state_dict:
            self.centroids_U = torch.empty_like(state_dict[key], device=self.centroids_U.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bank_U.load_tensor(self.centroids_U)

Only the centroids travel (``to_tensor`` / ``load_tensor`` / ``from_tensor``); the recency counters restart at 0.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .losses import centroid_pull_loss

_EPS = 1e-8


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=_EPS)


class CentroidBank:
    """A global set of unit-norm feature centroids ``[C, D]`` merged across views by EMA.

    Args:
        dim: feature dimension ``D`` (32 in pepe-contrast).
        max_size: optional cap on ``C`` (see the module docstring); ``None`` = unbounded.
        stale_after: drop a centroid no candidate has matched in this many updates; ``None`` = never.
        device: where the centroids live (candidates are moved there).
        dtype: floating dtype of the centroids (default float32).

    Attributes:
        centroids: ``[C, D]`` unit-norm rows (``C`` starts at 0).
        last_update: ``long [C]``: value of :attr:`step` when each centroid was last matched (added or merged into).
        step: number of :meth:`update` calls so far.
    """

    def __init__(
        self,
        dim: int,
        max_size: Optional[int] = None,
        stale_after: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        if max_size is not None and (int(max_size) != max_size or max_size < 1):
            raise ValueError(f"max_size must be None or a positive integer, got {max_size}")
        if stale_after is not None and (int(stale_after) != stale_after or stale_after < 1):
            raise ValueError(f"stale_after must be None or a positive integer, got {stale_after}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.dim = int(dim)
        self.max_size = None if max_size is None else int(max_size)
        self.stale_after = None if stale_after is None else int(stale_after)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.centroids = torch.zeros(0, self.dim, dtype=dtype, device=dev)
        self.last_update = torch.zeros(0, dtype=torch.long, device=dev)
        self.step = 0

    # -- basic properties ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.centroids.device

    def to(self, device: Union[str, torch.device]) -> "CentroidBank":
        """Move the bank to ``device`` (in place); returns ``self``."""
        self.centroids = self.centroids.to(device)
        self.last_update = self.last_update.to(device)
        return self

    def __repr__(self) -> str:
        return (f"CentroidBank(C={len(self)}, D={self.dim}, max_size={self.max_size}, stale_after={self.stale_after}, "
                f"device={self.device})")

    # -- update ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, candidates: Tensor, delta: float = 0.9, momentum: float = 0.9) -> Dict[str, int]:
        """One refresh: merge candidate centroids into the bank (EMA) or append them, then drop stale ones.

        Args:
            candidates: ``float [C', D]`` cluster centres (any norm; detached, moved to the bank's device).
                Rows that are non-finite or zero are skipped.
            delta: merge threshold on the cosine to the most similar centroid (merge when ``cos > delta``).
            momentum: EMA weight of the existing centroid, in ``[0, 1]``.

        Returns:
            ``{"merged": int, "added": int, "dropped": int, "stale": int, "skipped": int}`` counts for this call
            (``dropped``: replaced because the bank was full; ``stale``: dropped by the ``stale_after`` rule).
        """
        if not isinstance(candidates, Tensor) or candidates.dim() != 2 or candidates.shape[1] != self.dim:
            raise ValueError(
                f"candidates must be [C', {self.dim}], got shape {tuple(getattr(candidates, 'shape', ()))}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not -1.0 <= delta <= 1.0:
            raise ValueError(f"delta is a cosine threshold in [-1, 1], got {delta}")
        self.step += 1
        cand = candidates.detach().to(device=self.device, dtype=self.centroids.dtype)
        norms = cand.norm(dim=-1)
        ok = torch.isfinite(cand).all(-1) & (norms > _EPS)
        stats = {"merged": 0, "added": 0, "dropped": 0, "stale": 0, "skipped": int((~ok).sum())}
        cand = _normalise(cand[ok])
        for x in cand:
            if len(self) > 0:
                cos = self.centroids @ x
                best = int(torch.argmax(cos))
                if float(cos[best]) > delta:
                    self.centroids[best] = _normalise(momentum * self.centroids[best] + (1.0 - momentum) * x)
                    self.last_update[best] = self.step
                    stats["merged"] += 1
                    continue
            if self.max_size is not None and len(self) >= self.max_size:
                drop = int(torch.argmin(self.last_update))  # first minimum = lowest index among the oldest
                keep = torch.arange(len(self), device=self.device) != drop
                self.centroids = self.centroids[keep]
                self.last_update = self.last_update[keep]
                stats["dropped"] += 1
            self.centroids = torch.cat([self.centroids, x[None]], dim=0)
            self.last_update = torch.cat(
                [self.last_update, torch.tensor([self.step], dtype=torch.long, device=self.device)]
            )
            stats["added"] += 1
        if self.stale_after is not None and len(self):
            keep = (self.step - self.last_update) < self.stale_after
            stats["stale"] = int((~keep).sum())
            self.centroids, self.last_update = self.centroids[keep], self.last_update[keep]
        return stats

    # -- checkpoint round trip -------------------------------------------------------------------------------------

    def to_tensor(self) -> Tensor:
        """The centroids as a fresh ``[C, D]`` tensor (detached copy), e.g. to store in a model buffer."""
        return self.centroids.detach().clone()

    @torch.no_grad()
    def load_tensor(self, tensor: Tensor) -> None:
        """Replace the centroids by ``tensor [C, D]`` (rows re-normalised; kept on the bank's device and dtype).

        Recency counters are reset (every centroid gets ``last_update = step``). Rows beyond ``max_size`` are cut
        (the last ``max_size`` kept, with a warning).
        """
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[1] != self.dim:
            raise ValueError(f"centroid tensor must be [C, {self.dim}], got shape {tuple(getattr(tensor, 'shape', ()))}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError("centroid tensor has non-finite values")
        t = tensor.detach().to(device=self.device, dtype=self.centroids.dtype)
        if self.max_size is not None and t.shape[0] > self.max_size:
            warnings.warn(f"centroid tensor has {t.shape[0]} rows, more than max_size={self.max_size}: keeping the "
                          f"last {self.max_size} (the most recently added)")
            t = t[-self.max_size :]
        self.centroids = _normalise(t).clone()
        self.last_update = torch.full((t.shape[0],), self.step, dtype=torch.long, device=self.device)

    @classmethod
    def from_tensor(
        cls, tensor: Tensor, max_size: Optional[int] = None, device: Union[str, torch.device, None] = None,
        stale_after: Optional[int] = None,
    ) -> "CentroidBank":
        """A new bank holding ``tensor [C, D]`` (on ``device``, default the tensor's device; dtype kept)."""
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[1] == 0:
            raise ValueError(f"centroid tensor must be [C, D] with D > 0, got shape {tuple(getattr(tensor, 'shape', ()))}")
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        bank = cls(tensor.shape[1], max_size=max_size, stale_after=stale_after, device=device or tensor.device,
                   dtype=dtype)
        bank.load_tensor(tensor)
        return bank

    # -- loss ------------------------------------------------------------------------------------------------------

    def loss(self, feats: Tensor, tau: float = 0.9) -> Tensor:
        """``Lc`` of ``feats [P, D]`` against this bank: :func:`pepeseg3d_ns.contrast.losses.centroid_pull_loss`."""
        return centroid_pull_loss(feats, self.centroids, tau)
