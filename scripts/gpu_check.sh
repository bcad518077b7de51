#!/usr/bin/env bash
# One command that checks pepeseg3d_ns on a CUDA machine and writes one markdown report (default gpu_check.md):
#   1. environment   torch / CUDA / GPU / gsplat versions; gsplat's CUDA kernels JIT-compiled or loaded (timed),
#                    the CPU C++ kernel built or loaded, one tiny render + backward through each;
#   2. cuda tests    pytest on the tests that are skipped without CUDA (found by grepping tests/ for
#                    `skipif(not torch.cuda.is_available()` and `mark.cuda`): CPU vs gsplat, kNN, clustering,
#                    the sync-debug check of the contrast step;
#   3. scene         `pepeseg3d synth --scene tabletop --resolution 512` + `pepeseg3d priors` (simulated), run in
#                    the background from the start (one CPU core, ~1-3 min of numpy ray casting) beside steps 1-2;
#   4. pepe-recon    `ns-train pepe-recon`, 2000 steps on CUDA: steps/s, final PSNR (final_eval.json), peak memory;
#   5. pepe-contrast `ns-train pepe-contrast`, 1000 steps on the recon run: steps/s, final mIoU, peak memory;
#   6. bench-render  `pepeseg3d bench-render --device cuda`, 1M Gaussians at 1024 px, 3 and 32 channels;
#   7. bench-contrast `pepeseg3d bench-contrast --device cuda`, 500k Gaussians at 1008x756, 150 masks (1M would spend
#                    most of the step's time in the one-off kNN graph, ~45 s of cKDTree on the host);
#   8. bench-step    `pepeseg3d bench-step --device cuda` at 1008x756 (the step's data path alone).
# Every step runs under its own `timeout` and gets one table row (status ok / FAILED / skipped, wall seconds, key
# numbers); a failed step does not stop the others. The timeouts bound the whole at 8 minutes (scene 150 s beside
# environment 30 s + tests 75 s, then 100 + 100 + 40 + 70 + 20 s), plus up to 15 minutes for the one-time kernel
# builds of step 1 (its row gives their time). Exit status 1 when any step failed.
#
# Usage (from the repository root, with the venv active):
#   bash scripts/gpu_check.sh [OUTPUT.md] [--output OUTPUT.md] [--work-dir DIR] [--timeout-scale F] [--dry-run]
#     --dry-run        the same steps on CPU at tiny sizes (64 px scene, 20 + 10 steps, tiny benchmarks; CUDA tests
#                      collected and reported "skipped (no CUDA)"): checks every command line in a few minutes.
#     --work-dir DIR   where scenes, runs, logs and benchmark tables go (default: a new folder under $TMPDIR, kept).
#     --timeout-scale F  multiply every step's timeout by F (a slower GPU).
# Environment: PYTHON (default: python on PATH, the venv's).
set -u -o pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DRY=0
OUTPUT=""
WORK=""
TSCALE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --output) [ $# -ge 2 ] || { echo "gpu_check.sh: --output needs a file name" >&2; exit 2; }; OUTPUT="$2"; shift ;;
    --output=*) OUTPUT="${1#--output=}" ;;
    --work-dir) [ $# -ge 2 ] || { echo "gpu_check.sh: --work-dir needs a folder" >&2; exit 2; }; WORK="$2"; shift ;;
    --work-dir=*) WORK="${1#--work-dir=}" ;;
    --timeout-scale) [ $# -ge 2 ] || { echo "gpu_check.sh: --timeout-scale needs a number" >&2; exit 2; }; TSCALE="$2"; shift ;;
    --timeout-scale=*) TSCALE="${1#--timeout-scale=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see bash scripts/gpu_check.sh --help)" >&2; exit 2 ;;
    *) if [ -z "$OUTPUT" ]; then OUTPUT="$1"; else echo "gpu_check.sh: unexpected argument $1" >&2; exit 2; fi ;;
  esac
  shift
done
OUTPUT="${OUTPUT:-gpu_check.md}"

case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac      # relative to where the command was given
if [ -n "$WORK" ]; then
  mkdir -p "$WORK" || exit 2
  WORK="$(cd "$WORK" && pwd)"
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
for tool in "$PY" pepeseg3d ns-train; do
  if [ -z "$tool" ] || ! command -v "$tool" >/dev/null 2>&1; then
    echo "gpu_check.sh: '${tool:-python}' not found: activate the venv first (. .venv/bin/activate; pip install -e \".[dev]\")" >&2
    exit 2
  fi
