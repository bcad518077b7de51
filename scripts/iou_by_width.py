"""Per-object IoU of one benchmark row against how many pixels across each object is.

Reads a ``benchmark.json`` (``pepeseg3d benchmark`` or ``--merge``) and the synthetic scene folders it was made
on, measures every entity's median width in pixels over the views where it is visible
(``pepeseg3d_ns.data.synthetic.entity_widths``), and prints one markdown table per level: objects binned by
width, their count, mean IoU of the row, and mean IoU at the reference view (the best the propagation could do
on the view it takes the query from).

    python scripts/iou_by_width.py docs/results/suite_128px_40v_i8_seed1.json \
        --scenes-root /work/exp/S2a/scenes /work/exp/S2b/scenes --row full
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pepeseg3d_ns.data.synthetic import entity_widths, load_hierarchy

BINS = ((0, 2, "≤ 2 px"), (2, 5, "3–5 px"), (5, 10, "6–10 px"), (10, 1e9, "> 10 px"))


def _scene_dir(roots: list[Path], scene: str) -> Path:
    for r in roots:
        if (r / scene / "gt" / "hierarchy.json").exists():
            return r / scene
    raise SystemExit(f"iou_by_width: error: no scene folder {scene!r} under {', '.join(map(str, roots))}; "
                     f"pass the benchmark's OUTPUT_DIR/scenes with --scenes-root")


def rows_by_width(results: list[dict], roots: list[Path], row: str) -> dict[str, list[tuple[float, float, float]]]:
    """level -> [(median width px, IoU, reference-view IoU)] for every scored object of ``row``."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for rec in results:
        if rec.get("row_id") != row:
            continue
        scene = _scene_dir(roots, rec["scene"])
        ref = {(c["level"], c["object"]): c["reference_iou"] for c in rec.get("choices", [])}
        for level, objs in rec["per_object"].items():
            names = {str(e["id"]): e["name"] for e in load_hierarchy(scene)[level]}
            widths = entity_widths(scene, level)
            for oid, s in objs.items():
                w = widths[names[oid]]["median"]
                out.setdefault(level, []).append((w, s["iou"], ref.get((level, oid), float("nan"))))
    return out


def format_tables(by_level: dict[str, list[tuple[float, float, float]]]) -> str:
    lines = []
    for level, items in by_level.items():
        lines += [f"**{level}**", "", "| median width | objects | mean IoU | mean IoU at the reference view |",
                  "|---|---|---|---|"]
        for lo, hi, label in BINS:
            sel = [t for t in items if lo < t[0] <= hi]
            if sel:
                lines.append(f"| {label} | {len(sel)} | {statistics.fmean(t[1] for t in sel):.3f} | "
                             f"{statistics.fmean(t[2] for t in sel):.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark_json", type=Path)
    ap.add_argument("--scenes-root", type=Path, nargs="+", required=True,
                    help="folders holding the benchmark's scene folders (OUTPUT_DIR/scenes)")
    ap.add_argument("--row", default="full", help="row id, e.g. full, baseline, paper-exact")
    a = ap.parse_args()
    results = json.loads(a.benchmark_json.read_text())["results"]
    by_level = rows_by_width(results, a.scenes_root, a.row)
    if not by_level:
        raise SystemExit(f"iou_by_width: error: no row {a.row!r} in {a.benchmark_json}")
    print(format_tables(by_level))


if __name__ == "__main__":
    main()
