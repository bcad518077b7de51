"""HDBSCAN wrapper for stage 2: recovery of separated blobs per implementation, subsample + assignment,
determinism, centroids, degenerate and bad input, and label colours."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from pepeseg3d_ns.contrast import cluster as cl
from pepeseg3d_ns.contrast.cluster import available_methods, cluster_features, label_colors

METHODS = available_methods()
LIGHT = "hdbscan" if "hdbscan" in METHODS else METHODS[-1]


def blobs(n=600, k=3, dim=32, sigma=0.03, seed=0, scale_rows=True):
    """k well separated unit-sphere blobs (orthogonal centres), equal sizes; rows rescaled to test normalisation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:k] * 1.0
    gt = torch.arange(n) % k
    x = centres[gt] + sigma * torch.randn(n, dim, generator=g)
    if scale_rows:
        x = x * (0.5 + 3 * torch.rand(n, 1, generator=g))
    return x, gt, centres


@pytest.mark.parametrize("method", METHODS)
def test_separated_blobs_recovered(method):
    x, gt, centres = blobs()
    res = cluster_features(x, method=method, min_cluster_size=20)
    assert res.method == method
    assert res.num_clusters == 3
    assert adjusted_rand_score(gt.numpy(), res.labels.numpy()) == 1.0
    assert torch.equal(res.sizes, torch.tensor([200, 200, 200]))
    # centroids: unit norm, each one at its blob centre
    assert torch.allclose(res.centroids.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (res.centroids @ centres.T).max(dim=1).values.min() > 0.99


def test_subsample_and_assignment_label_every_point():
    x, gt, _ = blobs(n=900, seed=3)
    res = cluster_features(x, method=LIGHT, max_points=150, min_cluster_size=15, assign_noise=True, seed=5)
    assert res.subsample.shape == (150,)
    assert torch.equal(res.subsample, torch.sort(res.subsample).values)
    assert (res.labels >= 0).all()
    assert adjusted_rand_score(gt.numpy(), res.labels.numpy()) == 1.0
    assert torch.equal(res.sizes, torch.bincount(res.labels))
    assert (res.sizes[:-1] >= res.sizes[1:]).all()


def test_without_assignment_only_subsample_is_labelled():
    x, _, _ = blobs(n=900, seed=4)
    res = cluster_features(x, method=LIGHT, max_points=150, min_cluster_size=15, assign_rest=False)
    outside = torch.ones(900, dtype=torch.bool)
    outside[res.subsample] = False
    assert (res.labels[outside] == -1).all()
    assert (res.labels[res.subsample] >= 0).sum() > 100


def test_min_similarity_leaves_far_points_unassigned():
    x, _, _ = blobs(n=600, seed=5)
    far = F.normalize(torch.ones(1, 32), dim=1) * -1.0  # cosine < 0 to every blob centre
    x = torch.cat([x, far])
    # seed 2 leaves row 600 (the far point) out of the 300-point subsample, so it is up for assignment
    res = cluster_features(x, method=LIGHT, max_points=300, min_cluster_size=15, min_similarity=0.5, seed=2)
    assert 600 not in res.subsample.tolist()
    assert res.num_clusters == 3
    assert res.labels[600] == -1  # its best cosine is < 0.5: refused
    assert (res.labels[:600] >= 0).sum() > 550  # the blob points are assigned as before
    res = cluster_features(x, method=LIGHT, max_points=300, min_cluster_size=15, seed=2)
    assert 600 not in res.subsample.tolist()
    assert res.labels[600] >= 0  # without min_similarity every row gets its nearest centroid


def test_deterministic_for_fixed_seed():
    x, _, _ = blobs(n=900, seed=6, sigma=0.3)  # overlapping enough that the subsample matters
    a = cluster_features(x, method=LIGHT, max_points=200, min_cluster_size=10, seed=11)
    b = cluster_features(x, method=LIGHT, max_points=200, min_cluster_size=10, seed=11)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.subsample, b.subsample)
    assert torch.equal(a.centroids, b.centroids)
    c = cluster_features(x, method=LIGHT, max_points=200, min_cluster_size=10, seed=12)
    assert not torch.equal(a.subsample, c.subsample)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d = cluster_features(x, method=LIGHT, max_points=200, min_cluster_size=10, generator=g1)
    e = cluster_features(x, method=LIGHT, max_points=200, min_cluster_size=10, generator=g2)
    assert torch.equal(d.labels, e.labels)


def test_auto_prefers_the_hdbscan_package():
    if "hdbscan" not in METHODS:
        pytest.skip("the hdbscan package is not installed")
    x, _, _ = blobs()
    assert cluster_features(x, min_cluster_size=20).method == "hdbscan"


def test_too_few_points_gives_no_cluster():
    x, _, _ = blobs(n=12)
    res = cluster_features(x, method=LIGHT, min_cluster_size=20)
    assert res.num_clusters == 0 and res.method == "none"
    assert res.centroids.shape == (0, 32)
    assert (res.labels == -1).all() and res.labels.shape == (12,)