done
if ! "$PY" -c "import pepeseg3d_ns" 2>/dev/null; then
  echo "gpu_check.sh: $PY cannot import pepeseg3d_ns: activate the venv where it is installed (pip install -e .)" >&2
  exit 2
fi
if ! awk -v f="$TSCALE" 'BEGIN { exit !(f + 0 > 0) }'; then
  echo "gpu_check.sh: --timeout-scale takes a positive number, got '$TSCALE'" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUTPUT")" || exit 2
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/pepe_gpu_check.XXXXXX")" || exit 2
fi
# a reused work folder: what this script wrote there before goes (an old run's tensorboard events would mix in)
rm -rf "$WORK/logs" "$WORK/runs/gpu_check" "$WORK"/bench_*.md "$WORK"/bench_*.json "$WORK"/peak_*.json \
  "$WORK"/scene_*.rc "$WORK/cuda_tests.xml" "$WORK/cuda_tests.txt" "$WORK/environment.json"
mkdir -p "$WORK/logs"
ROWS="$WORK/rows.tsv"
: > "$ROWS"

# ------------------------------------------------------------------------------------------------ sizes per mode
if [ "$DRY" = 1 ]; then
  MODE="dry run: CPU, tiny sizes"
  DEVICE=cpu
  export CUDA_VISIBLE_DEVICES=""          # the dry run never touches a GPU, even where there is one
  RES=64; NVIEWS=12; RECON_STEPS=20; CONTRAST_STEPS=10
  BR_ARGS=(--gaussians 2000 --resolutions 64 --channels 3 --repeats 1)
  BC_ARGS=(--sizes 2000 --resolutions 64x64 --threads 1 --repeats 1 --num-masks 12)
  BS_ARGS=(--resolutions 64x64 --num-masks 10 --paths sets --repeats 1)
  #        env tests scene recon contrast render bcontrast bstep  (seconds; the dry run is not time-bounded)
  T=(900 600 300 600 600 300 600 300)
else
  MODE="CUDA"
  DEVICE=cuda
  RES=512; NVIEWS=40; RECON_STEPS=2000; CONTRAST_STEPS=1000
  BR_ARGS=(--gaussians 1000000 --resolutions 1024 --channels 3 32 --repeats 5)
  BC_THREADS=$(( $(nproc 2>/dev/null || echo 4) < 8 ? $(nproc 2>/dev/null || echo 4) : 8 ))
  BC_ARGS=(--sizes 500000 --resolutions 1008x756 --threads "$BC_THREADS" --repeats 3 --num-masks 150)
  BS_ARGS=(--resolutions 1008x756 --num-masks 150 300 --paths sets --repeats 3)
  # env (after the kernel builds) 30 + tests 75, beside them scene 150; then 100 + 100 + 40 + 70 + 20: 480 s = 8 min
  T=(30 75 150 100 100 40 70 20)
  T_BUILD=900                              # step 1's one-time builds (gsplat JIT, CPU kernel)
fi
scale_t() { awk -v t="$1" -v f="$TSCALE" 'BEGIN { v = t * f; if (v < 0.01) v = 0.01; printf "%g", v }'; }
for i in "${!T[@]}"; do T[$i]=$(scale_t "${T[$i]}"); done
T_BUILD=$(scale_t "${T_BUILD:-900}")

# ------------------------------------------------------------------------------------------------ python helpers
# One small python program with subcommands: environment probe, result parsing, the markdown writer.
read -r -d '' HELPERS <<'PYEOF'
import json, math, os, statistics, sys, time
from pathlib import Path


