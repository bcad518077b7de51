"""Scale gate psi(s): shapes, range, init, determinism, gradient flow, and learning a scale-dependent target."""

import pytest
import torch

from pepeseg3d_ns.contrast.gate import ScaleGate


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: on a busy 2-core machine, torch's intra-op threads make them 10x slower (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shapes_and_range():
    torch.manual_seed(0)
    gate = ScaleGate()
    s = torch.linspace(0, 1, 11)
    out = gate(s)
    assert out.shape == (11, 32)
    assert torch.equal(gate(s[:, None]), out)
    assert gate(torch.tensor(0.3)).shape == (1, 32)
    assert gate(0.3).shape == (1, 32)
    assert ((out > 0) & (out < 1)).all()
    assert ScaleGate(dim=8, hidden=4)(s).shape == (11, 8)


def test_init_near_half_and_scale_dependent():
    torch.manual_seed(0)
    out = ScaleGate()(torch.linspace(0, 1, 101))
    assert (out - 0.5).abs().max() < 0.2  # ~0.5 everywhere
    # ... but not constant over scales: gates at s=0 and s=1 differ clearly in some channels
    assert (out[0] - out[-1]).abs().max() > 0.03
    assert out.std(dim=0).mean() > 0.005


def test_nested_init_opens_channels_below_their_knots():
    """``init="nested"``: channel c is open (> 0.9) below its knot and shut (< 0.05) 0.25 above it; the number of
    open channels falls with the scale, and the coarsest channels stay open at s = 1."""
    gate = ScaleGate(init="nested")
    knots = gate.channel_knots()
    assert knots.shape == (32,) and torch.all(knots[1:] >= knots[:-1]) and knots.max() > 1.0
    s = torch.linspace(0, 1, 101)
    with torch.no_grad():
        out = gate(s)
    below = s[:, None] < knots[None, :] - 0.02
    above = s[:, None] > knots[None, :] + 0.25
    assert (out[below] > 0.9).all() and (out[above] < 0.05).all()
    n_open = (out > 0.5).sum(1)
    assert torch.all(n_open[1:] <= n_open[:-1]) and n_open[0] == 32 and 2 <= n_open[-1] <= 8
    # deterministic (no random draw) and still trainable everywhere it is open
    assert torch.equal(ScaleGate(init="nested")(s), out)
    ScaleGate(init="nested")(torch.rand(64) * 0.5).sum().backward()
    with pytest.raises(ValueError, match="init"):
        ScaleGate(init="random")


def test_band_init_gives_each_scale_its_own_channels():
    """``init="band"``: channel c is open (> 0.7) within 0.05 of its centre and shut (< 0.05) 0.3 away from it, so
    the channels open at s = 0 and at s = 1 are disjoint and every scale has a handful of its own."""
    gate = ScaleGate(init="band")
    centres = gate.channel_centres()
    s = torch.linspace(0, 1, 101)
    with torch.no_grad():
        out = gate(s)
    dist = (s[:, None] - centres[None, :]).abs()
    assert (out[dist < 0.05] > 0.7).all() and (out[dist > 0.3] < 0.05).all()
    n_open = (out > 0.5).sum(1)
    assert n_open.min() >= 5 and n_open.max() <= 16
    assert not ((out[0] > 0.5) & (out[-1] > 0.5)).any()
    with pytest.raises(ValueError, match="hidden >= 2"):
        ScaleGate(hidden=1, init="band")
    with pytest.raises(ValueError, match="band_half_width"):
        ScaleGate(init="band", band_half_width=0.0)


def test_band_half_width_sets_how_many_channels_share_a_scale():
    """Halving the band's half width (with hidden 64, one knot per band edge) halves the channels open per scale."""
    s = torch.linspace(0.2, 0.8, 31)
    with torch.no_grad():
        wide = (ScaleGate(hidden=64, init="band", band_half_width=0.1)(s) > 0.5).sum(1).float().mean()
        narrow = (ScaleGate(hidden=64, init="band", band_half_width=0.05)(s) > 0.5).sum(1).float().mean()
    assert 10 <= wide <= 16 and 5 <= narrow <= 8 and narrow < 0.65 * wide


def test_deterministic_given_seed():
    torch.manual_seed(7)
    a = ScaleGate()
    torch.manual_seed(7)
    b = ScaleGate()
    s = torch.rand(5)
    assert torch.equal(a(s), b(s))
    torch.manual_seed(8)
    assert not torch.equal(ScaleGate()(s), a(s))


def test_gradient_flows_to_all_parameters():
    torch.manual_seed(0)
    gate = ScaleGate()
    gate(torch.rand(64)).square().sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learns_scale_dependent_target():
    """Channels 0-15 on for s < 0.5 only, channels 16-31 on for s >= 0.5 only."""
    torch.manual_seed(0)
    gate = ScaleGate()
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)  # the first optimizer of a process costs ~3.6 s here (imports)
    s = torch.linspace(0, 1, 201)
    target = torch.zeros(201, 32)
    target[s < 0.5, :16] = 1
    target[s >= 0.5, 16:] = 1
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(gate(s), target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = gate(s)
    away = (s - 0.5).abs() > 0.05
    assert torch.equal((out[away] > 0.5).float(), target[away])
    assert (out[away] - target[away]).abs().max() < 0.2


def test_bad_input():
    gate = ScaleGate()
    with pytest.raises(ValueError, match=r"\[K\] or \[K, 1\]"):
        gate(torch.rand(3, 2))
    with pytest.raises(ValueError, match="dtype"):
        gate(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim"):
        ScaleGate(dim=0)
    with pytest.raises(ValueError, match="hidden"):
        ScaleGate(hidden=0)
