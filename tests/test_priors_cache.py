"""Tests of the perception-prior cache: MaskSet storage, build_cache / PriorCache, simulated priors, the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pepeseg3d_ns.data.synthetic import LEVELS, SynthConfig, generate_scene, load_gt_depth, load_gt_masks
from pepeseg3d_ns.priors.cache import (
    DEPTH_CONVENTION,
    PriorCache,
    PriorCacheError,
    build_cache,
    image_paths_for,
)
from pepeseg3d_ns.priors.cli import Priors
from pepeseg3d_ns.priors.masks import MaskSet
from pepeseg3d_ns.priors.simulated import SimulatedDepthSource, SimulatedSamSource

N_VIEWS = 6
RES = 48


@pytest.fixture(scope="module")
def scene_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("priors") / "tabletop"
    return generate_scene(SynthConfig(scene="tabletop", output_dir=out, n_views=N_VIEWS, resolution=RES,
                                      n_init_points=300), progress=False)


@pytest.fixture
def scene(scene_src, tmp_path) -> Path:
    """A private copy of the module's scene (tests modify images and caches)."""
    dst = tmp_path / "scene"
    shutil.copytree(scene_src, dst)
    return dst


class Counting:
    """Wraps a source, counts calls per stem, optionally raises on the n-th call."""

    def __init__(self, inner, fail_on_call: int | None = None):
        self.inner = inner
        self.name = inner.name
        self.calls: list[str] = []
        self.fail_on_call = fail_on_call

    def signature(self) -> dict:
        return self.inner.signature()

    def __call__(self, image, stem):
        self.calls.append(stem)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.inner(image, stem)