def env_probe(out_json, device, t_build):
    """Versions, GPU, and the kernels: gsplat's CUDA extension (JIT-compiled on first use) and the CPU kernel."""
    info = {}
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    try:
        import gsplat
        info["gsplat"] = getattr(gsplat, "__version__", "?")
    except Exception as err:  # reported, the row fails below
        info["gsplat_error"] = f"import gsplat: {err}"
    import shutil, subprocess
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            info["nvcc"] = v.strip().splitlines()[-1] if v.strip() else nvcc
        except Exception as err:
            info["nvcc"] = f"{nvcc} ({err})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mib"] = p.total_memory / 2**20
        info["gpu_count"] = torch.cuda.device_count()
    Path(out_json).write_text(json.dumps(info, indent=1))  # what is known so far, should a build hang
    from pepeseg3d_ns.benchmarks.render import time_render
    from pepeseg3d_ns.render.rasterize import cpu_backend_name
    t0 = time.perf_counter()
    info["cpu_backend"] = cpu_backend_name()  # builds the C++ kernel on first use (~/.cache/pepeseg3d_ns)
    info["cpu_kernel_s"] = time.perf_counter() - t0
    r = time_render(2000, 64, 3, "cpu", 1)
    info["cpu_render_ok"] = bool(math.isfinite(r["fwd_bwd_s"]))
    if device == "cuda" and torch.cuda.is_available() and "gsplat_error" not in info:
        try:
            from torch.utils.cpp_extension import _get_build_directory
            build = Path(_get_build_directory("gsplat_cuda", verbose=False))
            info["gsplat_cached"] = (build / "gsplat_cuda.so").is_file()
        except Exception:
            info["gsplat_cached"] = None
        t0 = time.perf_counter()
        try:
            from gsplat.cuda._backend import _C
            info["gsplat_kernels"] = _C is not None
            if _C is None:
                info["gsplat_error"] = "gsplat's CUDA extension did not load (nvcc on PATH? see the log)"
        except Exception as err:
            info["gsplat_kernels"] = False
            info["gsplat_error"] = f"gsplat CUDA kernels: {type(err).__name__}: {err}"
        info["gsplat_load_s"] = time.perf_counter() - t0
        if info.get("gsplat_kernels"):
            r = time_render(2000, 64, 3, "cuda", 1)
            info["cuda_render_ok"] = bool(math.isfinite(r["fwd_bwd_s"]))
    Path(out_json).write_text(json.dumps(info, indent=1))


def env_row(info_json, device):
    """Row cells (status, numbers) of the environment step."""
    i = json.loads(Path(info_json).read_text())
    parts = [f"torch {i.get('torch')}", f"CUDA {i.get('torch_cuda')}"]
    if "gpu" in i:
        parts.append(f"{i['gpu']} ({i['gpu_mib'] / 1024:.0f} GiB)" + (f" ×{i['gpu_count']}" if i.get("gpu_count", 1) > 1 else ""))
    parts.append(f"gsplat {i.get('gsplat', '–')}")
    if i.get("nvcc"):
        parts.append(f"nvcc: {i['nvcc']}")
    if "gsplat_load_s" in i:
        how = "loaded from cache" if i.get("gsplat_cached") else "JIT-compiled"
        parts.append(f"gsplat kernels {how} in {i['gsplat_load_s']:.1f} s" if i.get("gsplat_kernels")
                     else "gsplat kernels NOT loaded")
    if "cpu_backend" in i:
        parts.append(f"CPU kernel {i['cpu_backend']} ({i['cpu_kernel_s']:.1f} s)")
    ok = i.get("cpu_render_ok", False)
    if device == "cuda":
        ok = ok and i.get("cuda_available") and i.get("gsplat_kernels") and i.get("cuda_render_ok", False)
        if not i.get("cuda_available"):
            parts.append("torch sees NO CUDA device")
    if i.get("gsplat_error"):
        parts.append(i["gsplat_error"])
        ok = ok and device != "cuda"
    print("ok" if ok else "FAILED")
    print(", ".join(str(p) for p in parts))


def cuda_tests(listing):
    """The node ids of the tests skipped without CUDA: the next `def test_...` after a CUDA skip/marker line."""
    import re
    ids = []
    for f in sorted(Path("tests").glob("test_*.py")):
        pending = False
        for line in f.read_text().splitlines():
            if re.search(r"skipif\(\s*not torch\.cuda\.is_available\(\)|pytest\.mark\.cuda\b", line):
                pending = True
            m = re.match(r"\s*def (test_\w+)", line)
            if m and pending:
                ids.append(f"{f.as_posix()}::{m.group(1)}")
                pending = False
    Path(listing).write_text("\n".join(dict.fromkeys(ids)) + "\n")


