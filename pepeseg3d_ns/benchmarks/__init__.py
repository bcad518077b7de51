"""Benchmark drivers, apart from the method: they time and measure the method's parts and write the tables in
``docs/`` (``pepeseg3d bench-render``, ``bench-contrast``, ``bench-step``, ``bench-priors``,
``python -m pepeseg3d_ns.benchmarks.contrast_parts``). The method packages never import from here."""

from typing import List, Sequence, Tuple


def parse_sizes(flag: str, values: Sequence[str]) -> List[Tuple[int, int]]:
    """``["1008x756", ...]`` (width x height, as image sizes are written) -> ``[(H, W), ...]``; a malformed value
    is a :class:`~pepeseg3d_ns.errors.UserError` naming ``flag``."""
    from pepeseg3d_ns.errors import UserError

    out = []
    for s in values:
        try:
            w, h = (int(v) for v in str(s).lower().split("x"))
        except ValueError:
            raise UserError(f"{flag} takes WIDTHxHEIGHT values such as 1008x756, got {s!r}") from None
        if w < 1 or h < 1:
            raise UserError(f"{flag} {s}: width and height must be >= 1")
        out.append((h, w))
    return out


def run_worker_process(module: str, cfg: dict, timeout: float) -> dict:
    """Run ``pepeseg3d_ns.benchmarks.<module>._worker(cfg)`` in a fresh interpreter, with ``cfg["threads"]`` set as
    the thread-count environment before torch imports. Returns the worker's JSON row plus ``process_s`` (wall
    seconds of the whole child), or ``{**cfg, "error": ...}`` on a timeout or a failed child."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ)
    t = str(int(cfg["threads"]))
    env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, NUMBA_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t)
    code = (f"import json, sys; from pepeseg3d_ns.benchmarks import {module} as b; "
            "print('@@' + json.dumps(b._worker(json.loads(sys.argv[1]))), flush=True)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return {**json.loads(line[2:]), "process_s": time.perf_counter() - t0}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**cfg, "error": f"exit {proc.returncode}: {tail}"}
