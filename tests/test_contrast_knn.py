"""Exact kNN (both backends) against brute force, tie rule, and kNN feature smoothing (values and gradients)."""

import pytest
import torch

from pepeseg3d_ns.contrast.knn import KnnSmoother, _scipy_available, knn_indices, smooth_features



@pytest.fixture(autouse=True)
def one_thread():
    """On a busy 2-core machine torch's intra-op threads make these small ops several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BACKENDS = ["torch"] + (["scipy"] if _scipy_available() else [])


def brute_knn(p: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: k nearest others by (squared distance, index) from the full N x N matrix (small N only)."""
    d = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    return torch.argsort(d, dim=1, stable=True)[:, :k]  # stable: equal distances keep index order


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_points_match_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2000, 3, generator=g, dtype=torch.float64)
    out = knn_indices(p, k=16, chunk=20, backend=backend)  # torch: blocks of 163 query rows
    assert out.shape == (2000, 16) and out.dtype == torch.long
    assert torch.equal(out, brute_knn(p, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_and_grid_ties_are_broken_by_index(backend):
    g = torch.Generator().manual_seed(1)
    # integer grid: thousands of exactly equal distances; plus exact duplicates of 200 points
    p = torch.randint(0, 6, (1200, 3), generator=g).float()
    p = torch.cat([p, p[:200]])
    out = knn_indices(p, k=16, chunk=20, backend=backend)
    assert torch.equal(out, brute_knn(p, 16))
    # a duplicate's first neighbour is its twin (distance 0, smallest index among the zero-distance points)
    assert (out[1200:, 0] < 1200).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clustered_points_with_far_outliers(backend):
    g = torch.Generator().manual_seed(2)
    p = torch.cat([torch.randn(1500, 3, generator=g) * 0.01, torch.randn(200, 3, generator=g) * 10.0])
    assert torch.equal(knn_indices(p, k=8, chunk=20, backend=backend), brute_knn(p, 8))


def test_backends_agree_float32():
    if not _scipy_available():
        pytest.skip("scipy not installed")
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3000, 3, generator=g)
    a = knn_indices(p, k=16, backend="torch")
    b = knn_indices(p, k=16, backend="scipy")
    assert torch.equal(a, b)


def test_include_self_puts_self_first():
    g = torch.Generator().manual_seed(4)
    p = torch.rand(500, 3, generator=g, dtype=torch.float64)
    out = knn_indices(p, k=5, include_self=True, backend="torch")
    assert torch.equal(out[:, 0], torch.arange(500))
    assert torch.equal(out[:, 1:], brute_knn(p, 4))


def test_tiny_inputs():
    p = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    for backend in BACKENDS:
        assert knn_indices(p, k=2, backend=backend).tolist() == [[1, 2], [0, 2], [1, 0]]
        assert knn_indices(p, k=1, backend=backend).tolist() == [[1], [0], [1]]
    assert knn_indices(p, k=1, include_self=True).tolist() == [[0], [1], [2]]


def test_progress_bar(capsys):
    p = torch.rand(300, 3)
    knn_indices(p, k=4, progress=True, backend="torch")
    assert "kNN" in capsys.readouterr().err


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        knn_indices(torch.rand(10, 2))
    with pytest.raises(ValueError, match="empty"):
        knn_indices(torch.rand(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        knn_indices(torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0], [1.0, 1, 1]]), k=1)
    with pytest.raises(ValueError, match="lower k"):
        knn_indices(torch.rand(5, 3), k=5)
    with pytest.raises(ValueError, match="backend"):
        knn_indices(torch.rand(5, 3), k=2, backend="faiss")
    with pytest.raises(ValueError, match="floating"):
        knn_indices(torch.ones(5, 3, dtype=torch.long), k=2)