def junit_row(xml, dry):
    """Row cells from pytest's junit XML: passed / failed / skipped counts."""
    import xml.etree.ElementTree as ET
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    passed = n - failed - skipped
    bad = [f"{c.get('classname', '')}.{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    cells = f"{passed} passed, {failed} failed, {skipped} skipped (of {n})"
    if n == 0:
        status, cells = "FAILED", "no test collected"
    elif failed:
        status = "FAILED"
    elif dry:
        status = "skipped (no CUDA)" if passed == 0 else "ok"
    elif passed == 0:  # torch sees a GPU, yet every test skipped itself
        status, cells = "FAILED", cells + ", all skipped on a CUDA machine (see the log's skip reasons)"
    else:
        status = "ok"
    if bad:
        cells += "; failed: " + ", ".join(bad)
    print(status)
    print(cells)


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


def run_row(config_yml, steps, kind, peak_json, wall_s):
    """Row cells of a training run: steps/s, final_eval.json metrics, Gaussians, peak memory."""
    run = Path(config_yml).parent
    final = json.loads((run / "final_eval.json").read_text())
    m = final["metrics"]
    problems = []
    if final["step"] != steps - 1:
        problems.append(f"final_eval.json is of step {final['step']}, not {steps - 1}")
    cells = []
    it = _scalars(run, "Train Iter (time)")
    if len(it) >= 2:
        sps = (it[-1].step - it[0].step) / max(it[-1].wall_time - it[0].wall_time, 1e-9)
        med = statistics.median(e.value for e in it[1:])
        cells.append(f"{sps:.1f} steps/s (steps {it[0].step}–{it[-1].step}, evals included; median iteration {1e3 * med:.1f} ms)")
    elif it:
        cells.append(f"iteration {1e3 * it[0].value:.1f} ms")
    else:
        problems.append("no 'Train Iter (time)' in the tensorboard log")
    psnr = m.get("psnr")
    if psnr is None or not math.isfinite(psnr):
        problems.append(f"PSNR {psnr!r} in final_eval.json")
    else:
        cells.append(f"PSNR {psnr:.2f} dB")
    if kind == "contrast":
        miou = m.get("miou")
        if miou is None or not (0.0 <= miou <= 1.0):
            problems.append(f"mIoU {miou!r} in final_eval.json")
        else:
            levels = ", ".join(f"{l} {m[f'miou_{l}']:.3f}" for l in ("parts", "objects", "groups") if f"miou_{l}" in m)
            cells.append(f"mIoU {miou:.3f}" + (f" ({levels})" if levels else ""))
    else:
        g = _scalars(run, "Train Metrics Dict/gaussian_count")
        if g:
            cells.append(f"{int(g[-1].value)} Gaussians")
    try:
        p = json.loads(Path(peak_json).read_text())
        if p.get("cuda_max_allocated_mib") is not None:
            cells.append(f"peak GPU {p['cuda_max_allocated_mib']:.0f} MiB allocated / {p['cuda_max_reserved_mib']:.0f} MiB reserved")
        cells.append(f"peak RSS {p['maxrss_mib']:.0f} MiB")
    except (OSError, ValueError, KeyError):
        cells.append("peak memory not recorded")
    cells.append(f"wall {wall_s} s incl. start-up and final eval")
    print("FAILED" if problems else "ok")
    print(", ".join(cells + problems))


def bench_render_row(md):
    lines = [l for l in Path(md).read_text().splitlines() if l.startswith("| ") and l[2].isdigit()]
    if not lines:
        print("FAILED"); print("no row in the table"); return
    cells = []
    for l in lines:
        n, px, ch, fwd, fb, peak, _ = [c.strip() for c in l.strip("|").split("|")]
        cells.append(f"{int(n):,} G {px} px {ch} ch: fwd {fwd} s, fwd+bwd {fb} s, peak {peak} MiB")
    print("ok"); print("; ".join(cells))


def bench_json_row(js, kind):
    rows = json.loads(Path(js).read_text())
    if not rows:
        print("FAILED"); print("no row"); return
    cells, bad = [], False
    for r in rows:
        if "error" in r:
            bad = True
            cells.append(f"error: {str(r['error'])[:300]}")
        elif kind == "contrast":
            cells.append(f"{r['gaussians']:,} G {r['height']}×{r['width']}: step {r['plain_total_s']:.3f} s "
                         f"(fwd {r['plain_forward_s']:.3f}, bwd {r['plain_backward_s']:.3f}), with Lc {r['lc_total_s']:.3f} s, "
                         f"refresh step {r['refresh_total_s']:.2f} s, step peak {r['step_peak_mib']:.0f} MiB")
        else:
            cells.append(f"{r['width']}×{r['height']} M={r['num_masks']} {r['path']}: {1e3 * r['step_s']:.1f} ms, "
                         f"peak +{r['peak_mib']:.1f} MiB")
    print("FAILED" if bad else "ok"); print("; ".join(cells))


def markdown(rows_tsv, out, mode, work, head_json, total_s=""):
    head = json.loads(head_json)
    rows = [l.rstrip("\n").split("\t") for l in Path(rows_tsv).read_text().splitlines() if l.strip()]
    esc = lambda s: s.replace("|", "\\|")
    md = [f"# pepeseg3d_ns GPU check ({mode})", "",
          f"{head['date']} · commit `{head['commit']}` · host `{head['host']}` · work folder `{work}`", "",
          "| step | status | wall s | key numbers |", "|---|---|---:|---|"]
    md += [f"| {esc(r[0])} | {esc(r[1])} | {r[2]} | {esc(r[3]) if len(r) > 3 else ''} |" for r in rows]
    md += ["", f"Total wall time: {total_s} s." if total_s else "(still running, or stopped before the end)"]
    for title, path in head.get("tables", []):
        if Path(path).is_file():
            md += ["", f"## {title}", "", Path(path).read_text().strip()]
    for r in rows:
        if r[1].startswith("FAILED") and len(r) > 4 and Path(r[4]).is_file():
            tail = Path(r[4]).read_text(errors="replace").splitlines()[-40:]
            md += ["", f"## {r[0]}: last lines of {r[4]}", "", "```", *tail, "```"]
    Path(out).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"env-probe": lambda: env_probe(args[0], args[1], args[2]), "env-row": lambda: env_row(*args),
     "cuda-tests": lambda: cuda_tests(args[0]), "junit-row": lambda: junit_row(args[0], args[1] == "1"),
     "run-row": lambda: run_row(args[0], int(args[1]), args[2], args[3], args[4]),
     "bench-render-row": lambda: bench_render_row(args[0]),
     "bench-json-row": lambda: bench_json_row(args[0], args[1]),
     "markdown": lambda: markdown(*args)}[cmd]()
