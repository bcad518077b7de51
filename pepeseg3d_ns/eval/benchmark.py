"""``pepeseg3d benchmark``: the segmentation benchmark (paper Table 3 rows) on the synthetic suite, or on a
SPIn-NeRF / LERF-Mask scene folder, with every row trained for several seeds and reported as a mean with a
95 % bootstrap interval over objects and seeds.

Per scene and seed: one pepe-recon run per geometry the rows need, then one pepe-contrast run per row
(:data:`ROWS`):

| row id | label | geometry | contrast terms |
|---|---|---|---|
| ``baseline`` | baseline (contrastive only) | plain splatfacto (no depth loss, no refinement) | Lm + L2D |
| ``recon`` | + PePE reconstruction | PePE | Lm + L2D |
| ``perception`` | + perception loss | PePE | Lm + Lp + L2D |
| ``full`` | + consistency (full) | PePE | Lm + Lp + Lc + L2D (the defaults: "ours") |
| ``paper-exact`` | paper-exact | paper-exact recon | paper-exact contrast |
| ``with-paper-<option>`` | ours, paper's <option> | PePE (or PePE with that recon option) | ours with that one option at the paper's value |

The ``with-paper-...`` rows (one per departure listed in :mod:`pepeseg3d_ns.paper`) measure each of our defaults
against the paper's value on its own.

A row is a dict of config overrides, so a new row is one entry of :data:`ROWS` (and :data:`RECON` for a new
geometry); an override naming an option the model config lacks is an error, not a silent no-op.

**Seeds.** Seed ``k`` sets the training seed of both stages *and* the seed of the simulated priors (each seed
has its own prior cache, ``<scene>/pepe_priors_seed<k>``): the simulated SAM / Depth-Anything errors stand in for
one realisation of a real prior's errors, and the perception and consistency losses exist to correct such
errors, so a row's advantage measured on one realisation could be an artefact of it. The scene layout is the
same for every seed (``scene_seed``), so each object is the same object in every seed and the bootstrap can pair
rows object by object. Real data sets (``--data``) vary the training seed only (their priors are computed once).

Each contrast run is evaluated by label propagation on the held-out views (:mod:`pepeseg3d_ns.eval.propagation`)
and every per-object score is kept (``<output_dir>/<scene>/results.json``, ``benchmark.json``), so rows and seeds
can be added later; the tables are computed from everything finished with the same settings. The two trivial
predictors of :func:`pepeseg3d_ns.eval.propagation.trivial_baseline` are scored per scene for reference.
Finished runs and evaluations are reused when the command runs again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from pepeseg3d_ns.eval.stats import bootstrap_interval


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: a label, the pepe-recon geometry it trains on (a key of :data:`RECON`), the
    pepe-contrast model options and pipeline options it overrides, and optionally the scale gate's learning
    rate."""

    label: str
    geometry: str
    contrast: Dict[str, object] = field(default_factory=dict)
    pipeline: Dict[str, object] = field(default_factory=dict)
    gate_lr: Optional[float] = None


NO_LC = {"lambda_c_upper": 0.0, "lambda_c_lower": 0.0}
ROWS: Dict[str, RowSpec] = {
    "baseline": RowSpec("baseline (contrastive only)", "plain", {"lambda_p": 0.0, **NO_LC}),
    "recon": RowSpec("+ PePE reconstruction", "pepe", {"lambda_p": 0.0, **NO_LC}),
    "perception": RowSpec("+ perception loss", "pepe", dict(NO_LC)),
    "full": RowSpec("+ consistency (full)", "pepe", {}),
    # every setting of the paper on both stages (pepeseg3d_ns/paper.py)
    "paper-exact": RowSpec("paper-exact", "paper-exact", {"paper_exact": True}),
}
"""Row id -> :class:`RowSpec`. Add a row here (its id becomes a ``--rows`` choice)."""
DEFAULT_ROWS: Tuple[str, ...] = ("baseline", "recon", "perception", "full")
"""The paper's Table 3 rows, run when ``--rows`` is not given."""
RECON: Dict[str, Dict[str, object]] = {
    "plain": {"depth_loss_weight": 0.0, "refine_boundaries": False},
    "pepe": {},
    "paper-exact": {"paper_exact": True},
}
"""Geometry name -> pepe-recon model options it overrides."""
PAPER_OPTION_GROUPS: Dict[str, Tuple[str, ...]] = {
    "pixels": ("num_sample_pixels", "num_pairs"),
    "bank": ("centroid_max_size", "centroid_stale_after"),
}
"""Departures that are one choice made of two options, reverted together by one ``with-paper-...`` row."""


