"""pepe-contrast global centroid bank: EMA merge, append, cap, tensor round trip, loss."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.contrast.centroids import CentroidBank


def _dir(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_near_identical_candidates_merge_distant_ones_are_kept():
    bank = CentroidBank(3)
    a = _dir(1.0, 0.0, 0.0)
    a2 = _dir(1.0, 0.05, 0.0)  # cos(a, a2) ~ 0.9988 > 0.9
    b = _dir(0.0, 1.0, 0.0)  # cos(a, b) = 0
    stats = bank.update(torch.stack([a, 2.0 * a2, b]), delta=0.9, momentum=0.9)
    assert stats["merged"] == 1 and stats["added"] == 2 and len(bank) == 2
    expected = 0.9 * a + 0.1 * a2
    expected = expected / expected.norm()
    assert torch.allclose(bank.centroids[0], expected, atol=1e-6)
    assert torch.allclose(bank.centroids[1], b)
    assert torch.allclose(bank.centroids.norm(dim=1), torch.ones(2))
    # a later view: near b merges into b, a new direction is appended
    c = _dir(0.0, 0.0, 1.0)
    stats = bank.update(torch.stack([_dir(0.02, 1.0, 0.0), c]))
    assert stats == {"merged": 1, "added": 1, "dropped": 0, "skipped": 0} and len(bank) == 3
    assert bank.last_update.tolist() == [1, 2, 2]


def test_merge_threshold_is_strict_and_bad_rows_are_skipped():
    bank = CentroidBank(2)
    bank.update(_dir(1.0, 0.0)[None])
    at_delta = torch.tensor([[math.cos(math.acos(0.9) + 1e-3), math.sin(math.acos(0.9) + 1e-3)]])  # cos just < 0.9
    assert bank.update(at_delta, delta=0.9)["added"] == 1
    stats = bank.update(torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]))
    assert stats["skipped"] == 2 and len(bank) == 2
    with pytest.raises(ValueError, match="candidates"):
        bank.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="momentum"):
        bank.update(torch.ones(1, 2), momentum=1.5)


def test_max_size_drops_least_recently_updated():
    bank = CentroidBank(3, max_size=2)
    e = torch.eye(3)
    bank.update(e[0:1])  # step 1
    bank.update(e[1:2])  # step 2
    bank.update(e[0:1])  # step 3: merges into e0, which becomes the most recent
    stats = bank.update(e[2:3])  # step 4: full -> drop e1 (last updated at step 2)
    assert stats == {"merged": 0, "added": 1, "dropped": 1, "skipped": 0}
    assert torch.allclose(bank.centroids, torch.stack([e[0], e[2]]))
    assert bank.last_update.tolist() == [3, 4]


def test_tensor_round_trip_and_loss():
    bank = CentroidBank(4)
    bank.update(torch.tensor([[1.0, 0, 0, 0], [0, 0, 3.0, 0]]))
    t = bank.to_tensor()
    assert t.shape == (2, 4)
    t.zero_()  # a copy: the bank is untouched
    assert len(bank) == 2 and bank.centroids.abs().sum() > 0
    other = CentroidBank.from_tensor(bank.to_tensor())
    assert torch.equal(other.centroids, bank.centroids) and other.dim == 4
    empty = CentroidBank(4)
    empty.load_tensor(torch.zeros(0, 4))
    assert len(empty) == 0
    with pytest.raises(ValueError, match="centroid tensor"):
        bank.load_tensor(torch.zeros(2, 3))
    # loss: a pixel at a centroid costs 0, one at cos 0.95 costs 0.05, one at cos 0.5 is ignored
    feats = torch.tensor(
        [[2.0, 0, 0, 0], [0.95, 0, 0, math.sqrt(1 - 0.95**2)], [0.5, 0, 0, math.sqrt(0.75)]], requires_grad=True
    )
    loss = bank.loss(feats, tau=0.9)
    assert loss.item() == pytest.approx(0.05 / 2, abs=1e-6)
    loss.backward()
    assert feats.grad[1].abs().sum() > 0 and torch.equal(feats.grad[2], torch.zeros(4))
    assert not bank.centroids.requires_grad
    assert empty.loss(feats).item() == 0.0


def test_update_ignores_autograd_of_candidates():
    bank = CentroidBank(2)
    cand = torch.tensor([[1.0, 0.0]], requires_grad=True)
    bank.update(cand * 2)
    assert not bank.centroids.requires_grad and bank.centroids.grad_fn is None


def test_documented_checkpoint_pattern_round_trips_a_variable_size_buffer():
    """The buffer-resize recipe of the module docstring, on a minimal nn.Module."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bank_U = CentroidBank(3)
            self.register_buffer("centroids_U", torch.zeros(0, 3))

        def refresh(self, cand):
            self.bank_U.update(cand)
            self.centroids_U = self.bank_U.to_tensor()

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            key = prefix + "centroids_U"
            if key in state_dict:
                self.centroids_U = torch.empty_like(state_dict[key], device=self.centroids_U.device)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            self.bank_U.load_tensor(self.centroids_U)

    src = Holder()
    src.refresh(torch.eye(3)[:2])
    dst = Holder()
    dst.load_state_dict(src.state_dict())
    assert dst.centroids_U.shape == (2, 3) and torch.allclose(dst.bank_U.centroids, torch.eye(3)[:2])
