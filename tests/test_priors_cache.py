"""Tests of the perception-prior cache: MaskSet storage, PriorCache / compute_priors (keys, damage, repair,
concurrency, shards), simulated priors, the `pepeseg3d priors` CLI (check, export, import)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pepeseg3d_ns.data.synthetic import LEVELS, SynthConfig, generate_scene, load_gt_depth, load_gt_masks
from pepeseg3d_ns.priors.cache import PriorCache, PriorCacheError, load_image_rgb
from pepeseg3d_ns.priors.compute import PriorImage, compute_priors
from pepeseg3d_ns.errors import UserError
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


def _images(scene: Path) -> list:
    return [PriorImage(p.stem, load_image_rgb(p), f"images/{p.name}") for p in sorted((scene / "images").glob("*.png"))]


def _cache(scene: Path) -> PriorCache:
    return PriorCache.open(scene / "pepe_priors", create=True)


def test_entries_keyed_by_pixels_and_skipped_when_healthy(scene):
    images = _images(scene)
    cache = _cache(scene)
    masks, depth = Counting(FakeMasks()), Counting(FakeDepth())
    st = compute_priors(cache, images, masks, depth, progress=False)
    assert (st.computed, st.skipped, st.repaired) == (N_VIEWS, 0, [])
    assert sorted(cache.keys()) == sorted(im.key for im in images)
    pri = cache.load(images[1].key)
    assert pri.masks.shape == (RES, RES) and len(pri.masks) == 3 and pri.depth.dtype == np.float32
    np.testing.assert_allclose(pri.depth, FakeDepth()(images[1].image, "x"), rtol=1e-3)
    e = pri.entry
    assert e["stem"] == images[1].stem and e["masks"]["kind"] == "computed" and e["source_file"].startswith("images/")
    st = compute_priors(cache, images, masks, depth, progress=False)
    assert (st.computed, st.skipped) == (0, N_VIEWS) and len(masks.calls) == N_VIEWS
    # the same stem with other pixels (a changed photo, another undistortion or downscale) is another key
    other = PriorImage(images[0].stem, 255 - images[0].image)
    assert other.key != images[0].key and other.key.startswith(images[0].stem + "-")
    compute_priors(cache, [other], masks, depth, progress=False)
    assert len(masks.calls) == N_VIEWS + 1 and cache.check_entry(images[0].key) is None


def test_changed_source_recomputes_only_that_prior(scene):
    images = _images(scene)
    cache = _cache(scene)
    compute_priors(cache, images, FakeMasks(), FakeDepth(), progress=False)

    class OtherDepth(FakeDepth):
        def signature(self):
            return {"fake": 2}

    masks = Counting(FakeMasks())
    st = compute_priors(cache, images, masks, OtherDepth(), progress=False)
    assert st.computed == N_VIEWS and st.depth_computed == N_VIEWS and st.masks_computed == 0 and masks.calls == []
    assert all(cache.read_entry(im.key)["depth"]["source"]["signature"] == {"fake": 2} for im in images)
    st = compute_priors(cache, images, FakeMasks(), OtherDepth(), force=True, progress=False)
    assert st.masks_computed == N_VIEWS


def _damage(cache: PriorCache, keys: list) -> None:
    """Four kinds of damage on four entries: truncated masks, truncated depth, a bad field, a wrong JSON shape."""
    m = cache.cache_dir / "masks" / f"{keys[0]}.npz"
    m.write_bytes(m.read_bytes()[:40])
    d = cache.cache_dir / "depth" / f"{keys[1]}.npy"
    d.write_bytes(d.read_bytes()[:100])
    e = json.loads(cache.entry_path(keys[2]).read_text())
    e["height"] = "48"
    cache.entry_path(keys[2]).write_text(json.dumps(e))
    cache.entry_path(keys[3]).write_text(json.dumps([1, 2, 3]))


def test_damaged_entries_are_named_and_repaired_by_one_rerun(scene):
    images = _images(scene)
    cache = _cache(scene)
    compute_priors(cache, images, FakeMasks(), FakeDepth(), progress=False)
    keys = [im.key for im in images]
    _damage(cache, keys)
    problems = [cache.check_entry(k) for k in keys]
    assert "masks/" in problems[0] and "does not match its entry" in problems[0]
    assert "depth/" in problems[1]
    assert "'height'" in problems[2] and keys[2] in problems[2]
    assert "expected a JSON object" in problems[3]
    assert all(p is None for p in problems[4:])
    with pytest.raises(PriorCacheError, match="re-run `pepeseg3d priors`"):
        cache.load(keys[0])
    st = compute_priors(cache, images, FakeMasks(), FakeDepth(), progress=False)
    assert st.computed == 4 and st.skipped == N_VIEWS - 4 and len(st.repaired) == 4
    assert all(cache.check_entry(k) is None for k in keys)


def test_crash_midway_resumes(scene):
    images = _images(scene)
    cache = _cache(scene)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_priors(cache, images, Counting(FakeMasks(), fail_on_call=4), FakeDepth(), progress=False)
    assert len(cache.keys()) == 3 and not list(cache.cache_dir.rglob("*.tmp-*"))
    masks = Counting(FakeMasks())
    st = compute_priors(cache, images, masks, FakeDepth(), progress=False)
    assert st.skipped == 3 and st.computed == N_VIEWS - 3 and len(masks.calls) == N_VIEWS - 3


def test_source_with_wrong_output_shape(scene):
    class Bad(FakeMasks):
        def __call__(self, image, stem):
            return {"masks": np.zeros((1, 3, 3), bool), "scores": np.ones(1), "stability": np.ones(1)}

    with pytest.raises(PriorCacheError, match=r"expected \[M, 48, 48\]"):
        compute_priors(_cache(scene), _images(scene), Bad(), FakeDepth(), progress=False)


def test_older_cache_layout_is_a_clear_error(tmp_path):
    old = tmp_path / "pepe_priors"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"version": 1, "images": [1, 2, 3]}))
    with pytest.raises(PriorCacheError, match="older pepeseg3d.*re-run `pepeseg3d priors`"):
        PriorCache.open(old)
    assert PriorCache.open(old, create=True).keys() == []  # a run rebuilds it in place
    (old / "cache.json").write_text("[1, 2]")
    with pytest.raises(PriorCacheError, match="cache.json"):
        PriorCache.open(old)


_WRITER = """
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_priors_cache import FakeDepth, FakeMasks, _images
from pepeseg3d_ns.priors.cache import PriorCache
from pepeseg3d_ns.priors.compute import compute_priors, parse_shard