def test_float64_input_and_dtype():
    x, gt, _ = blobs()
    res = cluster_features(x.double(), method=LIGHT, min_cluster_size=20)
    assert res.centroids.dtype == torch.float64
    assert adjusted_rand_score(gt.numpy(), res.labels.numpy()) == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        cluster_features(torch.tensor([[1.0, float("nan")]] * 30), method=LIGHT)
    with pytest.raises(ValueError, match="empty"):
        cluster_features(torch.zeros(0, 8), method=LIGHT)
    with pytest.raises(ValueError, match=r"\[P, D\]"):
        cluster_features(torch.zeros(8), method=LIGHT)
    with pytest.raises(ValueError, match="floating"):
        cluster_features(torch.zeros(8, 3, dtype=torch.long), method=LIGHT)
    with pytest.raises(ValueError, match="method"):
        cluster_features(torch.rand(30, 3), method="kmeans")
    with pytest.raises(ValueError, match="min_cluster_size"):
        cluster_features(torch.rand(30, 3), min_cluster_size=1, method=LIGHT)


def test_auto_falls_back_with_one_warning(monkeypatch):
    if "sklearn" not in METHODS:
        pytest.skip("needs scikit-learn's HDBSCAN")
    monkeypatch.setattr(cl, "_importable", lambda m: m != "hdbscan")
    monkeypatch.setattr(cl, "_warned_fallback", False)
    x, gt, _ = blobs()
    with pytest.warns(RuntimeWarning, match="hdbscan"):
        res = cluster_features(x, method="auto", min_cluster_size=20)
    assert res.method == "sklearn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cluster_features(x, method="auto", min_cluster_size=20).method == "sklearn"  # no second warning


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_results_on_cuda():
    x, gt, _ = blobs()
    res = cluster_features(x.cuda(), method=LIGHT, min_cluster_size=20)
    assert res.labels.is_cuda and res.centroids.is_cuda and res.subsample.is_cuda
    assert adjusted_rand_score(gt.numpy(), res.labels.cpu().numpy()) == 1.0


def _jobs():
    x, _, _ = blobs(n=900, k=3, seed=7)
    y, _, _ = blobs(n=600, k=2, seed=8, sigma=0.05)
    kw = {"min_cluster_size": 20, "method": LIGHT}
    return [(x.numpy(), {**kw, "seed": 1}), (y.numpy(), {**kw, "seed": 2}), (x[:10].numpy(), kw)]


def test_cluster_centres_are_the_centres_of_the_blobs():
    out = cl.cluster_centres(_jobs())
    assert [c.shape for c in out] == [(3, 32), (2, 32), (0, 32)]  # 10 points: below min_cluster_size, no cluster
    assert ((out[0] @ np.eye(32)[:3].T).max(axis=1) > 0.99).all()


def test_worker_process_gives_the_inline_numbers_in_order():
    jobs = _jobs()
    inline = cl.ClusterWorker("inline")
    proc = cl.ClusterWorker("process")
    try:
        for w in (inline, proc):
            w.submit(jobs[:2])
            w.submit(jobs[1:])
        assert len(proc) == 2
        for expected in (cl.cluster_centres(jobs[:2]), cl.cluster_centres(jobs[1:])):  # oldest batch first
            for got in (inline.collect(), proc.collect()):
                assert len(got) == 2 and all(np.array_equal(p, q) for p, q in zip(got, expected))
        assert proc.mode == "process" and proc._proc.poll() is None  # the child ran the jobs and is still up
        # a child that dies: one warning, the job is recomputed inline, later jobs run inline
        proc.submit(jobs[:1])
        proc._proc.kill()
        proc._proc.wait()
        with pytest.warns(RuntimeWarning, match="worker failed"):
            (c,) = proc.collect()
        assert np.array_equal(c, cl.cluster_centres(jobs[:1])[0]) and proc.mode == "inline"
        with pytest.raises(RuntimeError, match="no job"):
            proc.collect()
    finally:
        proc.close()
    with pytest.raises(ValueError, match="mode"):
        cl.ClusterWorker("thread")


def test_label_colors():
    lab = torch.tensor([-1, 0, 1, 2, -5, 0])
    rgb = label_colors(lab)
    assert rgb.shape == (6, 3) and rgb.dtype == torch.uint8
    assert rgb[0].tolist() == [128, 128, 128] and rgb[4].tolist() == [128, 128, 128]
    assert torch.equal(rgb[1], rgb[5])
    many = label_colors(torch.arange(20)).int()
    # pairwise distinct, and clearly not grey (saturated)
    dist = (many[:, None] - many[None]).abs().sum(-1)
    assert dist[~torch.eye(20, dtype=torch.bool)].min() > 20
    assert (many.max(1).values - many.min(1).values).min() > 60
    img = label_colors(np.array([[0, 1], [-1, 3]]))
    assert img.shape == (2, 2, 3)
    assert not torch.equal(label_colors(torch.arange(5), seed=1), label_colors(torch.arange(5), seed=0))
    with pytest.raises(ValueError, match="integer"):
        label_colors(torch.rand(4))