def _paper_option_rows() -> Dict[str, RowSpec]:
    """One row per departure from the paper (:mod:`pepeseg3d_ns.paper`): ours (the ``full`` row) with that one
    setting back at the paper's value; id ``with-paper-<option>``. A recon departure adds its geometry to
    :data:`RECON` (``pepe-with-paper-<option>``). An option whose default is the paper's value gets a row with our
    alternative instead (``with-ours-<option>``)."""
    from pepeseg3d_ns import paper as P

    def rid(name: str, prefix: str = "with-paper-") -> str:
        return prefix + name.replace("_", "-")

    rows: Dict[str, RowSpec] = {}
    grouped = {f for fields in PAPER_OPTION_GROUPS.values() for f in fields}
    for name, fields in PAPER_OPTION_GROUPS.items():
        if all(f in P.PAPER_CONTRAST_MODEL for f in fields):
            rows[rid(name)] = RowSpec(f"ours, paper's {' + '.join(fields)}", "pepe",
                                      {f: P.PAPER_CONTRAST_MODEL[f] for f in fields})
        else:  # the whole group's default is the paper's value
            rows[rid(name, "with-ours-")] = RowSpec(f"ours, our {' + '.join(fields)}", "pepe",
                                                    {f: P.PAPER_DEFAULT_CONTRAST_MODEL[f][1] for f in fields})
    for f, v in P.PAPER_CONTRAST_MODEL.items():
        if f not in grouped:
            rows[rid(f)] = RowSpec(f"ours, paper's {f}", "pepe", {f: v})
    for f, (_, v) in P.PAPER_DEFAULT_CONTRAST_MODEL.items():
        if f not in grouped:
            rows[rid(f, "with-ours-")] = RowSpec(f"ours, {f} {v}", "pepe", {f: v})
    for f, v in P.PAPER_CONTRAST_PIPELINE.items():
        rows[rid(f)] = RowSpec(f"ours, paper's {f}", "pepe", pipeline={f: v})
    for f, (_, v) in P.PAPER_DEFAULT_CONTRAST_PIPELINE.items():
        rows[rid(f, "with-ours-")] = RowSpec(f"ours, {f} {v}", "pepe", pipeline={f: v})
    if P.DEFAULT_GATE_LR == P.PAPER_GATE_LR:
        rows[rid("gate_lr", "with-ours-")] = RowSpec(f"ours, scale-gate lr {P.OUR_GATE_LR}", "pepe",
                                                      gate_lr=P.OUR_GATE_LR)
    else:
        rows[rid("gate_lr")] = RowSpec("ours, paper's scale-gate lr", "pepe", gate_lr=P.PAPER_GATE_LR)
    recon = [(f, v, "with-paper-", f"ours, paper's {f}") for f, v in P.PAPER_RECON_MODEL.items()]
    recon += [(f, v, "with-ours-", f"ours, {f} {v}") for f, (_, v) in P.PAPER_DEFAULT_RECON_MODEL.items()]
    for f, v, prefix, label in recon:
        geometry = "pepe-" + rid(f, prefix)  # a folder name: recon_<geometry>_seed<k>
        RECON[geometry] = {f: v}
        rows[rid(f, prefix)] = RowSpec(label, geometry)
    return rows


ROWS.update(_paper_option_rows())


def apply_row(contrast_config, spec: RowSpec, what: str) -> None:
    """Set a row's pepe-contrast overrides (model options, pipeline options, scale-gate lr) on a nerfstudio
    ``TrainerConfig`` of pepe-contrast, in place. Step-valued model options (``gate_warmup``, ``centroid_lag``, ...)
    are given on the 10k-step reference schedule and scaled to the config's ``max_num_iterations``."""
    model = contrast_config.pipeline.model
    _apply(model, spec.contrast, what)
    # a step-valued option is given on the 10k-step reference schedule: scaled like the defaults
    scaled = dataclasses.replace(type(model)(), **spec.contrast).schedule_for(int(contrast_config.max_num_iterations))
    for k in spec.contrast.keys() & scaled.keys():
        setattr(model, k, scaled[k])
    _apply(contrast_config.pipeline, spec.pipeline, what, prefix="--pipeline.")
    if spec.gate_lr is not None:
        contrast_config.optimizers["scale_gate"]["optimizer"].lr = spec.gate_lr