class Masks(FakeMasks):
    def __init__(self, setting):
        self.setting = setting
    def signature(self):
        return {{"setting": self.setting}}
    def __call__(self, image, stem):
        out = super().__call__(image, stem)
        n = 3 + self.setting
        out["masks"] = np.concatenate([out["masks"]] * 2)[:n]
        out["scores"] = np.ones(n, np.float32); out["stability"] = np.ones(n, np.float32)
        return out

scene, setting = Path(sys.argv[1]), int(sys.argv[2])
shard = parse_shard(None if sys.argv[3] == "None" else sys.argv[3])
cache = PriorCache.open(scene / "pepe_priors", create=True)
compute_priors(cache, _images(scene), Masks(setting), FakeDepth(), progress=False, shard=shard)
"""


def _run_writers(scene: Path, args: list) -> None:
    import subprocess
    import sys

    script = _WRITER.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(scene), *map(str, a)], stderr=subprocess.PIPE)
             for a in args]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]


def test_two_shards_at_once_fill_one_cache(scene):
    _run_writers(scene, [(0, "0/2"), (0, "1/2")])
    cache = PriorCache.open(scene / "pepe_priors")
    images = _images(scene)
    assert all(cache.check_entry(im.key) is None for im in images)
    assert {cache.read_entry(im.key)["masks"]["n_masks"] for im in images} == {3}


def test_concurrent_runs_with_different_settings_never_leave_a_mixed_cache_that_validates(scene):
    """Two jobs with different mask settings on one cache, three times: every entry stays internally consistent
    (its files are the ones it names: the per-entry lock), and a cache whose entries come from both settings is
    refused by the datamanager's check."""
    from pepeseg3d_ns.data.datamanager import PepeDatamanager

    images = _images(scene)
    for trial in range(3):
        _run_writers(scene, [(0, None), (1, None)])
        cache = PriorCache.open(scene / "pepe_priors")
        entries = []
        for im in images:
            assert cache.check_entry(im.key) is None
            e = cache.read_entry(im.key)
            setting = e["masks"]["source"]["signature"]["setting"]
            assert len(cache.load(im.key).masks) == e["masks"]["n_masks"] == 3 + setting
            entries.append(e)
        settings = {e["masks"]["source"]["signature"]["setting"] for e in entries}
        if len(settings) > 1:
            with pytest.raises(PriorCacheError, match="different settings"):
                PepeDatamanager._check_one_setting(cache, entries)
        else:
            PepeDatamanager._check_one_setting(cache, entries)


