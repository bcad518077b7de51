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
    assert stats == {"merged": 1, "added": 1, "dropped": 0, "stale": 0, "skipped": 0} and len(bank) == 3
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
    assert stats == {"merged": 0, "added": 1, "dropped": 1, "stale": 0, "skipped": 0}
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


def test_stale_centroids_are_dropped_after_k_unmatched_refreshes():
    """stale_after = 2: a centroid survives one refresh without a match and is dropped at the end of the second."""
    e = torch.eye(4)
    bank = CentroidBank(4, stale_after=2)
    assert bank.update(e[:2])["added"] == 2  # refresh 1: e0, e1 added
    s = bank.update(e[0:1] * 3)  # refresh 2: e0 matched; e1 unmatched once -> kept
    assert (s["merged"], s["stale"], len(bank)) == (1, 0, 2)
    s = bank.update(torch.stack([e[0], e[2]]))  # refresh 3: e0 matched, e2 new; e1 unmatched twice -> dropped
    assert (s["merged"], s["added"], s["stale"]) == (1, 1, 1)
    assert torch.allclose(bank.centroids, torch.stack([e[0], e[2]])) and bank.last_update.tolist() == [3, 3]
    s = bank.update(torch.zeros(0, 4))  # a refresh without clusters still ages the bank
    assert s["stale"] == 0 and len(bank) == 2
    assert bank.update(torch.zeros(0, 4))["stale"] == 2 and len(bank) == 0
    # without the rule nothing ever goes stale
    keep = CentroidBank(4)
    keep.update(e[:2])
    for _ in range(5):
        keep.update(torch.zeros(0, 4))
    assert len(keep) == 2
    with pytest.raises(ValueError, match="stale_after"):
        CentroidBank(4, stale_after=0)


def test_bound_replaces_least_recently_matched_across_refreshes():
    """max_size = 3 over five refreshes: the bank never grows past 3 and the newest candidates always get in."""
    e = torch.eye(6)
    bank = CentroidBank(6, max_size=3)
    bank.update(e[:3])  # 1: e0 e1 e2
    bank.update(e[1:2])  # 2: e1 matched
    s = bank.update(e[3:5])  # 3: e3 replaces e0 (last 1, lowest index among the oldest), e4 replaces e2 (last 1)
    assert (s["added"], s["dropped"], len(bank)) == (2, 2, 3)
    assert torch.allclose(bank.centroids, torch.stack([e[1], e[3], e[4]])) and bank.last_update.tolist() == [2, 3, 3]
    s = bank.update(torch.stack([e[3], e[5]]))  # 4: e3 matched; e5 replaces e1 (last matched at refresh 2)
    assert (s["merged"], s["added"], s["dropped"]) == (1, 1, 1)
    assert torch.allclose(bank.centroids, torch.stack([e[3], e[4], e[5]]))
    # a checkpoint with more rows than the bound: the last max_size are kept, with a warning
    with pytest.warns(UserWarning, match="max_size"):
        bank.load_tensor(e[:5])
    assert torch.allclose(bank.centroids, e[2:5])


def _train_refreshes(tmp_path, worker, views=2, steps=16):
    from pepeseg3d_ns.benchmarks import contrast_step as sb

    torch.manual_seed(0)
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 400), centroid_start=8, centroid_every=4,
                              centroid_lag=2, centroid_views=views, centroid_worker=worker, cluster_min_size=10,
                              cluster_max_points=600)
    opt = sb.make_optimizer(model)
    cam, batch = sb.make_camera((32, 32)), sb.make_batch((32, 32), num_masks=12)
    sizes = []
    for step in range(steps):
        sb.train_step(model, opt, cam, batch, step)
        sizes.append((len(model.bank_upper), len(model.bank_lower), model.bank_upper.step))
    return model, sizes


def test_refresh_schedule_and_background_worker_train_like_inline(tmp_path):
    """Views captured at t-1 and t (t = 6, 10, 14: centroid_start - lag + r * every), clustered from t, merged at
    t + 2 (8, 12): the banks change on exactly those steps, and the background process trains bit for bit like
    the inline worker."""
    torch.set_num_threads(1)
    a, sizes_a = _train_refreshes(tmp_path / "a", "inline")
    b, sizes_b = _train_refreshes(tmp_path / "b", "process")
    try:
        assert [s[2] for s in sizes_a] == [0] * 8 + [1] * 4 + [2] * 4  # refreshes merged at steps 8 and 12
        assert sizes_a[8][0] > 0 and sizes_a[8][1] > 0
        assert [c[0] for c in a._centroid_captures] == [13, 14] or a._centroid_due == [16]  # refresh 3 in flight
        assert sizes_a == sizes_b
        assert torch.equal(a.gauss_features, b.gauss_features)
        assert torch.equal(a.centroids_upper, b.centroids_upper) and torch.equal(a.centroids_lower, b.centroids_lower)
        assert a.centroids_upper.shape[0] == len(a.bank_upper)
        assert b._cluster_worker.mode == "process"
    finally:
        b._cluster_worker.close()


def test_more_views_give_the_clustering_more_views(tmp_path, monkeypatch):
    """centroid_views = 3: the pixels handed to HDBSCAN come from three capture steps, about a third from each."""
    from pepeseg3d_ns.contrast import cluster as cl

    seen = []
    real = cl.ClusterWorker.submit
    monkeypatch.setattr(cl.ClusterWorker, "submit", lambda self, jobs: (seen.append(jobs[0][0].shape), real(self, jobs)))
    torch.set_num_threads(1)
    model, _ = _train_refreshes(tmp_path, "inline", views=3, steps=9)
    # capture steps 4, 5, 6 for the start at 6: 200 pixels each of a 32 x 32 view (600 / 3)
    assert len(seen) == 1 and 3 * 190 <= seen[0][0] <= 600 and seen[0][1] == 32
