"""scripts/gpu_check.sh: its CPU dry run exercises every command line of the CUDA check (argument names, paths
between steps, parsing of final_eval.json and the benchmark outputs, the markdown report), and a failing step is
reported without stopping the others."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["environment", "cuda tests", "scene", "pepe-recon", "pepe-contrast", "bench-render", "bench-contrast",
         "bench-step"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def table(md: str) -> dict:
    """``{step: (status, seconds, numbers)}`` from the report's one table."""
    head = md.index("| step | status | wall s | key numbers |")
    rows = {}
    for line in md[head:].splitlines()[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, line
        assert cells[0] not in rows, f"two rows for {cells[0]}"
        rows[cells[0]] = (cells[1], float(cells[2]), cells[3])
    return rows


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "x.md", tmp / "work"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--output", str(out), "--work-dir", str(work)],
                          cwd=tmp, capture_output=True, text=True, timeout=1500, env=ENV)
    return proc, out, work


@pytest.mark.slow  # about 4 minutes on a loaded 2-core machine: two ns-train runs and two benchmarks
def test_dry_run_one_row_per_step_with_parsed_numbers(dry_run):
    proc, out, work = dry_run
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    assert f"report: {out}" in proc.stdout
    md = out.read_text()
    rows = table(md)
    assert list(rows) == STEPS, list(rows)
    expected = {s: {"ok"} for s in STEPS}
    expected["cuda tests"] = {"skipped (no CUDA)"}
    for step, (status, secs, _) in rows.items():
        assert status in expected[step], (step, status, rows[step])
        assert secs >= 0
    env = rows["environment"][2]
    assert re.search(r"torch \S+", env) and "gsplat 1.4.0" in env and "CPU kernel cpp" in env, env

    # every CUDA test was collected (and skipped without CUDA), test_readback's sync check among them
    tests = rows["cuda tests"][2]
    n = int(number(r"0 passed, 0 failed, (\d+) skipped", tests))
    assert n >= 5 and f"(of {n})" in tests, tests
    assert "test_readback.py::test_contrast_steps_pass_cuda_sync_check" in tests
    assert "test_cpu_backend.py::test_matches_gsplat_cuda" in tests

    assert "tabletop 64 px, 12 views" in rows["scene"][2]

    # the numbers come from the runs' own final_eval.json and tensorboard logs
    runs = work / "runs" / "gpu_check"
    for step, run, steps in (("pepe-recon", runs / "pepe-recon" / "recon", 20),
                             ("pepe-contrast", runs / "pepe-contrast" / "contrast", 10)):
        cell = rows[step][2]
        final = json.loads((run / "final_eval.json").read_text())
        assert final["step"] == steps - 1
        psnr = number(r"PSNR (\S+) dB", cell)
        assert math.isfinite(psnr) and psnr == pytest.approx(final["metrics"]["psnr"], abs=0.006), (cell, final)
        assert number(r"([\d.]+) steps/s", cell) > 0, cell
        assert cell.startswith(f"{steps} steps:"), cell
        assert number(r"peak RSS (\d+) MiB", cell) > 0, cell
    miou = number(r"mIoU ([\d.]+)", rows["pepe-contrast"][2])
    assert 0.0 <= miou <= 1.0
    final = json.loads((runs / "pepe-contrast" / "contrast" / "final_eval.json").read_text())["metrics"]
    assert miou == pytest.approx(final["miou"], abs=6e-4)
    assert number(r"(\d+) Gaussians", rows["pepe-recon"][2]) > 0

    # the benchmarks' tables are appended, their numbers in the rows
    assert "fwd+bwd" in rows["bench-render"][2] and "2,000 G 64 px 3 ch" in rows["bench-render"][2]
    assert number(r"step ([\d.]+) s", rows["bench-contrast"][2]) > 0
    assert "## bench-render --device cpu" in md and "| 2000 | 64 | 3 |" in md
    assert "## bench-contrast --device cpu" in md and "| 2000 | 64×64 | 1 |" in md
    step = json.loads((work / "bench_step.json").read_text())
    assert rows["bench-step"][2] == f"64×64 M=10 sets: {1e3 * step[0]['step_s']:.1f} ms, peak +{step[0]['peak_mib']:.1f} MiB"
    assert "## bench-step --device cpu" in md and "| 64×64 | 10 |" in md
    assert "last lines of" not in md  # no failed step, so no log tail
    assert re.search(r"Total wall time: \d+ s\.", md)


def test_failing_steps_are_rows_and_the_exit_status(tmp_path):
    """Every step's timeout cut to a few hundredths of a second: each command fails (timed out), is one FAILED
    row with the tail of its log, the steps that need its output are skipped, the others still run, and the
    script exits 1."""
    out = tmp_path / "x.md"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--timeout-scale", "0.0001", "--output", str(out),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    md = out.read_text()
    rows = table(md)
    assert list(rows) == STEPS
    for step in ("environment", "cuda tests", "scene", "bench-render", "bench-contrast"):
        assert rows[step][0] == "FAILED" and "timed out after" in rows[step][2], (step, rows[step])
        assert f"## {step}: last lines of" in md
    assert rows["pepe-recon"][0] == "skipped (no scene)"
    assert rows["pepe-contrast"][0] == "skipped (no recon run)"


def test_bad_arguments_are_one_clear_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-rnu"], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--dry-rnu" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--timeout-scale", "fast"], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 2 and "--timeout-scale" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "bench-contrast" in proc.stdout
