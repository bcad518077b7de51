"""Label propagation (eval/propagation.py) on a hand-made feature field whose answer is known.

The "model" below renders a feature field we draw ourselves, view by view, so every IoU the protocol should
report is computed here from the masks; everything else is the real code: reference choice, HDBSCAN query per
scale, scale selection on the reference view, segmentation by cosine and opacity, and the real metrics.

Field (D = 5, gate ``psi(s) = [1, 1, 1-s, 1-s, 1-s]``): object A has parts p1 (left) and p2 (right) with features
``e0 + 2 e2`` and ``e0 + 2 e3``; object B is one part p3 with ``e1 + 2 e4``. At ``s <= 0.6`` p1 and p2 have cosine
< 0.7 (parts separate), at ``s >= 0.7`` both are ``~e0`` (object A whole). The background is transparent but its
feature is A's, so a segment that ignored opacity would swallow it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from nerfstudio.cameras.cameras import Cameras

from pepeseg3d_ns.data.gt_masks import GtMasks, index_id_maps
from pepeseg3d_ns.eval.metrics import iou
from pepeseg3d_ns.eval.propagation import PropagationConfig, propagate_labels, trivial_baseline

H = W = 32
D = 5
E = torch.eye(D)
F_P1, F_P2, F_P3 = E[0] + 2 * E[2], E[0] + 2 * E[3], E[1] + 2 * E[4]
# "A, but drifted": cosine 0.6 to e0, 0.51 to A's query at s = 0.7, 0.36 to B's at s = 0 (all below 0.7)
F_DRIFT = 0.6 * E[0] + 0.8 * E[1]


def _layout(x0: int, w1: int, w2: int, bx: int) -> Dict[str, np.ndarray]:
    """Masks of one view: A = rows 4..19, p1 = cols x0..x0+w1, p2 = next w2 cols; B = rows 22..29, cols bx..bx+8."""
    p1 = np.zeros((H, W), bool)
    p2 = np.zeros((H, W), bool)
    p3 = np.zeros((H, W), bool)
    p1[4:20, x0:x0 + w1] = True
    p2[4:20, x0 + w1:x0 + w1 + w2] = True
    p3[22:30, bx:bx + 8] = True
    return {"p1": p1, "p2": p2, "p3": p3}


class _View:
    def __init__(self, masks: Dict[str, np.ndarray], swap_p2_to_b: bool = False, drift_a: bool = False, seed: int = 0):
        self.masks = masks
        feats = torch.zeros(H, W, D)
        feats[:] = F_P1  # background: A's feature, but transparent
        alpha = torch.zeros(H, W, 1)
        p1, p2, p3 = (torch.from_numpy(masks[k]) for k in ("p1", "p2", "p3"))
        feats[p1] = F_DRIFT if drift_a else F_P1
        feats[p2] = F_P3 if swap_p2_to_b else (F_DRIFT if drift_a else F_P2)
        feats[p3] = F_P3
        alpha[p1 | p2 | p3] = 1.0
        g = torch.Generator().manual_seed(seed)
        self.features = feats + 0.01 * torch.randn(H, W, D, generator=g)  # HDBSCAN needs some spread
        self.alpha = alpha


class FieldModel:
    """The interface propagation uses: ``device``, ``training``/``eval``/``train``, ``render_feature_map(camera)``
    and ``gate(s)``. A camera is identified by its (split, index) stored in its translation."""

    device = torch.device("cpu")

    def __init__(self, views: Dict[Tuple[int, int], _View]):
        self.views = views
        self.training = False

    def eval(self):
        self.training = False

    def train(self, mode: bool = True):
        self.training = mode

    def render_feature_map(self, camera: Cameras):
        t = camera.camera_to_worlds[0, :, 3]
        v = self.views[(int(t[0]), int(t[1]))]
        return v.features.clone(), v.alpha.clone()

    @staticmethod
    def gate(s: float) -> torch.Tensor:
        g = 1.0 - float(s)
        return torch.tensor([[1.0, 1.0, g, g, g]])


def _cameras(split_id: int, n: int) -> Cameras:
    c2w = torch.zeros(n, 3, 4)
    c2w[:, :3, :3] = torch.eye(3)
    c2w[:, 0, 3] = torch.arange(n, dtype=torch.float32)
    c2w[:, 1, 3] = float(split_id)
    return Cameras(camera_to_worlds=c2w, fx=30.0, fy=30.0, cx=W / 2, cy=H / 2, width=W, height=H)


def _id_maps(tmp: Path, split: str, views: List[_View]) -> GtMasks:
    """Synthetic-style ground truth: parts / objects id maps (p1=1, p2=2, p3=3; A=1, B=2)."""
    from PIL import Image

    maps: Dict[str, Dict[int, Path]] = {"parts": {}, "objects": {}}
    for i, v in enumerate(views):
        parts = np.zeros((H, W), np.uint16)
        parts[v.masks["p1"]], parts[v.masks["p2"]], parts[v.masks["p3"]] = 1, 2, 3
        objs = np.zeros((H, W), np.uint16)
        objs[v.masks["p1"] | v.masks["p2"]], objs[v.masks["p3"]] = 1, 2
        for lvl, arr in (("parts", parts), ("objects", objs)):
            path = tmp / split / lvl / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            maps[lvl][i] = path
    return GtMasks("synthetic", split, [f"{i:03d}.png" for i in range(len(views))], id_maps=maps,
                   level_ids=index_id_maps(maps))


def _binary(tmp: Path, views: List[_View]) -> GtMasks:
    """LERF-Mask-style ground truth of the evaluation views: one binary mask per prompt ("A", "B") and view."""
    from PIL import Image

    files: Dict[int, Dict[str, Path]] = {}
    for i, v in enumerate(views):
        for name, m in (("A", v.masks["p1"] | v.masks["p2"]), ("B", v.masks["p3"])):
            path = tmp / "test_mask" / str(i) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((m * 255).astype(np.uint8)).save(path)
            files.setdefault(i, {})[name] = path
    return GtMasks("lerf-mask", "test", [f"{i:03d}.png" for i in range(len(views))], objects=["A", "B"], files=files)


def _pipeline(train_views, eval_views, train_gt, eval_gt):
    views = {(i, 0): v for i, v in enumerate(train_views)} | {(i, 1): v for i, v in enumerate(eval_views)}

    def ds(split_id, vs, gt):
        return SimpleNamespace(cameras=_cameras(split_id, len(vs)),
                               _dataparser_outputs=SimpleNamespace(metadata={"gt_masks": gt}))

    dm = SimpleNamespace(train_dataset=ds(0, train_views, train_gt), eval_dataset=ds(1, eval_views, eval_gt))
    return SimpleNamespace(model=FieldModel(views), datamanager=dm)


# training views: A is largest in view 2 (widths 7 + 7); eval view 1 has p2 rendered with B's feature
TRAIN = [_View(_layout(2, 5, 5, 3), seed=1), _View(_layout(6, 4, 6, 10), seed=2), _View(_layout(3, 7, 7, 18), seed=3)]
EVAL = [_View(_layout(4, 6, 6, 20), seed=4), _View(_layout(10, 6, 4, 2), swap_p2_to_b=True, seed=5),
        _View(_layout(1, 8, 8, 12), seed=6)]


@pytest.fixture(scope="module")
def synthetic_like(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("field")
    return _pipeline(TRAIN, EVAL, _id_maps(tmp, "train", TRAIN), _id_maps(tmp, "eval", EVAL))


def _expected_synthetic() -> Dict[str, Dict[str, float]]:
    """Per-object mean IoU that a correct protocol reports on EVAL (computed from the masks)."""
    per_view = {"parts": {"1": [], "2": [], "3": []}, "objects": {"1": [], "2": []}}
    for v in EVAL:
        m = v.masks
        a, b = m["p1"] | m["p2"], m["p3"]
        if v is EVAL[1]:  # p2 looks like B: A's query (s >= 0.7) finds p1 only, B's query finds B and p2
            per_view["parts"]["1"].append(1.0)
            per_view["parts"]["2"].append(0.0)
            per_view["parts"]["3"].append(iou(b | m["p2"], b))
            per_view["objects"]["1"].append(iou(m["p1"], a))
            per_view["objects"]["2"].append(iou(b | m["p2"], b))
        else:
            for k in ("1", "2", "3"):
                per_view["parts"][k].append(1.0)
            per_view["objects"]["1"].append(1.0)
            per_view["objects"]["2"].append(1.0)
    return {lvl: {o: float(np.mean(v)) for o, v in objs.items()} for lvl, objs in per_view.items()}


def test_known_answer_per_object_and_level(synthetic_like):
    out = propagate_labels(synthetic_like, progress=False)
    expected = _expected_synthetic()
    per_object = out["summary"]["per_object"]
    for level, objs in expected.items():
        for obj, value in objs.items():
            assert per_object[level][obj]["iou"] == pytest.approx(value, abs=1e-9), (level, obj)
            assert per_object[level][obj]["n_views"] == 3
        assert out["summary"]["per_level"][level]["miou"] == pytest.approx(np.mean(list(objs.values())), abs=1e-9)
    assert out["unscored"] == []


def test_scale_chosen_per_level_on_the_reference(synthetic_like):
    """Parts need s <= 0.6 (p1 and p2 apart), object A needs s >= 0.7 (p1 and p2 together): one fixed scale
    cannot give both, so this fails when the per-object scale selection is removed."""
    out = propagate_labels(synthetic_like, progress=False)
    choice = {(c["level"], c["object"]): c for c in out["objects"]}
    assert choice[("parts", "1")]["scale"] <= 0.6 and choice[("parts", "2")]["scale"] <= 0.6
    assert choice[("objects", "1")]["scale"] >= 0.7
    assert all(c["reference_iou"] == 1.0 for c in out["objects"])
    # reference = the training view with the largest mask: A (and its parts) in view 2, B everywhere equal -> view 0
    assert choice[("objects", "1")]["reference"] == "train:2"
    assert choice[("parts", "2")]["reference"] == "train:2"
    assert choice[("objects", "2")]["reference"] == "train:0"


def test_transparent_pixels_are_never_selected(synthetic_like):
    """The background carries A's feature at zero opacity; with min_alpha = 0 it would join A's segment."""
    strict = propagate_labels(synthetic_like, progress=False)["summary"]["per_object"]["parts"]["1"]["iou"]
    loose = propagate_labels(synthetic_like, PropagationConfig(min_alpha=0.0), progress=False)
    assert strict == 1.0 and loose["summary"]["per_object"]["parts"]["1"]["iou"] < 0.5


def test_trivial_baselines_score_below_the_field(synthetic_like):
    field = propagate_labels(synthetic_like, progress=False)["summary"]["per_level"]
    for kind in ("bbox", "foreground"):
        base = trivial_baseline(synthetic_like, kind)
        # same (object, view) pairs as the protocol
        assert base["summary"]["per_level"]["parts"]["n_views"] == field["parts"]["n_views"]
        for level in ("parts", "objects"):
            assert base["summary"]["per_level"][level]["miou"] < field[level]["miou"] - 0.2, (kind, level)
    # all foreground on object B (8x8 of A's 16 x 12..16 + 64 px): |B| / |A u B| per view
    fg = trivial_baseline(synthetic_like, "foreground")["summary"]["per_object"]["objects"]["2"]["iou"]
    exp = np.mean([iou(v.masks["p1"] | v.masks["p2"] | v.masks["p3"], v.masks["p3"]) for v in EVAL])
    assert fg == pytest.approx(exp)
    # the box of B's reference (train view 0, cols 3..10) on the eval views
    bb = trivial_baseline(synthetic_like, "bbox")["summary"]["per_object"]["objects"]["2"]["iou"]
    box = np.zeros((H, W), bool)
    box[22:30, 3:11] = True
    assert bb == pytest.approx(np.mean([iou(box, v.masks["p3"]) for v in EVAL]))


def test_lerf_mask_branch_scores_every_test_view(tmp_path):
    """No training-view masks (LERF-Mask): the reference is the first test view with a mask, and that view is
    scored with the query of the second one. Here A drifts in test view 1 (its query finds nothing of A in
    view 0), so A's IoUs are view 0: 0 (scored with view 1's query), view 1: 0 (view 0's query misses the drifted
    A), views 2, 3: 1. Scoring view 0 with its own mask's query would give 1 there; leaving it out, 2/3."""
    views = [_View(_layout(4, 6, 6, 20), seed=4), _View(_layout(10, 6, 4, 2), drift_a=True, seed=5),
             _View(_layout(1, 8, 8, 12), seed=6), _View(_layout(5, 5, 5, 14), seed=7)]
    train = [_View(_layout(2, 5, 5, 3), seed=1)]
    pipe = _pipeline(train, views, GtMasks("lerf-mask", "train", ["t.png"]), _binary(tmp_path, views))
    out = propagate_labels(pipe, progress=False)
    per_object = out["summary"]["per_object"]["mask"]
    assert per_object["A"]["n_views"] == per_object["B"]["n_views"] == 4  # every test view is scored
    views_of_a = {r["view"]: r["iou"] for r in out["records"] if r["object"] == "A"}
    assert views_of_a == pytest.approx({0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0})
    assert per_object["B"]["iou"] == 1.0
    choice = {c["object"]: c for c in out["objects"]}
    assert choice["A"]["reference"] == "eval:0" and choice["A"]["own_view_reference"]["reference"] == "eval:1"
    # an object seen in one test view only cannot be scored without its own mask
    one = [views[0], _View(_layout(1, 8, 8, 12), seed=8)]
    gt = _binary(tmp_path / "one", one)
    del gt.files[1]["A"]
    out = propagate_labels(_pipeline(train, one, GtMasks("lerf-mask", "train", ["t.png"]), gt), progress=False)
    assert out["unscored"] == ["mask/A"] and set(out["summary"]["per_object"]["mask"]) == {"B"}