def test_a_file_changed_behind_an_entry_is_detected(scene):
    """What the lock prevents, detected anyway: another writer replaced the mask file but not the entry."""
    images = _images(scene)
    cache = _cache(scene)
    compute_priors(cache, images, FakeMasks(), FakeDepth(), progress=False)
    other = MaskSet.from_dense(np.ones((2, RES, RES), bool))
    other.save(cache.cache_dir / "masks" / f"{images[0].key}.npz")
    assert "does not match its entry" in cache.check_entry(images[0].key)
    with pytest.raises(PriorCacheError, match="does not match its entry"):
        cache.load(images[0].key)


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
    n_train = len(list((scene / "pepe_priors" / "entries").glob("*.json")))
    assert "simulated masks" in out and f"{n_train} computed" in out and "masks/image" in out and n_train >= N_VIEWS - 1
    # preview.png: 3 rows x (image | 3 mask layers | depth) at 2x, under a white band with the title and column labels
    preview = np.asarray(Image.open(scene / "pepe_priors" / "preview.png").convert("RGB"))
    band_h = preview.shape[0] - 3 * RES * 2
    assert preview.shape[1] == 5 * RES * 2 and band_h > 10, preview.shape
    assert (preview[:band_h] == 255).all(-1).mean() > 0.5 and (preview[:band_h] < 100).all(-1).any()
    Priors(data=scene, progress=False).main()
    assert f"0 computed, {n_train} skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        Priors(data=scene, check=True).main()
    assert exc.value.code == 0 and f"{n_train} healthy" in capsys.readouterr().out


def test_cli_check_reports_damage_and_a_rerun_repairs_it(scene, capsys):
    Priors(data=scene, progress=False, preview=False).main()
    cache = PriorCache.open(scene / "pepe_priors")
    keys = cache.keys()
    _damage(cache, keys)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        Priors(data=scene, check=True).main()
    out = capsys.readouterr().out
    assert exc.value.code == 1 and "4 damaged" in out and keys[0] in out
    Priors(data=scene, progress=False, preview=False).main()
    out = capsys.readouterr().out
    assert "4 repaired" in out and out.count("repaired: ") == 4
    with pytest.raises(SystemExit) as exc:
        Priors(data=scene, check=True).main()
    assert exc.value.code == 0