class FakeMasks:
    """Tiny deterministic mask source: two halves + one square."""

    name = "fake-masks"

    def signature(self) -> dict:
        return {"fake": 1}

    def __call__(self, image, stem):
        h, w = image.shape[:2]
        m = np.zeros((3, h, w), bool)
        m[0, : h // 2] = True
        m[1, h // 2:] = True
        m[2, 2:6, 3:9] = True
        return {"masks": m, "scores": np.array([0.9, 0.8, 0.7], np.float32),
                "stability": np.array([0.95, 0.9, 0.85], np.float32)}


class FakeDepth:
    name = "fake-depth"

    def signature(self) -> dict:
        return {"fake": 1}

    def __call__(self, image, stem):
        h, w = image.shape[:2]
        return np.linspace(0.1, 2.0, h * w, dtype=np.float32).reshape(h, w)


def _sim(scene: Path, severity: float = 1.0, seed: int = 0):
    return SimulatedSamSource(scene, severity=severity, seed=seed), SimulatedDepthSource(scene, severity, seed)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask in a [M, H, W] with b [H, W]."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


# ------------------------------------------------------------------------------------------------ MaskSet


def test_maskset_roundtrip_areas_bboxes(tmp_path):
    rng = np.random.default_rng(0)
    m = np.zeros((4, 7, 13), bool)  # H*W = 91: not a multiple of 8
    m[0, 1:3, 2:6] = True  # x0=2, y0=1, w=4, h=2
    m[1, 6, 12] = True  # last pixel
    m[2] = rng.random((7, 13)) < 0.3
    # m[3] empty
    ms = MaskSet.from_dense(m, scores=[0.9, 0.8, 0.7, 0.6], stability=[1, 1, 0.5, 0.1], meta={"labels": list("abcd")})
    assert ms.bits.dtype == np.uint8 and ms.bits.shape == (4, 12)
    assert ms.areas.tolist() == [8, 1, int(m[2].sum()), 0]
    assert ms.bboxes[0].tolist() == [2, 1, 4, 2]
    assert ms.bboxes[1].tolist() == [12, 6, 1, 1]
    assert ms.bboxes[3].tolist() == [0, 0, 0, 0]
    ys, xs = np.nonzero(m[2])
    assert ms.bboxes[2].tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert np.array_equal(ms.to_dense(), m) and np.array_equal(ms.mask(2), m[2])
    path = ms.save(tmp_path / "a.npz")
    assert not list(tmp_path.glob("*.tmp*"))
    back = MaskSet.load(path)
    assert np.array_equal(back.to_dense(), m) and back.shape == (7, 13) and len(back) == 4
    assert np.allclose(back.scores, [0.9, 0.8, 0.7, 0.6]) and back.scores.dtype == np.float32
    assert back.meta["labels"] == list("abcd")
    t = back.to_torch("cpu")
    assert t.dtype.is_floating_point is False and tuple(t.shape) == (4, 7, 13) and bool((t.numpy() == m).all())

    srt = ms.sorted_by_area()
    assert srt.areas.tolist() == sorted(ms.areas.tolist()) and srt.meta["labels"] == ["d", "b", "a", "c"]

    small = ms.resized(4, 6)
    assert small.shape == (4, 6) and small.bits.shape == (4, 3) and len(small) == 4
    assert np.array_equal(small.areas, small.to_dense().sum(axis=(1, 2)))
    big = ms.resized(14, 26)  # exact 2x upsampling by nearest
    assert np.array_equal(big.to_dense(), m.repeat(2, axis=1).repeat(2, axis=2))
    assert big.areas.tolist() == [4 * a for a in ms.areas.tolist()]


def test_maskset_empty_and_bad_files(tmp_path):
    e = MaskSet.from_dense(np.zeros((0, 5, 6), bool))
    assert len(e) == 0 and e.to_dense().shape == (0, 5, 6)
    back = MaskSet.load(e.save(tmp_path / "e.npz"))
    assert len(back) == 0 and back.resized(3, 3).to_dense().shape == (0, 3, 3)
    assert len(back.sorted_by_area()) == 0
    # inconsistent arrays -> ValueError naming the file
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.array("pepeseg3d-maskset-v1"), shape=np.array([5, 6]), bits=np.zeros((2, 3), np.uint8),
             areas=np.zeros(2, np.int64), scores=np.zeros(2, np.float32), stability=np.zeros(2, np.float32),
             bboxes=np.zeros((2, 4), np.int32), meta=np.array("{}"))
    with pytest.raises(ValueError, match="bad.npz"):
        MaskSet.load(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        MaskSet.load(junk)
    with pytest.raises(ValueError, match="e.npz.*5x6.*7x8"):
        MaskSet.load(tmp_path / "e.npz", expected_shape=(7, 8))


# ------------------------------------------------------------------------------------------------ cache


def test_image_paths_for(scene, tmp_path):
    paths = image_paths_for(scene)
    assert len(paths) == N_VIEWS and paths == sorted(paths) and all(p.is_file() for p in paths)
    with pytest.raises(FileNotFoundError, match="transforms.json"):
        image_paths_for(tmp_path / "nowhere")


def test_build_cache_simulated_and_skip(scene):
    paths = image_paths_for(scene)
    ms, ds = (Counting(s) for s in _sim(scene))
    cache = build_cache(scene, paths, ms, ds, progress=False)
    root = scene / "pepe_priors"
    assert cache.cache_dir == root and cache.last_build.computed == N_VIEWS
    man = json.loads((root / "manifest.json").read_text())
    assert man["version"] == 1 and man["kind"] == "simulated"
    assert man["mask_source"]["name"] == "simulated" and man["mask_source"]["signature"]["simulated"] is True
    assert man["depth_source"]["signature"]["class"] == "SimulatedDepthSource"
    assert man["depth_convention"] == DEPTH_CONVENTION
    assert sorted(man["images"]) == [p.stem for p in paths]
    e = man["images"]["frame_00000"]
    assert e["file"] == "images/frame_00000.png" and (e["height"], e["width"]) == (RES, RES)
    assert (root / e["masks"]).is_file() and (root / e["depth"]).is_file()
    assert np.load(root / e["depth"]).dtype == np.float16
    opened = PriorCache.open(scene)
    assert opened.has("frame_00000") and not opened.has("frame_99999")
    m = opened.load_masks("frame_00000")
    assert m.shape == (RES, RES) and len(m) == e["n_masks"] > 0 and "labels" in m.meta
    d = opened.load_depth("frame_00000")
    assert d.dtype == np.float32 and d.shape == (RES, RES) and np.isfinite(d).all()
    opened.validate(paths)
    assert not list(root.rglob("*.tmp*"))

    # second run: nothing computed
    ms2, ds2 = (Counting(s) for s in _sim(scene))
    c2 = build_cache(scene, paths, ms2, ds2, progress=False)
    assert ms2.calls == [] and ds2.calls == [] and c2.last_build.skipped == N_VIEWS

    # keys added by later stages survive a rebuild
    man = json.loads((root / "manifest.json").read_text())
    man["scales"] = {"frame_00000": [0.5]}
    (root / "manifest.json").write_text(json.dumps(man))
    # changing the severity recomputes both sources for every image (one log line each)
    ms3, ds3 = (Counting(s) for s in _sim(scene, severity=0.5))
    build_cache(scene, paths, ms3, ds3, progress=False)
    assert len(ms3.calls) == N_VIEWS and len(ds3.calls) == N_VIEWS
    man = json.loads((root / "manifest.json").read_text())
    assert man["scales"] == {"frame_00000": [0.5]} and man["mask_source"]["signature"]["severity"] == 0.5

    # a mask-source-only change keeps the depth
    ms4 = Counting(FakeMasks())
    ds4 = Counting(SimulatedDepthSource(scene, 0.5, 0))
    build_cache(scene, paths, ms4, ds4, progress=False)
    assert len(ms4.calls) == N_VIEWS and ds4.calls == []
    assert PriorCache.open(scene).kind == "simulated"


def test_changed_image_and_force(scene, caplog):
    paths = image_paths_for(scene)
    build_cache(scene, paths, FakeMasks(), FakeDepth(), progress=False)
    cache = PriorCache.open(scene)
    assert cache.kind == "computed"
    # modify one image's bytes
    target = paths[3]
    img = np.array(Image.open(target))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(target)
    with pytest.raises(PriorCacheError) as exc:
        cache.validate(paths)
    msg = str(exc.value)
    assert "changed since the cache was built" in msg and target.as_posix() in msg
    assert f"pepeseg3d priors --data {scene}" in msg
    for p in paths:
        if p != target:
            assert p.as_posix() not in msg
    ms, ds = Counting(FakeMasks()), Counting(FakeDepth())
    build_cache(scene, paths, ms, ds, progress=False)
    assert ms.calls == [target.stem] and ds.calls == [target.stem]
    PriorCache.open(scene).validate(paths)
    # a missing image is reported as missing
    extra = scene / "images" / "frame_00042.png"
    shutil.copy(paths[0], extra)
    with pytest.raises(PriorCacheError, match="missing from the cache.*frame_00042"):
        PriorCache.open(scene).validate(paths + [extra])
    # force recomputes all
    ms, ds = Counting(FakeMasks()), Counting(FakeDepth())
    build_cache(scene, paths, ms, ds, progress=False, force=True)
    assert len(ms.calls) == N_VIEWS and len(ds.calls) == N_VIEWS
    # signature change: one log line
    with caplog.at_level(logging.WARNING, logger="pepeseg3d_ns.priors.cache"):
        build_cache(scene, paths, FakeMasks(), Counting(SimulatedDepthSource(scene, 1.0, 0)), progress=False)
    lines = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert len(lines) == 1 and "depth source changed" in lines[0]


def test_crash_midway_resumes(scene):
    paths = image_paths_for(scene)
    ms = Counting(SimulatedSamSource(scene), fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(scene, paths, ms, SimulatedDepthSource(scene), progress=False)
    root = scene / "pepe_priors"
    man = json.loads((root / "manifest.json").read_text())
    assert sorted(man["images"]) == [p.stem for p in paths[:2]]
    assert not list(root.rglob("*.tmp*"))
    with pytest.raises(PriorCacheError, match="missing from the cache"):
        PriorCache.open(scene).validate(paths)
    ms2, ds2 = Counting(SimulatedSamSource(scene)), Counting(SimulatedDepthSource(scene))
    build_cache(scene, paths, ms2, ds2, progress=False)
    assert ms2.calls == [p.stem for p in paths[2:]] and ds2.calls == [p.stem for p in paths[2:]]
    PriorCache.open(scene).validate(paths)


def test_wrong_size_files_are_named(scene):
    paths = image_paths_for(scene)
    cache = build_cache(scene, paths, FakeMasks(), FakeDepth(), progress=False)
    stem = paths[1].stem
    bad_masks = cache.cache_dir / "masks" / f"{stem}.npz"
    MaskSet.from_dense(np.ones((2, RES // 2, RES // 2), bool)).save(bad_masks)
    with pytest.raises(ValueError, match=f"{stem}.npz.*{RES // 2}x{RES // 2}"):
        cache.load_masks(stem)
    with pytest.raises(PriorCacheError, match=f"{stem}.npz"):
        cache.validate(paths)
    bad_depth = cache.cache_dir / "depth" / f"{paths[2].stem}.npy"
    np.save(bad_depth, np.zeros((RES, RES + 1), np.float16))
    with pytest.raises(PriorCacheError, match=f"{paths[2].stem}.npy"):
        cache.load_depth(paths[2].stem)
    with pytest.raises(PriorCacheError, match="not in the prior cache"):
        cache.load_masks("frame_99999")
    with pytest.raises(PriorCacheError, match="pepeseg3d priors --data"):
        PriorCache.open(scene / "images")


def test_source_with_wrong_output_shape(scene):
    class Bad(FakeMasks):
        def __call__(self, image, stem):
            return {"masks": np.zeros((1, 3, 3), bool), "scores": np.ones(1), "stability": np.ones(1)}

    with pytest.raises(PriorCacheError, match="expected \\[M, 48, 48\\]"):
        build_cache(scene, image_paths_for(scene), Bad(), FakeDepth(), progress=False)


# ------------------------------------------------------------------------------------------------ simulated priors


def test_simulated_severity0_is_gt(scene_src):
    src = SimulatedSamSource(scene_src, severity=0)
    for i in range(N_VIEWS):
        stem = f"frame_{i:05d}"
        out = src(None, stem)
        masks = out["masks"]
        assert masks.dtype == bool and masks.shape[1:] == (RES, RES)
        assert np.all(out["scores"] == 1) and np.all(out["stability"] == 1)
        keys = {np.packbits(m).tobytes() for m in masks}
        assert len(keys) == len(masks)  # deduplicated
        n_gt = set()
        for lvl in LEVELS:
            gt = load_gt_masks(scene_src, stem, lvl)
            for j in np.unique(gt):
                if j == 0:
                    continue
                key = np.packbits(gt == j).tobytes()
                assert key in keys, f"{stem} {lvl}:{j} missing"
                n_gt.add(key)
        bg = load_gt_masks(scene_src, stem, "groups") == 0
        extra = [m for m in masks if np.packbits(m).tobytes() not in n_gt]
        # besides GT instances: only background regions (ground, sky) that partition the background
        assert 1 <= len(extra) <= 2 and np.array_equal(np.logical_or.reduce(extra), bg)
        assert all(lab.startswith("background") for lab, m in zip(out["labels"], masks)
                   if np.packbits(m).tobytes() not in n_gt)


def test_simulated_severity1_imperfect_but_close(scene_src):
    src = SimulatedSamSource(scene_src, severity=1.0, seed=0)
    clean = SimulatedSamSource(scene_src, severity=0)
    n_obj = n_match = 0
    differs = spurious = 0
    for i in range(N_VIEWS):
        stem = f"frame_{i:05d}"
        out = src(None, stem)
        masks = out["masks"]
        assert len(masks) == len(out["scores"]) == len(out["stability"])
        assert np.all((out["scores"] > 0) & (out["scores"] <= 1))
        ref = clean(None, stem)["masks"]
        differs += len(ref) != len(masks) or not np.array_equal(np.sort([m.sum() for m in ref]),
                                                                np.sort([m.sum() for m in masks]))
        spurious += sum(lab.startswith("spurious") for lab in out["labels"])
        lab = np.asarray(out["labels"])
        if len(masks):
            is_sp = np.char.startswith(lab, "spurious")
            if is_sp.any() and (~is_sp).any():
                assert out["scores"][is_sp].mean() < out["scores"][~is_sp].mean()
        objs = load_gt_masks(scene_src, stem, "objects")
        for o in np.unique(objs):
            m = objs == o
            if o == 0 or m.sum() < 20:
                continue
            n_obj += 1
            n_match += bool(len(masks)) and _iou(masks, m).max() > 0.8
    assert differs >= N_VIEWS - 1 and spurious >= 1
    assert n_obj >= 10 and n_match / n_obj > 0.5, (n_match, n_obj)
    # deterministic given seed, different for another seed
    a, b = src(None, "frame_00002"), SimulatedSamSource(scene_src, severity=1.0, seed=0)(None, "frame_00002")
    assert np.array_equal(a["masks"], b["masks"]) and np.array_equal(a["scores"], b["scores"])
    c = SimulatedSamSource(scene_src, severity=1.0, seed=1)(None, "frame_00002")
    assert a["masks"].shape != c["masks"].shape or not np.array_equal(a["masks"], c["masks"])


def test_simulated_depth(scene_src):
    src = SimulatedDepthSource(scene_src, severity=1.0, seed=0)
    fits = []
    for i in range(N_VIEWS):
        stem = f"frame_{i:05d}"
        y = src(None, stem).astype(np.float64).ravel()
        x = 1.0 / load_gt_depth(scene_src, stem).astype(np.float64).ravel()
        a = np.stack([x, np.ones_like(x)], axis=1)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        r2 = 1 - np.var(y - a @ coef) / np.var(y)
        assert r2 > 0.95, (stem, r2)
        fits.append(coef)
        assert src(None, stem).dtype == np.float32
    fits = np.array(fits)
    assert np.ptp(fits[:, 0]) > 0.1  # the scale differs between views
    assert np.array_equal(src(None, "frame_00001"), SimulatedDepthSource(scene_src, 1.0, 0)(None, "frame_00001"))
    exact = SimulatedDepthSource(scene_src, severity=0)(None, "frame_00001")
    assert np.allclose(exact, 1.0 / load_gt_depth(scene_src, "frame_00001"))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_simulated_auto(scene, capsys):
    Priors(data=scene, progress=False).main()
    out = capsys.readouterr().out
    assert "simulated" in out and f"{N_VIEWS} computed" in out and "masks/image" in out
    cache = PriorCache.open(scene)
    assert cache.kind == "simulated" and len(cache.stems) == N_VIEWS
    cache.validate(image_paths_for(scene))
    Priors(data=scene, progress=False).main()
    assert f"0 computed, {N_VIEWS} skipped" in capsys.readouterr().out


def test_cli_real_without_checkpoint(scene):
    tf = scene / "transforms.json"
    meta = json.loads(tf.read_text())
    meta.pop("pepe_synthetic")
    tf.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exc:
        Priors(data=scene, device="cpu", progress=False).main()
    assert "--sam-checkpoint" in str(exc.value.code)
    assert not (scene / "pepe_priors" / "manifest.json").exists()
    with pytest.raises(SystemExit, match="pepe_synthetic"):
        Priors(data=scene, simulated=True, progress=False).main()


def test_cli_real_sources_with_tiny_models(scene, tmp_path):
    """The non-simulated path end to end, through the real SAM / Depth-Anything loaders (tiny random weights)."""
    pytest.importorskip("segment_anything")
    pytest.importorskip("transformers")
    from pepeseg3d_ns.priors.tiny_models import build_tiny_depth_anything, build_tiny_sam

    ckpt = build_tiny_sam(tmp_path / "sam")
    da = build_tiny_depth_anything(tmp_path / "da")
    kw = dict(sam_checkpoint=ckpt, depth_model=str(da), device="cpu", points_per_side=4, pred_iou_thresh=0.0,
              stability_score_thresh=0.0, min_mask_region_area=0, progress=False)
    Priors(data=scene, **kw).main()  # a synthetic scene, but a checkpoint was given: real sources
    cache = PriorCache.open(scene)
    assert cache.kind == "computed" and cache.manifest["mask_source"]["name"] == "sam"
    assert cache.manifest["depth_source"]["name"] == "depth-anything-v2"
    paths = image_paths_for(scene)
    cache.validate(paths)
    assert cache.load_masks(paths[0].stem).shape == (RES, RES)
    assert cache.load_depth(paths[0].stem).shape == (RES, RES)
    with pytest.raises(SystemExit, match="not found"):
        Priors(data=scene, **{**kw, "sam_checkpoint": tmp_path / "nope.pth"}).main()
