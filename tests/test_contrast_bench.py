"""Benchmark helpers of stage 2: synthetic data generators, one in-process kNN worker run, markdown formatting."""

import torch

from pepeseg3d_ns.benchmarks import contrast_parts as bench


def test_sphere_blobs():
    x, y = bench.make_sphere_blobs(2000, n_clusters=8, noise_frac=0.1, seed=1)
    assert x.shape == (2000, 32) and y.shape == (2000,)
    assert torch.allclose(x.norm(dim=1), torch.ones(2000), atol=1e-5)
    assert int((y == -1).sum()) == 200
    assert set(y[y >= 0].unique().tolist()) <= set(range(8))
    x2, y2 = bench.make_sphere_blobs(2000, n_clusters=8, noise_frac=0.1, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_hierarchical_blobs():
    x, fine, coarse = bench.make_hierarchical_blobs(1000, n_parents=3, n_children=2, noise_frac=0.0)
    assert x.shape == (1000, 32)
    assert torch.equal(coarse, fine // 2)
    assert fine.max() == 5 and (fine >= 0).all()
    # children of one parent are closer to each other than to other parents' children
    c = torch.stack([x[fine == i].mean(0) for i in range(6)])
    c = torch.nn.functional.normalize(c, dim=1)
    sim = c @ c.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[2, 4]


def test_scene_points_and_knn_worker():
    p = bench.make_scene_points(1000)
    assert p.shape == (1000, 3) and torch.isfinite(p).all()
    row = bench._worker_knn({"n": 3000, "backend": "auto", "k": 8, "smooth": True, "threads": 1, "seed": 0})
    assert row["time_s"] > 0 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert "smooth_bwd_s" in row


def test_format_markdown():
    res = {
        "kind": "cluster",
        "machine": {"cpus": 2},
        "rows": [
            {"dataset": "blobs", "method": "sklearn", "max_points": 5000, "n_points": 60000, "first_call_s": 0.5,
             "time_s": 4.48, "n_clusters": 14, "ari": 0.855, "ari_obj": 0.906, "noise_frac_out": 0.004,
             "peak_rss_mb": 657.0},
            {"dataset": "blobs", "method": "hdbscan", "max_points": 5000, "n_points": 60000, "error": "timeout"},
        ],
    }
    md = bench.format_markdown(res)
    assert "| 5000 | sklearn | 0.5 | 4.48 | 14 | 0.855 | 0.906 | 0.004 | 657 |" in md
    assert "error: timeout" in md
    knn = {"kind": "knn", "machine": {}, "rows": [{"n": 50000, "backend": "scipy", "time_s": 1.29,
                                                   "rss_before_mb": 551, "peak_rss_mb": 583, "rerun": True}]}
    assert "| 50000 | scipy (re-run) | 1.29 | 551 | 583 | - | - | - |" in bench.format_markdown(knn)


def test_smooth_bench_small():
    res = bench.run_smooth_bench(sizes=(500,), repeats=1, threads=None)
    row = res["rows"][0]
    assert row["n"] == 500 and row["max_abs_diff"] < 1e-5
    assert "| 500 |" in bench.format_markdown(res)
