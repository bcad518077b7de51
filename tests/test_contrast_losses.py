"""pepe-contrast losses on hand-made features whose values are known."""

from __future__ import annotations

import math

import pytest
import torch

from pepeseg3d_ns.contrast.losses import (
    centroid_pull_loss,
    cosine,
    norm_regulariser,
    perception_loss,
    scale_contrastive_loss,
)


def _unit(angle_deg: float) -> torch.Tensor:
    """A 2-D unit vector at the given angle (cos to [1, 0] is cos(angle))."""
    a = math.radians(angle_deg)
    return torch.tensor([math.cos(a), math.sin(a)])


def _two_groups():
    """6 pixels, group 0 = {0, 1, 2} along e0 (scaled differently), group 1 = {3, 4, 5} along e1; all pairs."""
    feats = torch.zeros(6, 4)
    feats[:3, 0] = torch.tensor([1.0, 2.0, 0.5])
    feats[3:, 1] = torch.tensor([1.0, 3.0, 0.7])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    i, j = i.flatten(), j.flatten()
    keep = i != j
    i, j = i[keep], j[keep]
    return feats, group, i, j


def test_separated_groups_reach_minimum_and_a_swap_raises_it():
    feats, group, i, j = _two_groups()
    positive = group[i] == group[j]
    valid = torch.ones_like(positive)
    w = torch.ones(i.shape[0])
    assert scale_contrastive_loss(feats[i], feats[j], positive, w, valid).item() == pytest.approx(0.0, abs=1e-7)
    swapped = feats.clone()
    swapped[0] = feats[3]  # pixel 0 (group 0) now looks like group 1
    worse = scale_contrastive_loss(swapped[i], swapped[j], positive, w, valid).item()
    # pixel 0's 4 positive pairs (both directions with 1, 2) now have cos 0 -> loss 1 each;
    # its 6 negative pairs with 3, 4, 5 now have cos 1 -> loss 1 each: 10 of 30 pairs at 1
    assert worse == pytest.approx(10 / 30, abs=1e-6)


def test_weights_margin_and_validity_by_hand():
    e0 = _unit(0)
    fi = torch.stack([e0, e0, e0, e0])
    fj = torch.stack([_unit(60), _unit(math.degrees(math.acos(0.6))), _unit(math.degrees(math.acos(-0.3))), _unit(180)])
    positive = torch.tensor([True, False, False, True])
    weight = torch.tensor([1.0, 2.0, 4.0, 100.0])
    valid = torch.tensor([True, True, True, False])
    # pair losses: 1 - 0.5 = 0.5 (pos), relu(0.6) = 0.6 (neg), relu(-0.3) = 0 (neg); pair 3 is invalid
    expected = (1 * 0.5 + 2 * 0.6 + 4 * 0.0) / (1 + 2 + 4)
    got = scale_contrastive_loss(fi, fj, positive, weight, valid)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # margin 0.5: negatives only pushed down to cosine 0.5 -> relu(0.6 - 0.5) = 0.1
    got_m = scale_contrastive_loss(fi, fj, positive, weight, valid, margin=0.5)
    assert got_m.item() == pytest.approx((0.5 + 2 * 0.1) / 7, abs=1e-6)
    # equal weights give the plain mean over valid pairs; None = all ones
    assert scale_contrastive_loss(fi, fj, positive, None, valid).item() == pytest.approx((0.5 + 0.6) / 3, abs=1e-6)
    # weight on an invalid pair never matters; the valid weights change the value
    assert scale_contrastive_loss(fi, fj, positive, weight * torch.tensor([1, 1, 1, 0.0]), valid).item() == pytest.approx(expected, abs=1e-6)
    assert scale_contrastive_loss(fi, fj, positive, torch.tensor([4.0, 1, 1, 1]), valid).item() == pytest.approx((4 * 0.5 + 0.6) / 6, abs=1e-6)


def test_contrastive_empty_and_bad_input():
    fi = torch.randn(3, 4, requires_grad=True)
    fj = torch.randn(3, 4, requires_grad=True)
    none = torch.zeros(3, dtype=torch.bool)
    out = scale_contrastive_loss(fi, fj, none, torch.ones(3), none)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(fi.grad, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="fi and fj"):
        scale_contrastive_loss(fi, fj[:2], none, torch.ones(3), none)
    with pytest.raises(ValueError, match="weight"):
        scale_contrastive_loss(fi, fj, none, torch.ones(2), none)
    with pytest.raises(ValueError, match="weight"):
        scale_contrastive_loss(fi, fj, none, -torch.ones(3), ~none)