PYEOF

# ns-train in this process, so that the peak memory of the run can be read at exit (torch's allocator counters on
# CUDA, the resident set size on CPU); the arguments are ns-train's.
read -r -d '' NS_TRAIN <<'PYEOF'
import atexit, json, os, resource, sys
def _peak():
    import torch
    d = {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        d["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        d["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    with open(os.environ["GPU_CHECK_PEAK"], "w") as f:
        json.dump(d, f)
atexit.register(_peak)
sys.argv = ["ns-train"] + sys.argv[1:]
from nerfstudio.scripts.train import entrypoint
sys.exit(entrypoint())
PYEOF

helper() { "$PY" -c "$HELPERS" "$@"; }

TABLES=()      # (title, file) pairs appended to the report
FAILED_ANY=0
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT+changes"; fi
DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"

write_md() {
  local tables_json="[]"
  if [ ${#TABLES[@]} -gt 0 ]; then
    tables_json="$("$PY" -c 'import json, sys; a = sys.argv[1:]; print(json.dumps([a[i:i + 2] for i in range(0, len(a), 2)]))' "${TABLES[@]}")"
  fi
  local head
  head="$("$PY" -c 'import json, sys; print(json.dumps({"date": sys.argv[1], "commit": sys.argv[2], "host": sys.argv[3], "tables": json.loads(sys.argv[4])}))' \
    "$DATE" "$COMMIT" "$(hostname 2>/dev/null || echo '?')" "$tables_json")"
  helper markdown "$ROWS" "$OUTPUT" "$MODE" "$WORK" "$head" "${TOTAL_S:-}" || echo "gpu_check.sh: could not write $OUTPUT" >&2
}

# add_row NAME STATUS SECONDS NUMBERS [LOG]
add_row() {
  local numbers="${4//$'\t'/ }"
  numbers="${numbers//$'\n'/ }"
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$numbers" "${5:-}" >> "$ROWS"
  case "$2" in FAILED*) FAILED_ANY=1 ;; esac
  printf '[gpu_check] %-16s %-20s %6s s  %s\n' "$1" "$2" "$3" "$numbers"
  write_md
}

# timed LOG TIMEOUT CMD...: runs CMD under `timeout` with its output in LOG; sets RC and SECS
STEP_PID=""
timed() {
  local log="$1" limit="$2"; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  local a shown=()
  for a in "$@"; do  # the embedded python programs are shown by their first line
    if [ ${#a} -gt 200 ]; then shown+=("'${a%%$'\n'*} ...'"); else shown+=("$a"); fi
  done
  echo "+ ${shown[*]}" >> "$log"
  # in the background and waited for, so that an interrupt reaches the trap at once (timeout runs the command in
  # its own process group and passes a TERM on to all of it)
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  RC=$?
  STEP_PID=""
  t1=$(date +%s.%N)
  SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then echo "[gpu_check] timed out after $limit s" >> "$log"; fi
}
fail_cell() {  # what to say about a failed command
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then echo "timed out after $1 s"; else echo "exit status $RC (see the log below)"; fi
}
# parse_row LOG HELPER-ARGS...: runs a row helper, sets ST and NUM (FAILED when the helper itself fails)
parse_row() {
  local log="$1"; shift
  local out
  if out="$(helper "$@" 2>>"$log")"; then
    ST="$(printf '%s\n' "$out" | sed -n 1p)"; NUM="$(printf '%s\n' "$out" | sed -n '2,$p' | tr '\n' ' ' | sed 's/ *$//')"
  else
    ST="FAILED"; NUM="could not parse the results (see the log below)"
  fi
}

echo "[gpu_check] mode: $MODE; work folder $WORK; report $OUTPUT"
T_START=$(date +%s)

# step 3's scene in the background (CPU only: numpy ray casting, then the simulated priors), beside steps 1-2
SCENE="$WORK/scenes/tabletop_$RES"
SCENE_LOG="$WORK/logs/3_scene.log"
(
  timed "$SCENE_LOG" "${T[2]}" pepeseg3d synth --scene tabletop --resolution "$RES" --n-views "$NVIEWS" \
    --output-dir "$SCENE" --overwrite --no-preview
  echo "$RC $SECS" > "$WORK/scene_synth.rc"
  if [ "$RC" = 0 ]; then
    timed "$SCENE_LOG" "${T[2]}" pepeseg3d priors --data "$SCENE" --simulated True --no-progress --no-preview
    echo "$RC $SECS" > "$WORK/scene_priors.rc"
  fi
) &
SCENE_PID=$!
stop_jobs() {  # on exit or interrupt: the running step and the background scene job (their `timeout`s pass the
              # TERM on to synth / priors / ns-train / the benchmarks' children)
  local p
  [ -n "${STEP_PID:-}" ] && kill "$STEP_PID" 2>/dev/null
  for p in $(ps -o pid= --ppid "$SCENE_PID" 2>/dev/null); do kill "$p" 2>/dev/null; done
  kill "$SCENE_PID" 2>/dev/null
}
trap stop_jobs EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------ 1. environment
LOG="$WORK/logs/1_environment.log"
ENV_JSON="$WORK/environment.json"
T_ENV=$(awk -v a="${T[0]}" -v b="$([ "$DRY" = 1 ] && echo 0 || echo "$T_BUILD")" 'BEGIN { printf "%g", a + b }')
timed "$LOG" "$T_ENV" "$PY" -c "$HELPERS" env-probe "$ENV_JSON" "$DEVICE" "$T_BUILD"
if [ -f "$ENV_JSON" ]; then
  parse_row "$LOG" env-row "$ENV_JSON" "$DEVICE"
  [ "$RC" = 0 ] || { ST="FAILED"; NUM="$NUM; $(fail_cell "$T_ENV")"; }
else
  ST="FAILED"; NUM="$(fail_cell "$T_ENV")"
fi
add_row "environment" "$ST" "$SECS" "$NUM" "$LOG"
HAVE_CUDA=1
if [ "$DRY" = 0 ] && ! "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get('cuda_available') else 1)" "$ENV_JSON" 2>/dev/null; then
  HAVE_CUDA=0
fi
# skip_if_no_cuda NAME: records "skipped (no CUDA)" in CUDA mode without a GPU; returns 0 when it did
skip_if_no_cuda() {
  if [ "$HAVE_CUDA" = 0 ]; then add_row "$1" "skipped (no CUDA)" 0 "torch sees no CUDA device (run with --dry-run on a CPU)"; return 0; fi
  return 1
}

# ------------------------------------------------------------------------------------------------ 2. CUDA tests
LOG="$WORK/logs/2_cuda_tests.log"
LIST="$WORK/cuda_tests.txt"
if ! skip_if_no_cuda "cuda tests"; then
  if helper cuda-tests "$LIST" 2>>"$LOG" && [ -s "$LIST" ] && [ "$(wc -w < "$LIST")" -gt 0 ]; then
    mapfile -t IDS < <(grep -v '^$' "$LIST")
    timed "$LOG" "${T[1]}" "$PY" -m pytest -q -p no:cacheprovider -rs --timeout "${T[1]}" \
      --junitxml "$WORK/cuda_tests.xml" "${IDS[@]}"
    if [ -f "$WORK/cuda_tests.xml" ] && [ "$RC" != 124 ] && [ "$RC" != 137 ]; then
      parse_row "$LOG" junit-row "$WORK/cuda_tests.xml" "$DRY"
    else
      ST="FAILED"; NUM="$(fail_cell "${T[1]}")"
    fi
    NUM="$NUM; tests: $(sed 's#^tests/##' "$LIST" | tr '\n' ' ' | sed 's/ *$//')"
  else
    ST="FAILED"; SECS=0; NUM="no CUDA test found in tests/ (grep for skipif(not torch.cuda.is_available())"
  fi
  add_row "cuda tests" "$ST" "$SECS" "$NUM" "$LOG"
fi

# ------------------------------------------------------------------------------------------------ 3. scene + priors
# waits for the background job started before step 1
wait "$SCENE_PID"
SCENE_OK=0
read -r RC1 S1 < "$WORK/scene_synth.rc" 2>/dev/null || { RC1=1; S1=0; }
if [ "$RC1" = 0 ]; then
  read -r RC S2 < "$WORK/scene_priors.rc" 2>/dev/null || { RC=1; S2=0; }
  if [ "$RC" = 0 ]; then
    SCENE_OK=1
    add_row "scene" "ok" "$(awk -v a="$S1" -v b="$S2" 'BEGIN { printf "%.1f", a + b }')" \
      "tabletop ${RES} px, $NVIEWS views: synth $S1 s, simulated priors $S2 s (in the background from the start)" "$SCENE_LOG"
  else
    add_row "scene" "FAILED" "$S2" "pepeseg3d priors: $(fail_cell "${T[2]}")" "$SCENE_LOG"
  fi
else
  RC=$RC1
  add_row "scene" "FAILED" "$S1" "pepeseg3d synth: $(fail_cell "${T[2]}")" "$SCENE_LOG"
fi

# ------------------------------------------------------------------------------------------------ 4-5. training
RUNS="$WORK/runs"
COMMON=(--machine.device-type "$DEVICE" --vis tensorboard --output-dir "$RUNS" --experiment-name gpu_check
        --pipeline.model.compute-lpips False)
RECON_CFG="$RUNS/gpu_check/pepe-recon/recon/config.yml"
CONTRAST_CFG="$RUNS/gpu_check/pepe-contrast/contrast/config.yml"
RECON_OK=0
LOG="$WORK/logs/4_pepe_recon.log"
if skip_if_no_cuda "pepe-recon"; then :
elif [ "$SCENE_OK" = 0 ]; then add_row "pepe-recon" "skipped (no scene)" 0 "the scene step failed"
else
  export GPU_CHECK_PEAK="$WORK/peak_recon.json"
  timed "$LOG" "${T[3]}" "$PY" -c "$NS_TRAIN" pepe-recon --data "$SCENE" \
    --timestamp recon --max-num-iterations "$RECON_STEPS" "${COMMON[@]}"
  if [ "$RC" = 0 ]; then
    parse_row "$LOG" run-row "$RECON_CFG" "$RECON_STEPS" recon "$WORK/peak_recon.json" "$SECS"
    [ "$ST" = ok ] && RECON_OK=1
  else
    ST="FAILED"; NUM="ns-train pepe-recon: $(fail_cell "${T[3]}")"
  fi
  add_row "pepe-recon" "$ST" "$SECS" "$RECON_STEPS steps: $NUM" "$LOG"
fi

LOG="$WORK/logs/5_pepe_contrast.log"
if skip_if_no_cuda "pepe-contrast"; then :
elif [ "$RECON_OK" = 0 ]; then add_row "pepe-contrast" "skipped (no recon run)" 0 "the pepe-recon step failed"
else
  export GPU_CHECK_PEAK="$WORK/peak_contrast.json"
  timed "$LOG" "${T[4]}" "$PY" -c "$NS_TRAIN" pepe-contrast \
    --pipeline.model.recon-checkpoint "$RECON_CFG" --timestamp contrast --max-num-iterations "$CONTRAST_STEPS" \
    "${COMMON[@]}"
  if [ "$RC" = 0 ]; then
    parse_row "$LOG" run-row "$CONTRAST_CFG" "$CONTRAST_STEPS" contrast "$WORK/peak_contrast.json" "$SECS"
  else
    ST="FAILED"; NUM="ns-train pepe-contrast: $(fail_cell "${T[4]}")"
  fi
  add_row "pepe-contrast" "$ST" "$SECS" "$CONTRAST_STEPS steps: $NUM" "$LOG"
fi

# ------------------------------------------------------------------------------------------------ 6-8. benchmarks
LOG="$WORK/logs/6_bench_render.log"
if ! skip_if_no_cuda "bench-render"; then
  timed "$LOG" "${T[5]}" pepeseg3d bench-render --device "$DEVICE" "${BR_ARGS[@]}" --output "$WORK/bench_render.md"
  if [ "$RC" = 0 ] && [ -f "$WORK/bench_render.md" ]; then
    parse_row "$LOG" bench-render-row "$WORK/bench_render.md"
    TABLES+=("bench-render --device $DEVICE ${BR_ARGS[*]}" "$WORK/bench_render.md")
  else
    ST="FAILED"; NUM="$(fail_cell "${T[5]}")"
  fi
  add_row "bench-render" "$ST" "$SECS" "$NUM" "$LOG"
fi

LOG="$WORK/logs/7_bench_contrast.log"
if ! skip_if_no_cuda "bench-contrast"; then
  timed "$LOG" "${T[6]}" pepeseg3d bench-contrast --device "$DEVICE" "${BC_ARGS[@]}" \
    --output "$WORK/bench_contrast.md" --json-output "$WORK/bench_contrast.json"
  if [ "$RC" = 0 ] && [ -f "$WORK/bench_contrast.json" ]; then
    parse_row "$LOG" bench-json-row "$WORK/bench_contrast.json" contrast
    [ -f "$WORK/bench_contrast.md" ] && TABLES+=("bench-contrast --device $DEVICE ${BC_ARGS[*]}" "$WORK/bench_contrast.md")
  else
    ST="FAILED"; NUM="$(fail_cell "${T[6]}")"
  fi
  add_row "bench-contrast" "$ST" "$SECS" "$NUM" "$LOG"
fi

LOG="$WORK/logs/8_bench_step.log"
if pepeseg3d bench-step --help 2>/dev/null | grep -q -- "--device"; then
  if ! skip_if_no_cuda "bench-step"; then
    timed "$LOG" "${T[7]}" pepeseg3d bench-step --device "$DEVICE" "${BS_ARGS[@]}" \
      --output "$WORK/bench_step.md" --json-output "$WORK/bench_step.json"
    if [ "$RC" = 0 ] && [ -f "$WORK/bench_step.json" ]; then
      parse_row "$LOG" bench-json-row "$WORK/bench_step.json" step
      [ -f "$WORK/bench_step.md" ] && TABLES+=("bench-step --device $DEVICE ${BS_ARGS[*]}" "$WORK/bench_step.md")
    else
      ST="FAILED"; NUM="$(fail_cell "${T[7]}")"
    fi
    add_row "bench-step" "$ST" "$SECS" "$NUM" "$LOG"
  fi
else
  add_row "bench-step" "skipped (CPU only)" 0 "pepeseg3d bench-step has no --device option: it times the data path on the CPU"
fi

TOTAL_S=$(( $(date +%s) - T_START ))
write_md
echo "[gpu_check] total $TOTAL_S s; report: $OUTPUT"
exit "$FAILED_ANY"
