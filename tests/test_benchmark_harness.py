"""The segmentation benchmark harness: table, consistency, figure, and a tiny end-to-end run of one row."""

from __future__ import annotations

import json
import math

import pytest


def _result(scene, row, level_vals):
    return {"scene": scene, "row": row,
            "per_level": {l: {"miou": v, "macc": v, "mbiou": v / 2, "consistency": v} for l, v in level_vals.items()}}


def test_consistency_counts_views_with_iou_at_least_half():
    from pepeseg3d_ns.eval.benchmark import consistency

    recs = [{"level": "objects", "iou": 0.9}, {"level": "objects", "iou": 0.49}, {"level": "parts", "iou": 0.5}]
    assert consistency(recs) == pytest.approx(2 / 3)
    assert consistency(recs, "objects") == 0.5
    assert math.isnan(consistency(recs, "groups"))


def test_table_and_figure(tmp_path):
    from PIL import Image

    from pepeseg3d_ns.eval.benchmark import consistency_figure, format_table

    results = [_result("tabletop", "baseline", {"parts": 0.5, "objects": 0.7}),
               _result("tabletop", "full", {"parts": 0.6, "objects": 0.9, "groups": 0.95})]
    table = format_table(results)
    lines = table.strip().splitlines()
    assert lines[0].count("mIoU") == 3 and len(lines) == 4
    assert "| tabletop | baseline | 0.500 / 0.500 / 0.250 / 0.50 | 0.700 / 0.700 / 0.350 / 0.70 | – |" in table
    png = consistency_figure(results, tmp_path / "c.png")
    assert Image.open(png).size[0] > 300


@pytest.mark.slow
def test_one_row_end_to_end(tmp_path):
    from pepeseg3d_ns.eval.benchmark import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(resolution=48, n_views=10, recon_steps=40, contrast_steps=30)
    results = run_benchmark(tmp_path, scenes=("tabletop",), settings=settings, rows=("+ consistency (full)",), progress=False)
    assert len(results) == 1
    r = results[0]
    assert set(r["per_level"]) == {"parts", "objects", "groups"}
    assert 0 <= r["overall"]["miou"] <= 1 and 0 <= r["overall"]["consistency"] <= 1
    assert (tmp_path / "benchmark.md").read_text().count("tabletop") == 1
    assert (tmp_path / "consistency.png").is_file()
    again = run_benchmark(tmp_path, scenes=("tabletop",), settings=settings, rows=("+ consistency (full)",), progress=False)
    assert again[0]["config"] == r["config"] and json.loads((tmp_path / "tabletop" / "results.json").read_text())