TRIVIAL = {"bbox": "trivial: reference mask's box", "foreground": "trivial: all foreground"}
"""Trivial predictors scored per scene (kind of :func:`~pepeseg3d_ns.eval.propagation.trivial_baseline` -> label)."""
CONSISTENT_IOU = 0.5
SUITE_SCENES: Tuple[str, ...] = ("tabletop", "shelf", "garden", "hallway")


@dataclass
class BenchmarkSettings:
    """What every run of a benchmark shares. ``seeds`` says which seeds to run; everything else must match for
    a finished result to be reused."""

    resolution: int = 256
    n_views: int = 80
    eval_interval: Optional[int] = 8
    recon_steps: int = 2000
    contrast_steps: int = 1000
    device: str = "cpu"
    seeds: Tuple[int, ...] = (0, 1, 2)
    threshold: float = 0.7
    scene_seed: int = 0

    def key(self) -> Dict[str, object]:
        """The settings a result depends on (all but ``seeds``), as stored with it."""
        d = asdict(self)
        d.pop("seeds")
        return d


def _train(config) -> float:
    from nerfstudio.scripts.train import train_loop

    config.save_config()
    t0 = time.perf_counter()
    train_loop(local_rank=0, world_size=1, config=config)
    return time.perf_counter() - t0


def consistency(records: Sequence[Dict], level: Optional[str] = None, iou_min: float = CONSISTENT_IOU) -> float:
    """Fraction of propagation records (one per object and held-out view) with IoU >= ``iou_min``."""
    rs = [r for r in records if level is None or r["level"] == level]
    return float(np.mean([r["iou"] >= iou_min for r in rs])) if rs else float("nan")


def _apply(model_config, overrides: Dict[str, object], what: str, prefix: str = "--pipeline.model.") -> None:
    for k, v in overrides.items():
        if not hasattr(model_config, k):
            raise ValueError(f"{what} sets {prefix}{k.replace('_', '-')}, which "
                             f"{type(model_config).__name__} does not have (add the option, or change ROWS / RECON "
                             "in pepeseg3d_ns/eval/benchmark.py)")
        setattr(model_config, k, v)