def test_contrastive_gradient_pulls_positives_pushes_negatives():
    fi = torch.stack([_unit(0), _unit(0)]).requires_grad_(True)
    fj = torch.stack([_unit(60), _unit(60)]).requires_grad_(True)
    positive = torch.tensor([True, False])
    loss = scale_contrastive_loss(fi, fj, positive, torch.ones(2), torch.ones(2, dtype=torch.bool))
    loss.backward()
    # one gradient-descent step on fi: the positive's cosine rises, the negative's falls
    step = fi.detach() - 0.1 * fi.grad
    c = cosine(step, fj.detach())
    assert c[0] > 0.5 and c[1] < 0.5
    assert fj.grad is not None and bool(torch.isfinite(fj.grad).all())


def test_perception_loss_by_hand():
    e0 = _unit(0)
    fp = torch.stack([e0, e0, e0, e0, e0]).requires_grad_(True)
    fq = torch.stack([_unit(60), _unit(0), _unit(60), _unit(120), _unit(90)])
    sim = torch.tensor([True, True, False, False, False])
    dis = torch.tensor([False, False, True, True, False])
    # sim: mean(1 - 0.5, 1 - 1) = 0.25; dis: mean(relu(0.5), relu(-0.5)) = 0.25; pair 4 ignored
    loss = perception_loss(fp, fq, sim, dis)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    assert fp.grad.abs().sum() > 0 and torch.equal(fp.grad[4], torch.zeros(2))
    only_sim = perception_loss(fp, fq, sim, torch.zeros(5, dtype=torch.bool))
    assert only_sim.item() == pytest.approx(0.25, abs=1e-6)
    empty = perception_loss(fp, fq, torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="sim"):
        perception_loss(fp, fq, sim[:3], dis)


def test_norm_regulariser_by_hand():
    F = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = norm_regulariser(F)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 1.0) / 3, abs=1e-6)
    loss.backward()
    assert F.grad[0, 0] > 0 and F.grad[1].abs().max() < 1e-6 and bool(torch.isfinite(F.grad).all())
    assert norm_regulariser(torch.zeros(0, 3)).item() == 0.0
    with pytest.raises(ValueError, match="F"):
        norm_regulariser(torch.zeros(3))


def test_centroid_pull_zero_at_centroid_and_ignores_far_pixels():
    centroids = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], requires_grad=True)  # norm does not matter
    at = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])  # exactly on their centroids' directions
    assert centroid_pull_loss(at, centroids, 0.9).item() == pytest.approx(0.0, abs=1e-7)
    near = torch.cat([_unit(math.degrees(math.acos(0.95))), torch.zeros(1)])  # cos 0.95 to centroid 0
    far = torch.cat([_unit(45), torch.zeros(1)])  # cos 0.707 to both: ignored
    feats = torch.stack([near, far, at[1]]).requires_grad_(True)
    loss = centroid_pull_loss(feats, centroids, 0.9)
    assert loss.item() == pytest.approx((0.05 + 0.0) / 2, abs=1e-6)
    loss.backward()
    assert feats.grad[0].abs().sum() > 0 and torch.equal(feats.grad[1], torch.zeros(3))
    assert centroids.grad is None  # centroids are detached
    # nothing above tau, or no centroids: 0 with the graph kept
    f2 = feats.detach().clone().requires_grad_(True)
    for out in (centroid_pull_loss(f2[1:2], centroids, 0.9), centroid_pull_loss(f2, torch.zeros(0, 3), 0.9)):
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
    with pytest.raises(ValueError, match="centroids"):
        centroid_pull_loss(feats, torch.zeros(2, 4))


def test_zero_feature_gives_finite_gradient():
    fi = torch.zeros(1, 4, requires_grad=True)
    fj = torch.ones(1, 4)
    loss = scale_contrastive_loss(fi, fj, torch.tensor([True]), torch.ones(1), torch.tensor([True]))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert bool(torch.isfinite(fi.grad).all())
