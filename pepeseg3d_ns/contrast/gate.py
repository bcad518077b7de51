"""Scale gate ``psi(s)`` of pepe-contrast (PePESeg3D stage 2).

The scale-aware feature of a Gaussian (or a rendered pixel) at scale ``s in [0, 1]`` is ``psi(s) * f`` (elementwise):
``psi`` is a two-layer MLP ``1 -> hidden -> dim`` with a ReLU between and a sigmoid at the output, so every channel
of ``f`` is switched on or off smoothly as a function of the scale.

Initialisations (``init``; the architecture is the same for all three, and all of it trains):

* ``"band"`` (pepe-contrast's default, deterministic): half the hidden units are rising hinges ``relu(s - k_j)``,
  half falling ones ``relu(k_j - s)``, knots evenly over ``[0, 1]``; output channel ``c`` has bias 4 and weight
  -40 on the rising hinge at ``t_c + 0.1`` and on the falling hinge at ``t_c - 0.1``, with centres
  ``t_c = (c + 0.5) / D``. Channel ``c`` is open (about 0.98) for scales near ``t_c`` and shut (< 0.05) 0.3 away:
  every scale starts with its own ~12 channels, so the features of different scales do not compete for the same
  channels. Measured on the tabletop demo: with the "hinge" start the trained gate used nearly the same channels at
  every scale, and a fruit on a tray stayed at cosine 0.8-0.9 to the tray at every scale (docs/contrast.md).
* ``"nested"`` (deterministic): channel ``c`` open below its own knot ``t_c`` in ``(0, 1.1]``, so finer scales
  open more channels and coarse channels are open everywhere.
* ``"hinge"`` (random given ``torch.manual_seed``): hinges ``relu(+-(s - t_j))`` with random signs and a small
  random output layer (std ``0.5 / sqrt(hidden)``), zero bias: close to 0.5 everywhere (roughly ``[0.35, 0.65]``),
  mildly different across scales and channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ScaleGate"]


class ScaleGate(nn.Module):
    """``psi(s)``: scale ``s`` -> per-channel gate in ``(0, 1)``.

    Args:
        dim: number of gated feature channels ``D`` (the feature dimension, 32 in the paper).
        hidden: width of the hidden layer.

    ``forward(s)`` takes ``s`` of shape ``[K]`` or ``[K, 1]`` (or a 0-d tensor / Python float, treated as ``[1]``)
    and returns ``[K, D]`` in ``(0, 1)``. ``s`` is cast to the gate's dtype and moved to its device. Scales are
    expected in ``[0, 1]``; values outside are accepted (the MLP extrapolates linearly before the sigmoid).
    """

    def __init__(self, dim: int = 32, hidden: int = 32, init: str = "hinge", band_half_width: float = 0.1) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if init not in ("hinge", "nested", "band"):
            raise ValueError(f"init must be 'hinge', 'nested' or 'band', got {init!r}")
        if init == "band" and hidden < 2:
            raise ValueError(f"init='band' needs hidden >= 2 (rising and falling hinges), got {hidden}")
        if not 0.0 < band_half_width <= 1.0:
            raise ValueError(f"band_half_width must be in (0, 1], got {band_half_width}")
        self.init = init
        self.band_half_width = float(band_half_width)
        self.dim = dim
        self.hidden = hidden
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``init="hinge"``: hinges at evenly spread knots with random orientation, small random output layer;
        ``"nested"``: each channel open below its own knot; ``"band"``: each channel open in a band of scales around
        its own centre, ``band_half_width`` wide (see the module doc)."""
        if self.init == "nested":
            self._reset_nested()
            return
        if self.init == "band":
            self._reset_band(self.band_half_width)
            return
        h = self.hidden
        knots = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # [h] in (0, 1)
        sign = torch.where(torch.rand(h) < 0.5, -1.0, 1.0)
        slope = sign * (1.0 + torch.rand(h))  # |slope| in [1, 2)
        self.fc1.weight.copy_(slope[:, None])
        self.fc1.bias.copy_(-slope * knots)
        self.fc2.weight.normal_(0.0, 0.5 / math.sqrt(h))
        self.fc2.bias.zero_()

    @torch.no_grad()
    def _reset_nested(self, open_logit: float = 4.0, slope: float = 30.0, top: float = 1.1) -> None:
        h, d = self.hidden, self.dim
        knots = (torch.arange(h, dtype=torch.float32) + 1.0) / h * top  # hidden unit j = relu(s - t_j), t in (0, top]
        self.fc1.weight.fill_(1.0)
        self.fc1.bias.copy_(-knots)
        unit = torch.div(torch.arange(d) * h, d, rounding_mode="floor")  # channel c -> hidden unit of its knot
        self.fc2.weight.zero_()
        self.fc2.weight[torch.arange(d), unit] = -slope
        self.fc2.bias.fill_(open_logit)

    @torch.no_grad()
    def _reset_band(self, half_width: float, open_logit: float = 4.0) -> None:
        slope = 4.0 / half_width  # 40 at the default half width 0.1: shut (< 0.05) about 2 half widths past an edge
        h, d = self.hidden, self.dim
        n_up = h // 2  # hidden units 0..n_up-1: relu(s - k_j); n_up..h-1: relu(k_j - s)
        n_dn = h - n_up
        k_up = torch.linspace(0.0, 1.0, n_up) if n_up > 1 else torch.tensor([0.5])
        k_dn = torch.linspace(0.0, 1.0, n_dn) if n_dn > 1 else torch.tensor([0.5])
        self.fc1.weight[:n_up, 0] = 1.0
        self.fc1.bias[:n_up] = -k_up
        self.fc1.weight[n_up:, 0] = -1.0
        self.fc1.bias[n_up:] = k_dn
        self.fc2.weight.zero_()
        self.fc2.bias.fill_(open_logit)
        for c, t in enumerate(self.channel_centres().tolist()):
            hi, lo = t + half_width, t - half_width
            if hi < 1.0:  # shut above hi (rising hinge at the nearest knot)
                self.fc2.weight[c, int(torch.argmin((k_up - hi).abs()))] = -slope
            if lo > 0.0:  # shut below lo
                self.fc2.weight[c, n_up + int(torch.argmin((k_dn - lo).abs()))] = -slope

    def channel_centres(self) -> Tensor:
        """``[D]`` the scale at the middle of each channel's open band under ``init="band"`` (before training)."""
        return (torch.arange(self.dim, dtype=torch.float32) + 0.5) / self.dim

    def channel_knots(self, top: float = 1.1) -> Tensor:
        """``[D]`` the scale below which each channel is open under ``init="nested"`` (before training)."""
        unit = torch.div(torch.arange(self.dim) * self.hidden, self.dim, rounding_mode="floor")
        return (unit.float() + 1.0) / self.hidden * top

    def forward(self, s: Tensor) -> Tensor:  # noqa: D102 (documented on the class)
        w = self.fc1.weight
        s = torch.as_tensor(s)
        if not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"scales s must be a float tensor, got dtype {s.dtype}")
        if s.dim() == 0:
            s = s.reshape(1)
        if s.dim() == 2 and s.shape[1] == 1:
            s = s[:, 0]
        if s.dim() != 1:
            raise ValueError(f"scales s must have shape [K] or [K, 1], got {tuple(s.shape)}")
        s = s.to(device=w.device, dtype=w.dtype)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(s[:, None]))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, init={self.init}"