def _check_rows(rows: Iterable[str]) -> List[str]:
    rows = list(rows) or list(DEFAULT_ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {unknown}; choices: {', '.join(ROWS)}")
    return rows


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (several benchmark processes may share an output folder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_results(path: Path) -> Dict[str, Dict]:
    """key -> result of a scene's results.json (entries of an older format, without a key, are ignored)."""
    return {r["key"]: r for r in json.loads(path.read_text()) if "key" in r} if path.exists() else {}


def _save_result(path: Path, result: Dict) -> None:
    """Add ``result`` to ``path`` (re-read under a lock, so concurrent processes keep each other's results)."""
    with _locked(path.with_name(path.name + ".lock")):
        done = _load_results(path)
        done[result["key"]] = result
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(list(done.values()), indent=1))
        os.replace(tmp, path)


def _gt_only_pipeline(config):
    """What :func:`~pepeseg3d_ns.eval.propagation.trivial_baseline` reads (ground truth and camera sizes of the
    train and test splits), from the dataparser of ``config`` without building a model."""
    dp = copy.deepcopy(config.pipeline.datamanager.dataparser)
    dp.data = Path(config.pipeline.datamanager.data or config.data)
    parser = dp.setup()

    def split(name):
        out = parser.get_dataparser_outputs(name)
        return SimpleNamespace(cameras=out.cameras, _dataparser_outputs=out)

    return SimpleNamespace(datamanager=SimpleNamespace(train_dataset=split("train"), eval_dataset=split("test")))


def _per_level(summary: Dict, records: Sequence[Dict]) -> Dict[str, Dict]:
    return {lvl: {**s, "consistency": consistency(records, lvl)} for lvl, s in summary["per_level"].items()}


def run_scene(scene_dir: Path, out_dir: Path, settings: BenchmarkSettings, rows: Sequence[str] = (),
              dataparser: str = "synthetic", progress: bool = True) -> List[Dict]:
    """The rows ``rows`` (default :data:`DEFAULT_ROWS`) for every seed of ``settings`` on one scene folder, plus
    the trivial predictors; returns one result per (row, seed) and per trivial predictor, each with its
    per-object scores. Results already in ``<out_dir>/results.json`` with the same settings are reused."""
    from pepeseg3d_ns.recipes import evaluate_segmentation, finished_run, make_config, make_contrast_config
    from pepeseg3d_ns.eval.propagation import trivial_baseline

    rows = _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    key_settings = settings.key()
    scene = Path(scene_dir).name
    results: List[Dict] = []

    def reuse(key: str) -> Optional[Dict]:
        r = _load_results(results_path).get(key)
        return r if r is not None and r.get("settings") == key_settings else None

    def configure(config, seed: int) -> None:
        _set_dataparser(config, dataparser)
        if dataparser == "synthetic":
            config.pipeline.datamanager.priors_dir = Path(scene_dir) / f"pepe_priors_seed{seed}"
        config.pipeline.datamanager.priors = "require"

    for kind, label in TRIVIAL.items():
        key = f"trivial:{kind}"
        r = reuse(key)
        if r is None:
            cfg = make_config(Path(scene_dir), out_dir / "runs", settings.recon_steps, settings.device)
            _set_dataparser(cfg, dataparser)
            seg = trivial_baseline(_gt_only_pipeline(cfg), kind)
            s = seg["summary"]
            r = {"key": key, "row": label, "row_id": key, "seed": None, "scene": scene, "settings": key_settings,
                 "overall": {**s["overall"], "consistency": consistency(seg["records"])},
                 "per_level": _per_level(s, seg["records"]), "per_object": s["per_object"]}
            _save_result(results_path, r)
        results.append(r)

    for seed in settings.seeds:
        if dataparser == "synthetic":
            from pepeseg3d_ns.priors.cli import Priors

            Priors(data=Path(scene_dir), seed=seed, cache_dir=Path(scene_dir) / f"pepe_priors_seed{seed}",
                   progress=False, preview=False).main()  # simulated priors of this seed (skips what is done)
        recon_paths: Dict[str, Tuple[Path, float]] = {}
        for row_id in rows:
            spec = ROWS[row_id]
            key = f"{row_id}:seed{seed}"
            r = reuse(key)
            if r is not None:
                results.append(r)
                continue
            if spec.geometry not in recon_paths:
                rc = make_config(Path(scene_dir), out_dir / "runs", settings.recon_steps, settings.device, seed)
                rc.timestamp = f"recon_{spec.geometry}_seed{seed}"
                configure(rc, seed)
                _apply(rc.pipeline.model, RECON[spec.geometry], f"geometry {spec.geometry!r} of row {row_id!r}")
                recon_s = _train(rc) if not finished_run(rc, settings.recon_steps) else float("nan")
                recon_paths[spec.geometry] = (rc.get_base_dir() / "config.yml", recon_s)
            recon_cfg, recon_s = recon_paths[spec.geometry]
            cc = make_contrast_config(recon_cfg, out_dir / "runs", settings.contrast_steps, settings.device, seed,
                                      timestamp=f"contrast_{row_id}_seed{seed}")
            configure(cc, seed)
            apply_row(cc, spec, f"row {row_id!r}")
            cpath = cc.get_base_dir() / "config.yml"
            train_s = _train(cc) if not finished_run(cc, settings.contrast_steps) else float("nan")
            t0 = time.perf_counter()
            seg = evaluate_segmentation(cpath, settings.threshold, progress=progress)
            eval_s = time.perf_counter() - t0
            s = seg["summary"]
            r = {"key": key, "row": spec.label, "row_id": row_id, "seed": seed, "scene": scene,
                 "settings": key_settings, "config": str(cpath), "recon_config": str(recon_cfg),
                 "recon_train_s": round(recon_s, 1), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
                 "overall": {**s["overall"], "consistency": consistency(seg["records"])},
                 "per_level": _per_level(s, seg["records"]), "per_object": s["per_object"],
                 "choices": seg["objects"], "unscored": seg.get("unscored", [])}
            _save_result(results_path, r)
            results.append(r)
    return results


def _set_dataparser(config, dataparser: str) -> None:
    if dataparser == "synthetic":
        return
    from pepeseg3d_ns.data.dataparser_configs import lerf_mask, spinnerf

    spec = {"spinnerf": spinnerf, "lerf-mask": lerf_mask}[dataparser]
    config.pipeline.datamanager.dataparser = copy.deepcopy(spec.config)


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------


def _row_order(results: Sequence[Dict]) -> List[str]:
    ids = list(dict.fromkeys(r.get("row_id", r["row"]) for r in results))
    known = [i for i in list(ROWS) + [f"trivial:{k}" for k in TRIVIAL] if i in ids]
    return known + [i for i in ids if i not in known]


def score_matrix(results: Sequence[Dict], row_id: str, level: str, metric: str = "iou",
                 objects: Optional[List[Tuple[str, str]]] = None) -> Tuple[np.ndarray, List, List[Tuple[str, str]]]:
    """``[S, O]`` per-object scores (``metric`` of ``per_object``) of one row at one level over every scene:
    rows = seeds (sorted; a trivial predictor has one), columns = ``(scene, object)``; NaN where a seed lacks an
    object. Returns ``(matrix, seeds, objects)``."""
    rs = [r for r in results if r.get("row_id", r["row"]) == row_id and level in r.get("per_object", {})]
    seeds = sorted({r.get("seed") for r in rs}, key=lambda s: -1 if s is None else s)
    if objects is None:
        objects = sorted({(r["scene"], o) for r in rs for o in r["per_object"][level]})
    col = {o: j for j, o in enumerate(objects)}
    m = np.full((len(seeds), len(objects)), np.nan)
    for r in rs:
        i = seeds.index(r.get("seed"))
        for o, v in r["per_object"][level].items():
            if (r["scene"], o) in col:
                m[i, col[(r["scene"], o)]] = v[metric]
    return m, seeds, objects


def suite_summary(results: Sequence[Dict], metric: str = "iou", reference: str = "baseline",
                  confidence: float = 0.95, n_boot: int = 10000) -> Dict[str, Dict[str, Dict]]:
    """Row id -> level -> ``{"mean", "lo", "hi", "n_seeds", "n_objects"}`` of ``metric`` (the mean over seeds and
    objects of every scene, with its bootstrap interval), plus ``"delta"``: the same for the paired difference to
    row ``reference`` (cells both rows have) when that row is present and this one was trained on its seeds."""
    out: Dict[str, Dict[str, Dict]] = {}
    levels = list(dict.fromkeys(l for r in results for l in r.get("per_object", {})))
    for row_id in _row_order(results):
        out[row_id] = {}
        for level in levels:
            m, seeds, objects = score_matrix(results, row_id, level, metric)
            if m.size == 0 or not np.isfinite(m).any():
                continue
            iv = bootstrap_interval(m, confidence, n_boot)
            cell = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "n_seeds": iv.n_seeds, "n_objects": iv.n_objects}
            if row_id != reference and None not in seeds:
                ref, ref_seeds, _ = score_matrix(results, reference, level, metric, objects)
                common = [s for s in seeds if s in ref_seeds]
                if common:
                    d = m[[seeds.index(s) for s in common]] - ref[[ref_seeds.index(s) for s in common]]
                    if np.isfinite(d).any():
                        dv = bootstrap_interval(d, confidence, n_boot)
                        cell["delta"] = {"mean": dv.mean, "lo": dv.lo, "hi": dv.hi, "n_seeds": dv.n_seeds,
                                         "n_objects": dv.n_objects}
            out[row_id][level] = cell
    return out