def test_cli_real_without_checkpoint(scene):
    tf = scene / "transforms.json"
    meta = json.loads(tf.read_text())
    meta.pop("pepe_synthetic")
    tf.write_text(json.dumps(meta))
    with pytest.raises(UserError) as exc:
        Priors(data=scene, device="cpu", progress=False).main()
    assert "--sam-checkpoint" in str(exc.value)
    assert not list((scene / "pepe_priors" / "entries").glob("*.json"))
    with pytest.raises(UserError, match="pepe_synthetic"):
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
    cache = PriorCache.open(scene / "pepe_priors")
    e = cache.read_entry(cache.keys()[0])
    assert e["masks"]["kind"] == "computed" and e["masks"]["source"]["name"] == "sam"
    assert e["depth"]["source"]["name"] == "depth-anything-v2"
    pri = cache.load(cache.keys()[0])
    assert pri.masks.shape == (RES, RES) and pri.depth.shape == (RES, RES)
    with pytest.raises(UserError, match="not found"):
        Priors(data=scene, **{**kw, "sam_checkpoint": tmp_path / "nope.pth"}).main()


def test_export_images_then_import_own_priors(scene, tmp_path, capsys):
    """Bring your own priors: export the training images, make masks (instance-id PNGs) and depth (.npy) for
    them elsewhere, import; entries are labelled imported and hold exactly those masks."""
    exported = tmp_path / "exported"
    Priors(data=scene, export_images=exported).main()
    files = sorted(exported.glob("*.png"))
    assert files and np.asarray(Image.open(files[0])).shape == (RES, RES, 3)
    masks_dir, depth_dir = tmp_path / "my_masks", tmp_path / "my_depth"
    masks_dir.mkdir()
    depth_dir.mkdir()
    for f in files:
        ids = load_gt_masks(scene, f.stem, "objects").astype(np.uint16)
        Image.fromarray(ids).save(masks_dir / f.name)
        np.save(depth_dir / f"{f.stem}.npy", load_gt_depth(scene, f.stem).astype(np.float32))
    Priors(data=scene, masks_from=masks_dir, depth_from=depth_dir, depth_from_kind="depth", progress=False).main()
    assert "imported masks" in capsys.readouterr().out
    cache = PriorCache.open(scene / "pepe_priors")
    for key in cache.keys():
        pri = cache.load(key)
        assert pri.entry["masks"]["kind"] == pri.entry["depth"]["kind"] == "imported"
        ids = load_gt_masks(scene, pri.entry["stem"], "objects")
        want = np.stack([ids == v for v in np.unique(ids) if v != 0])
        assert np.array_equal(pri.masks.to_dense(), want)
        np.testing.assert_allclose(pri.depth, 1.0 / load_gt_depth(scene, pri.entry["stem"]), rtol=2e-3)
    # a mask file of another size names the expected size and the export command
    big = np.zeros((RES * 2, RES * 2), np.uint8)
    Image.fromarray(big).save(masks_dir / files[0].name)
    with pytest.raises(UserError, match=f"is {2 * RES}x{2 * RES}.*{RES}x{RES}.*--export-images"):
        Priors(data=scene, masks_from=masks_dir, depth_from=depth_dir, progress=False).main()


def test_priors_command_names_the_dataparser_arguments():
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    from pepeseg3d_ns.data.datamanager import PepeDatamanagerConfig
    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig
    from pepeseg3d_ns.priors.command_line import priors_command

    cfg = PepeDatamanagerConfig(data=Path("P"), dataparser=PepeDataParserConfig())
    assert priors_command(cfg) == "pepeseg3d priors --data P"
    cfg = PepeDatamanagerConfig(data=Path("P"), dataparser=PepeDataParserConfig(downscale_factor=2),
                                camera_res_scale_factor=0.5)
    assert priors_command(cfg, "--sam-checkpoint S") == ("pepeseg3d priors --data P --camera-res-scale-factor 0.5 "
                                                         "--sam-checkpoint S nerfstudio-data --downscale-factor 2")
    cfg = PepeDatamanagerConfig(data=Path("P"), dataparser=ColmapDataParserConfig(downscale_factor=4))
    assert priors_command(cfg).endswith("colmap --downscale-factor 4")