def test_auto_without_scipy_uses_brute_force(monkeypatch):
    import pepeseg3d_ns.contrast.knn as knn

    monkeypatch.setattr(knn, "_scipy_available", lambda: False)
    monkeypatch.setattr(knn, "_knn_scipy", None)  # would raise if called
    p = torch.rand(300, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(knn_indices(p, k=6), brute_knn(p, 6))
    with pytest.raises(ValueError, match="scipy"):
        knn_indices(p, k=6, backend="scipy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p = torch.rand(5000, 3, dtype=torch.float64)
    ref = brute_knn(p, 16)
    for backend in BACKENDS:  # scipy: cKDTree on the host, index back on the device
        out = knn_indices(p.cuda(), k=16, backend=backend)
        assert out.is_cuda and torch.equal(out.cpu(), ref), backend


# ------------------------------------------------------------------------------------------------------------
# smoothing
# ------------------------------------------------------------------------------------------------------------


def dense_smoothing_matrix(nbrs: torch.Tensor, n: int, include_self: bool) -> torch.Tensor:
    k = nbrs.shape[1]
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        if include_self:
            a[i, i] += 1
        for j in nbrs[i].tolist():
            a[i, j] += 1
    return a / (k + int(include_self))


def test_smooth_hand_made():
    f = torch.tensor([[0.0, 3.0], [3.0, 0.0], [6.0, 6.0]])
    nb = torch.tensor([[1], [2], [0]])
    out = smooth_features(f, nb)
    assert torch.allclose(out, torch.tensor([[1.5, 1.5], [4.5, 3.0], [3.0, 4.5]]))
    out = smooth_features(f, nb, include_self=False)
    assert torch.allclose(out, f[nb[:, 0]])


@pytest.mark.parametrize("include_self", [True, False])
def test_smooth_matches_dense_reference_and_gradient(include_self):
    g = torch.Generator().manual_seed(5)
    n, k, d = 60, 4, 7
    nb = torch.randint(0, n, (n, k), generator=g)
    f = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = dense_smoothing_matrix(nb, n, include_self)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = smooth_features(f, nb, include_self=include_self, chunk=7)
    ref = a @ f
    assert torch.allclose(out, ref)
    (gf,) = torch.autograd.grad((out * w).sum(), f)
    assert torch.allclose(gf, a.T @ w)  # repeated neighbours accumulate
    assert torch.autograd.gradcheck(
        lambda x: smooth_features(x, nb, include_self=include_self, chunk=13), (f,)
    )


def test_smooth_chunk_invariance_and_knn_pipeline():
    g = torch.Generator().manual_seed(6)
    p = torch.rand(400, 3, generator=g)
    f = torch.randn(400, 32, generator=g)
    nb = knn_indices(p, k=16)
    a = smooth_features(f, nb, chunk=400)
    b = smooth_features(f, nb, chunk=33)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a[0], (f[0] + f[nb[0]].sum(0)) / 17, atol=1e-6)


def test_smooth_bad_input():
    f = torch.randn(5, 3)
    with pytest.raises(ValueError, match="rows"):
        smooth_features(f, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        smooth_features(f, torch.full((5, 2), 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        smooth_features(f, torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        smooth_features(torch.randn(5), torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="k = 0"):
        smooth_features(f, torch.zeros(5, 0, dtype=torch.long))


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("repeats", [True, False])
def test_knn_smoother_matches_dense_reference(include_self, repeats):
    g = torch.Generator().manual_seed(7)
    n, k, d = 50, 5, 6
    if repeats:  # repeated neighbours (and self among them): the coalescing path
        nb = torch.randint(0, n, (n, k), generator=g)
    else:
        nb = torch.stack([torch.randperm(n - 1, generator=g)[:k] for _ in range(n)])
        nb = nb + (nb >= torch.arange(n)[:, None]).long()  # distinct, never self
    f = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = dense_smoothing_matrix(nb, n, include_self)
    sm = KnnSmoother(nb, include_self=include_self)
    out = sm(f)
    assert torch.allclose(out, a @ f)
    assert torch.allclose(out, smooth_features(f, nb, include_self=include_self))
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    (gf,) = torch.autograd.grad((out * w).sum(), f)
    assert torch.allclose(gf, a.T @ w)
    assert torch.autograd.gradcheck(sm, (f,))
    assert sm(f.detach().float()).dtype == torch.float32  # one matrix per dtype, cached


def test_knn_smoother_bad_input():
    nb = torch.zeros(4, 2, dtype=torch.long)
    nb[0, 0] = 1
    sm = KnnSmoother(nb)
    with pytest.raises(ValueError, match="rows"):
        sm(torch.randn(5, 3))
    with pytest.raises(ValueError, match="floating"):
        sm(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        KnnSmoother(torch.full((4, 2), 4, dtype=torch.long))
    with pytest.raises(ValueError, match="k = 0"):
        KnnSmoother(torch.zeros(4, 0, dtype=torch.long))