def _label(results: Sequence[Dict], row_id: str) -> str:
    return next(r["row"] for r in results if r.get("row_id", r["row"]) == row_id)


def format_suite_table(results: Sequence[Dict], metric: str = "iou", reference: str = "baseline",
                       confidence: float = 0.95, n_boot: int = 10000) -> str:
    """Markdown: per row, each level's mean over seeds and objects with its interval, and (second table) the
    paired difference to row ``reference``."""
    summary = suite_summary(results, metric, reference, confidence, n_boot)
    levels = list(dict.fromkeys(l for cells in summary.values() for l in cells))
    name = {"iou": "mIoU", "biou": "mBIoU", "acc": "mAcc"}.get(metric, metric)
    pct = f"{100 * confidence:g} %"
    head = f"| row | seeds | " + " | ".join(f"{l} {name} [{pct}]" for l in levels) + " |"
    lines = [head, "|" + "---|" * (2 + len(levels))]
    for row_id, cells in summary.items():
        n = max((c["n_seeds"] for c in cells.values()), default=0)
        vals = [f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]" if (c := cells.get(l)) else "–" for l in levels]
        lines.append(f"| {_label(results, row_id)} | {n if not row_id.startswith('trivial:') else '–'} | "
                     + " | ".join(vals) + " |")
    deltas = [(row_id, cells) for row_id, cells in summary.items() if any("delta" in c for c in cells.values())]
    if deltas:
        ref_label = _label(results, reference)
        lines += ["", f"Paired difference to *{ref_label}* (same seeds and objects), {name} [{pct}]:", "",
                  "| row | " + " | ".join(levels) + " |", "|" + "---|" * (1 + len(levels))]
        for row_id, cells in deltas:
            vals = [f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if (d := cells.get(l, {}).get("delta"))
                    else "–" for l in levels]
            lines.append(f"| {_label(results, row_id)} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def format_table(results: Sequence[Dict]) -> str:
    """Markdown: one line per (scene, row), mIoU / mAcc / mBIoU / consistency per level, averaged over seeds."""
    levels = list(dict.fromkeys(l for r in results for l in r["per_level"]))
    head = "| scene | row | " + " | ".join(f"{l} mIoU / mAcc / mBIoU / cons." for l in levels) + " |"
    lines = [head, "|" + "---|" * (2 + len(levels))]
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for r in results:
        groups.setdefault((r["scene"], r["row"]), []).append(r)
    for (scene, row), rs in groups.items():
        cells = []
        for lvl in levels:
            ss = [r["per_level"][lvl] for r in rs if lvl in r["per_level"]]
            if not ss:
                cells.append("–")
                continue
            m = {k: float(np.mean([s[k] for s in ss])) for k in ("miou", "macc", "mbiou", "consistency")}
            cells.append(f"{m['miou']:.3f} / {m['macc']:.3f} / {m['mbiou']:.3f} / {m['consistency']:.2f}")
        lines.append(f"| {scene} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def consistency_figure(results: Sequence[Dict], path: Path) -> Path:
    """Bar chart: cross-view consistency per row (bars) and level (groups), one panel per scene (mean over
    seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = list(dict.fromkeys(r["scene"] for r in results))
    fig, axes = plt.subplots(1, len(scenes), figsize=(5 * len(scenes), 3.9), squeeze=False)
    for ax, scene in zip(axes[0], scenes):
        rs = [r for r in results if r["scene"] == scene]
        rows = list(dict.fromkeys(r["row"] for r in rs))
        levels = list(dict.fromkeys(l for r in rs for l in r["per_level"]))
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            vals = [np.nanmean([r["per_level"].get(l, {}).get("consistency", np.nan) for r in rs if r["row"] == row])
                    for l in levels]
            ax.bar(np.arange(len(levels)) + i * width, vals, width, label=row)
        ax.set_xticks(np.arange(len(levels)) + width * (len(rows) - 1) / 2, levels)
        ax.set_ylim(0, 1)
        ax.set_title(f"{scene}: views where the clicked object keeps its segment (IoU ≥ {CONSISTENT_IOU})", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=max(min(len(labels), 4), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend below the panels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scene_folder_name(scene: str, settings: BenchmarkSettings) -> str:
    """Folder (and nerfstudio experiment) name of a synthetic scene generated with ``settings``."""
    split = f"i{settings.eval_interval}" if settings.eval_interval else "f90"
    return f"{scene}-{settings.resolution}px-{settings.n_views}v-{split}-s{settings.scene_seed}"


def run_benchmark(output_dir: Path = Path("benchmark_out"), scenes: Sequence[str] = SUITE_SCENES,
                  settings: BenchmarkSettings = BenchmarkSettings(), rows: Sequence[str] = (), data: Optional[Path] = None,
                  dataparser: str = "synthetic", progress: bool = True, reference: str = "baseline") -> List[Dict]:
    """The synthetic suite (every scene in ``scenes``, synthesised with simulated priors per seed) or, with
    ``data``, one existing scene folder read by ``dataparser`` (its priors cache must exist: ``pepeseg3d
    priors``). Writes ``<output_dir>/benchmark.md`` (suite table with intervals, paired differences, per-scene
    table), ``benchmark.json`` (settings, summary and every result with its per-object scores) and
    ``consistency.png``; the tables hold every finished result of these scenes with these settings, also rows
    and seeds of earlier invocations, and the paired differences are to row ``reference``. Returns those
    results."""
    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene

    rows = _check_rows(rows)
    output_dir = Path(output_dir)
    out_dirs: List[Path] = []
    if data is not None:
        out_dirs.append(output_dir / Path(data).name)
        run_scene(Path(data), out_dirs[-1], settings, rows, dataparser, progress)
    else:
        for scene in scenes:
            name = scene_folder_name(scene, settings)
            scene_dir = output_dir / "scenes" / name
            with _locked(output_dir / "scenes" / f"{name}.lock"):
                if not (scene_dir / "transforms.json").exists():
                    generate_scene(SynthConfig(scene=scene, output_dir=scene_dir, n_views=settings.n_views,
                                               resolution=settings.resolution, seed=settings.scene_seed,
                                               eval_interval=settings.eval_interval, overwrite=True), progress=progress)
            out_dirs.append(output_dir / name)
            run_scene(scene_dir, out_dirs[-1], settings, rows, "synthetic", progress)
    key = settings.key()
    results = [r for d in out_dirs for r in _load_results(d / "results.json").values() if r.get("settings") == key]
    write_report(results, output_dir, key, reference)
    return results


def write_report(results: Sequence[Dict], output_dir: Path, settings_key: Dict[str, object],
                 reference: str = "baseline") -> None:
    """Write ``benchmark.md`` (suite table with intervals, paired differences to row ``reference``, per-scene
    table), ``benchmark.json`` (``settings_key``, the seeds present, the summary and every result) and
    ``consistency.png`` into ``output_dir`` for ``results`` (dicts as :func:`run_scene` stores them)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    n_scenes = len({r["scene"] for r in results})
    seeds = sorted({r["seed"] for r in results if r.get("seed") is not None})
    table = "\n".join([
        f"Mean over seeds and every object of {n_scenes} scene(s), 95 % bootstrap interval over objects and seeds.",
        "", format_suite_table(results, reference=reference), "mBIoU:", "",
        format_suite_table(results, metric="biou", reference=reference),
        "Per scene (mean over seeds):", "", format_table(results)])
    (output_dir / "benchmark.md").write_text(table)
    (output_dir / "benchmark.json").write_text(json.dumps(
        {"settings": settings_key, "seeds": seeds, "reference": reference,
         "summary": {"iou": suite_summary(results, reference=reference)},
         "results": list(results)}, indent=1))
    consistency_figure(results, output_dir / "consistency.png")


def merge_reports(paths: Sequence[Path], output_dir: Path, reference: str = "baseline") -> List[Dict]:
    """Combine the results of several ``benchmark.json`` files (other scenes, seeds or rows, from other processes
    or machines) into one report in ``output_dir`` (:func:`write_report`). A scene's ``results.json`` (the rows
    of one scene folder finished so far, e.g. of an interrupted run) is read too. Every result must have the same
    settings; a (scene, row, seed) found in two files must carry the same scores there. The paired differences
    are to row ``reference``. Returns the merged results."""
    from pepeseg3d_ns.errors import UserError

    if not paths:
        raise UserError("--merge needs at least one benchmark.json")
    key, merged, origin = None, {}, {}
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if isinstance(data, list):  # a scene folder's results.json: every result carries its settings
                results = data
                keys = [r["settings"] for r in results]
            else:
                results = data["results"]
                keys = [data["settings"]]
            if not all(isinstance(r, dict) and "scene" in r and "row" in r for r in results):
                raise ValueError("a result without scene or row")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"--merge {path}: not a benchmark.json or results.json written by pepeseg3d benchmark "
                            f"({err})") from None
        for file_key in keys:
            if key is None:
                key, first = file_key, path
            elif file_key != key:
                diff = sorted(k for k in set(key) | set(file_key) if key.get(k) != file_key.get(k))
                raise UserError(f"--merge {path}: its settings differ from {first}'s in "
                                + ", ".join(f"{k} ({file_key.get(k)!r} vs {key.get(k)!r})" for k in diff)
                                + "; merge only runs of one setting")
        for r in results:
            ident = (r["scene"], r.get("row_id", r["row"]), r.get("seed"))
            if ident in merged and merged[ident].get("per_object") != r.get("per_object"):
                raise UserError(f"--merge {path}: scene {ident[0]!r}, row {ident[1]!r}, seed {ident[2]} is also in "
                                f"{origin[ident]} with other scores; keep one of the two files")
            merged.setdefault(ident, r)
            origin.setdefault(ident, path)
    results = list(merged.values())
    if not any(r.get("row_id", r["row"]) == reference for r in results):
        raise UserError(f"--reference {reference}: no result of that row in the merged files; name a row they hold")
    write_report(results, output_dir, key, reference)
    return results
