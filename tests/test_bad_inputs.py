"""Bad input, untrusted files, full disks and resuming (issue 15): every case ends in one message that names the
file or flag, nothing from a shared file runs code, a checkpoint is complete or absent, and a resumed run trains
the loaded parameters on the original schedule.

The priors-cache rows of the issue (damaged masks / depth / manifest, concurrent ``pepeseg3d priors``) are tested
in test_priors_cache.py.
"""

from __future__ import annotations

import ast
import copy
import errno
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
from pepeseg3d_ns.errors import UserError
from test_benchmark_parsers import _parse as _parse_benchmark
from test_benchmark_parsers import spin, synth  # noqa: F401  (fixtures: a SPIn-NeRF folder)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """``pepeseg3d synth --resolution 32 --n-views 8`` (500 seed points) with its simulated priors."""
    from pepeseg3d_ns.priors.cli import Priors

    out = tmp_path_factory.mktemp("scene") / "tabletop"
    generate_scene(SynthConfig(scene="tabletop", output_dir=out, n_views=8, resolution=32, n_init_points=500),
                   progress=False)
    Priors(data=out, progress=False, preview=False).main()
    return out


def _copy_scene(scene: Path, dest: Path) -> Path:
    shutil.copytree(scene, dest, ignore=shutil.ignore_patterns("pepe_priors"))
    return dest


def _parse(data: Path, **kw):
    from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

    return PepeDataParserConfig(data=data, **kw).setup().get_dataparser_outputs("train")


def _edit_transforms(scene: Path, edit) -> Path:
    tf = scene / "transforms.json"
    meta = json.loads(tf.read_text())
    edit(meta)
    tf.write_text(json.dumps(meta))
    return tf


def _run_cli(args, capsys) -> str:
    """``pepeseg3d ARGS`` in this process: must exit 2 with one line on stderr; returns that line."""
    from pepeseg3d_ns.cli import entrypoint

    with pytest.raises(SystemExit) as exc:
        entrypoint([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "Warning" not in line and "warnings.warn" not in line]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _train(config):
    """``train_loop`` without the process setup: the trainer is returned."""
    import random

    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return trainer


RECON_STEPS, RECON_SAVE = 40, 20
CONTRAST_STEPS, CONTRAST_SAVE = 20, 10


@pytest.fixture(scope="module")
def recon_run(scene, tmp_path_factory) -> Path:
    """An uninterrupted 40-step pepe-recon run that keeps its step-20 checkpoint (the "interrupted" point)."""
    from pepeseg3d_ns.recipes import make_config

    config = make_config(scene, tmp_path_factory.mktemp("runs"), steps=RECON_STEPS, device="cpu")
    config.steps_per_save = RECON_SAVE
    config.save_only_latest_checkpoint = False
    config.timestamp = "full"
    config.save_config()
    _train(config)
    return config.get_base_dir() / "config.yml"


@pytest.fixture(scope="module")
def contrast_run(recon_run, tmp_path_factory) -> Path:
    """An uninterrupted 20-step pepe-contrast run on ``recon_run`` keeping its step-10 checkpoint."""
    from pepeseg3d_ns.recipes import make_contrast_config

    config = make_contrast_config(recon_run, tmp_path_factory.mktemp("cruns"), steps=CONTRAST_STEPS, device="cpu",
                                  timestamp="full")
    config.steps_per_save = CONTRAST_SAVE
    config.save_only_latest_checkpoint = False
    config.save_config()
    _train(config)
    return config.get_base_dir() / "config.yml"


def _ckpt(run_cfg: Path, step: int) -> dict:
    return torch.load(run_cfg.parent / "nerfstudio_models" / f"step-{step:09d}.ckpt", map_location="cpu",
                      weights_only=True)


# ------------------------------------------------------------------------------------------------ the scene
def test_nan_in_a_transform_matrix_names_the_frame(scene, tmp_path):
    d = _copy_scene(scene, tmp_path / "s")
    name = {}

    def edit(meta):
        meta["frames"][3]["transform_matrix"][1][2] = float("nan")
        name["f"] = meta["frames"][3]["file_path"]

    tf = _edit_transforms(d, edit)
    with pytest.raises(UserError) as err:
        _parse(d)
    assert str(tf) in str(err.value) and name["f"] in str(err.value) and "NaN" in str(err.value)


def test_non_finite_points_are_dropped_with_a_warning(scene, tmp_path):
    from plyfile import PlyData

    from pepeseg3d_ns.data.dataparser import read_ply_points

    d = _copy_scene(scene, tmp_path / "s")
    ply_path = d / "sparse_pc.ply"
    ply = PlyData.read(str(ply_path), mmap=False)  # rewritten in place below
    n = ply["vertex"].count
    ply["vertex"].data["x"][7] = np.nan
    ply["vertex"].data["z"][11] = np.inf
    ply.write(str(ply_path))
    assert not np.isfinite(read_ply_points(ply_path)[0]).all()
    with pytest.warns(UserWarning, match=rf"{re.escape(str(ply_path))}: dropped 2 of {n} points"):
        out = _parse(d)
    pts = out.metadata["points3D_xyz"]
    assert pts.shape[0] == n - 2 and torch.isfinite(pts).all()
    # every point broken: an error naming the file, not a scikit-learn traceback
    ply["vertex"].data["y"][:] = np.nan
    ply.write(str(ply_path))
    with pytest.raises(UserError, match=re.escape(str(ply_path))):
        _parse(d)


def test_empty_frames_list(scene, tmp_path):
    d = _copy_scene(scene, tmp_path / "s")
    tf = _edit_transforms(d, lambda meta: meta.update(frames=[]))
    with pytest.raises(UserError, match=re.escape(str(tf)) + ".*no frames"):
        _parse(d)


def test_every_frame_with_the_same_pose(scene, tmp_path):
    d = _copy_scene(scene, tmp_path / "s")

    def edit(meta):
        for f in meta["frames"]:
            f["transform_matrix"] = meta["frames"][0]["transform_matrix"]

    tf = _edit_transforms(d, edit)
    with pytest.raises(UserError, match=re.escape(str(tf)) + ".*all 8 views have the camera at"):
        _parse(d)


def test_malformed_transform_matrix(scene, tmp_path):
    d = _copy_scene(scene, tmp_path / "s")
    tf = _edit_transforms(d, lambda meta: meta["frames"][2].update(transform_matrix=[[1, 0], [0, 1]]))
    with pytest.raises(UserError, match=re.escape(str(tf)) + ".*frame 2 .*4x4"):
        _parse(d)


def test_paths_outside_the_dataset_folder_need_the_flag(scene, tmp_path):
    d = _copy_scene(scene, tmp_path / "s")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def edit(meta):
        src = d / meta["frames"][0]["file_path"]
        shutil.move(src, outside / src.name)
        meta["frames"][0]["file_path"] = f"../elsewhere/{src.name}"

    tf = _edit_transforms(d, edit)
    with pytest.raises(UserError) as err:
        _parse(d)
    msg = str(err.value)
    assert str(tf) in msg and "../elsewhere/" in msg and "allow-outside-paths" in msg
    out = _parse(d, allow_outside_paths=True)  # what nerfstudio does, when asked for
    assert any("elsewhere" in str(p) for p in out.image_filenames)
    # an absolute path leaves the folder too; a symbolic link inside the folder does not count
    (d / "images" / "linked").symlink_to(outside)
    name = next(outside.iterdir()).name
    _edit_transforms(d, lambda meta: meta["frames"][0].update(file_path=f"images/linked/{name}"))
    assert any("linked" in str(p) for p in _parse(d).image_filenames)
    _edit_transforms(d, lambda meta: meta["frames"][0].update(file_path=str(outside / name)))
    with pytest.raises(UserError, match="lead outside"):
        _parse(d)


def test_benchmark_parser_pose_and_point_checks(tmp_path):
    from pepeseg3d_ns.data.validate import check_poses, finite_points

    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, 0, 3] = [0.0, 1.0, 2.0]
    check_poses(c2w, ["a.png", "b.png", "c.png"], tmp_path)
    bad = c2w.copy()
    bad[1, 2, 2] = np.inf
    with pytest.raises(UserError, match=re.escape(str(tmp_path)) + ".*b.png"):
        check_poses(bad, ["a.png", "b.png", "c.png"], tmp_path)
    with pytest.raises(UserError, match="same|at \\("):
        check_poses(np.tile(np.eye(4), (3, 1, 1)), ["a", "b", "c"], tmp_path)
    xyz = np.zeros((4, 3), np.float32)
    xyz[2, 1] = np.nan
    with pytest.warns(UserWarning, match="points3D: dropped 1 of 4"):
        kept, rgb = finite_points(xyz, np.zeros((4, 3), np.uint8), tmp_path / "points3D")
    assert kept.shape == (3, 3) and rgb.shape == (3, 3)


def test_spinnerf_parser_refuses_a_nan_pose(spin, tmp_path):
    """The benchmark parsers run the same checks (the SPIn-NeRF folder of test_benchmark_parsers, one pose NaN)."""
    d = tmp_path / "spin"
    shutil.copytree(spin, d)
    rows = np.load(d / "poses_bounds.npy")
    rows[4, 3] = np.nan
    np.save(d / "poses_bounds.npy", rows)
    with pytest.raises(UserError, match=re.escape(str(d)) + ".*IMG_0004"):
        _parse_benchmark("spinnerf", "train", data=d, masks_dir=Path("masks"), pose_source="poses_bounds")


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("args, flag", [
    (["segment", "--click", "1", "1", "--threshold", "nan"], "--threshold nan"),
    (["segment", "--click", "1", "1", "--threshold", "1.01"], "--threshold 1.01"),
    (["segment", "--click", "1", "1", "--scale", "1.5"], "--scale 1.5"),
    (["segment", "--click", "-3", "1"], "--click"),
    (["decompose", "--max-views", "0"], "--max-views 0"),
    (["decompose", "--scales", "0.5", "inf"], "--scales inf"),
    (["segment", "--click", "1", "1", "--view", "-1"], "--view -1"),
])
def test_cli_arguments_checked_before_any_work(args, flag, capsys, tmp_path, monkeypatch):
    import pepeseg3d_ns.runs as runs

    cfg = tmp_path / "config.yml"
    cfg.write_text("not used")
    monkeypatch.setattr(runs, "eval_setup", lambda *a, **k: pytest.fail("the run was loaded before the check"))
    line = _run_cli([args[0], "--load-config", cfg, *args[1:]], capsys)
    assert line.startswith(f"pepeseg3d {args[0]}: error: {flag}"), line


@pytest.mark.parametrize("args, flag", [
    (["synth", "--n-views", "0"], "--n-views 0"),
    (["demo", "--steps", "0"], "--steps 0"),
    (["bench-render", "--repeats", "0"], "--repeats 0"),
    (["benchmark", "--threshold", "nan"], "--threshold nan"),
    (["segment", "--load-config", "/nonexistent/config.yml", "--click", "1", "1"], "--load-config /nonexistent"),
])
def test_cli_counts_and_files(args, flag, capsys):
    line = _run_cli(args, capsys)
    assert flag in line, line


def test_a_bug_keeps_its_traceback(monkeypatch):
    from pepeseg3d_ns import cli

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.Synth, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.entrypoint(["synth"])


def test_console_script_prints_one_line(tmp_path):
    import subprocess

    (tmp_path / "x.yml").write_text("")
    proc = subprocess.run([str(Path(sys.executable).parent / "pepeseg3d"), "decompose", "--load-config",
                           str(tmp_path / "x.yml"), "--max-views", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "pepeseg3d decompose: error: --max-views 0" in proc.stderr


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_text_file_named_ckpt_is_not_a_checkpoint(tmp_path):
    from pepeseg3d_ns.contrast.model import load_recon_geometry

    p = tmp_path / "step-000000100.ckpt"
    p.write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(UserError) as err:
        load_recon_geometry(p)
    msg = str(err.value)
    assert msg.startswith(f"{p} is not a pepe-recon checkpoint (") and "weights_only" not in msg
    p.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load_recon_geometry(p)


def test_truncated_and_pickled_checkpoints(recon_run, tmp_path):
    from pepeseg3d_ns.contrast.model import load_recon_geometry

    real = recon_run.parent / "nerfstudio_models" / f"step-{RECON_STEPS - 1:09d}.ckpt"
    cut = tmp_path / "step-000000001.ckpt"
    cut.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    with pytest.raises(UserError) as err:
        load_recon_geometry(cut)
    assert f"{cut} is not a pepe-recon checkpoint (a truncated zip archive" in str(err.value)
    assert "weights_only" not in str(err.value)
    # a pickled object whose unpickling would run code: refused, the code never runs
    marker = tmp_path / "PICKLE_RAN"
    evil = tmp_path / "step-000000002.ckpt"
    torch.save({"pipeline": {}, "step": 0, "x": _Payload(str(marker))}, evil)
    with pytest.raises(UserError) as err:
        load_recon_geometry(evil)
    assert str(evil) in str(err.value) and "weights_only" not in str(err.value) and "not unpickled" in str(err.value)
    assert not marker.exists()
    # the control: unpickling it for real does run the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()
    # a real checkpoint of another kind: named too
    other = tmp_path / "step-000000003.ckpt"
    torch.save({"pipeline": {"_model.field.weight": torch.zeros(2)}, "step": 3}, other)
    with pytest.raises(UserError, match=re.escape(f"{other} is not a pepe-recon checkpoint (it has no")):
        load_recon_geometry(other)


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


# ------------------------------------------------------------------------------------------------ shared config.yml
PAYLOADS = {
    "apply": "pwned: !!python/object/apply:os.system ['touch {m}']",
    "new": "pwned: !!python/object/new:subprocess.Popen [['touch', '{m}']]",
    "name": "pwned: !!python/name:os.system ''",
    "nerfstudio-function": "pwned: !!python/object/apply:nerfstudio.utils.scripts.run_command ['touch {m}']",
    "module": "pwned: !!python/module:os ''",
    "builtin": "pwned: !!python/object/apply:builtins.exec ['open(\"{m}\", \"w\")']",
}


def _malicious_run(recon_run: Path, dest: Path, payload: str, marker: Path) -> Path:
    """A copy of the recon run whose config.yml carries ``payload`` (a top-level field)."""
    shutil.copytree(recon_run.parent, dest)
    cfg = dest / "config.yml"
    cfg.write_text(recon_run.read_text() + payload.format(m=marker) + "\n")
    return cfg


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_config_never_runs(recon_run, tmp_path, kind, capsys):
    from pepeseg3d_ns.recipes import make_contrast_config
    from pepeseg3d_ns.methods import pepe_contrast
    from pepeseg3d_ns.runs import UnsafeConfigError, load_run_config
    from pepeseg3d_ns.trainer import PepeTrainerConfig, data_from_recon_run

    marker = tmp_path / "PAYLOAD_RAN"
    cfg = _malicious_run(recon_run, tmp_path / "shared_run", PAYLOADS[kind], marker)
    with pytest.raises(UnsafeConfigError) as err:
        load_run_config(cfg)
    assert str(cfg) in str(err.value) and "line" in str(err.value)
    # every place this package reads a recon run's config.yml
    contrast = copy.deepcopy(pepe_contrast.config)
    contrast.pipeline.model.recon_checkpoint = cfg
    with pytest.raises(UnsafeConfigError, match=re.escape(str(cfg))):
        data_from_recon_run(contrast)
    PepeTrainerConfig(method_name="pepe-contrast", pipeline=contrast.pipeline)  # __post_init__ reads it too
    with pytest.raises(UnsafeConfigError):
        make_contrast_config(cfg, tmp_path / "out", steps=10, device="cpu")
    assert str(cfg) in _run_cli(["check-run", "--load-config", cfg], capsys)
    assert str(cfg) in _run_cli(["decompose", "--load-config", cfg], capsys)
    assert not marker.exists()
    if kind == "apply":  # the control: nerfstudio's loader (ns-viewer, ns-eval) does run it
        yaml.load(cfg.read_text(), Loader=yaml.Loader)
        assert marker.exists()


def test_real_configs_load_unchanged(recon_run, contrast_run, capsys):
    from pepeseg3d_ns.runs import load_run_config

    for cfg in (recon_run, contrast_run):
        assert load_run_config(cfg) == yaml.load(cfg.read_text(), Loader=yaml.Loader)
    from pepeseg3d_ns.cli import entrypoint

    entrypoint(["check-run", "--load-config", str(contrast_run)])
    assert "tensors only" in capsys.readouterr().out


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_package_loads_nothing_unsafely():
    """Every torch.load passes weights_only=True, every yaml.load the restricted loader, nothing imports
    nerfstudio's eval_setup (yaml.Loader + torch.load), and the torch floor has the weights_only default."""
    offences = []
    for path in sorted((ROOT / "pepeseg3d_ns").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offences.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.load_all"):
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Name) and loader.id == "RunConfigLoader") and not (
                        isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    offences.append(f"{path.name}:{node.lineno} yaml.load with an unrestricted loader")
            if name in ("yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads"):
                offences.append(f"{path.name}:{node.lineno} {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "nerfstudio.utils.eval_utils":
                offences.append(f"{path.name}:{node.lineno} imports nerfstudio's eval_setup")
    assert not offences, offences
    floor = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert floor and tuple(int(x) for x in floor.group(1).split(".")) >= (2, 6), floor


# ------------------------------------------------------------------------------------------------ full disk
def _fresh_trainer(scene: Path, out: Path):
    from pepeseg3d_ns.recipes import make_config

    config = make_config(scene, out, steps=10, device="cpu")
    config.timestamp = "disk"
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def test_disk_full_during_a_checkpoint_save(scene, tmp_path, monkeypatch):
    from pepeseg3d_ns.runs import CheckpointWriteError

    trainer = _fresh_trainer(scene, tmp_path / "runs")
    trainer.config.save_only_latest_checkpoint = True
    trainer.save_checkpoint(5)
    good = trainer.checkpoint_dir / "step-000000005.ckpt"
    assert good.is_file()
    real_save = torch.save

    def half_then_enospc(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_enospc)
    with pytest.raises(CheckpointWriteError) as err:
        trainer.save_checkpoint(6)
    assert err.value.errno == errno.ENOSPC
    assert "disk full" in str(err.value) and "step-000000006.ckpt" in str(err.value)
    run_dir = trainer.checkpoint_dir.parent
    assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == [good.name]  # the older one kept
    assert not list(run_dir.glob(".*partial")) and not list(run_dir.rglob("*.partial"))

    # torch's own message for a full disk is "basic_ios::clear: iostream error": recognised by the free space
    def half_then_iostream(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 1000)
        raise RuntimeError("basic_ios::clear: iostream error")

    import pepeseg3d_ns.runs as runs

    monkeypatch.setattr(torch, "save", half_then_iostream)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=0))
    with pytest.raises(CheckpointWriteError, match=r"disk full while writing checkpoint .*step-000000007\.ckpt"):
        trainer.save_checkpoint(7)
    # another failure is reported as what it is
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**12, used=0, free=10**12))
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step-000000008\.ckpt"):
        trainer.save_checkpoint(8)
    assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == [good.name]
    assert not list(run_dir.rglob("*.partial"))


# ------------------------------------------------------------------------------------------------ empty selection
def test_empty_selection_writes_no_ply(tmp_path):
    from pepeseg3d_ns.export import EmptySelectionError, save_selection, write_splat_ply

    g = torch.Generator().manual_seed(0)
    params = {"means": torch.randn(4, 3, generator=g), "features_dc": torch.randn(4, 3, generator=g),
              "features_rest": torch.randn(4, 3, 3, generator=g), "opacities": torch.randn(4, 1, generator=g),
              "scales": torch.randn(4, 3, generator=g), "quats": torch.randn(4, 4, generator=g)}
    with pytest.raises(EmptySelectionError, match=re.escape(str(tmp_path / "a.ply"))):
        write_splat_ply(tmp_path / "a.ply", params, torch.zeros(4, dtype=torch.bool))
    assert not (tmp_path / "a.ply").exists()
    params["means"][:] = float("nan")
    with pytest.raises(EmptySelectionError, match="NaN"):
        write_splat_ply(tmp_path / "b.ply", params)

    class _Model:
        gauss_params, num_points = params, 4

    with pytest.raises(EmptySelectionError):
        save_selection(tmp_path / "sel", _Model(), torch.zeros(4, dtype=torch.bool))
    assert not (tmp_path / "sel").exists()


@pytest.mark.slow
def test_segment_and_viewer_export_of_an_empty_selection(contrast_run, tmp_path, capsys):
    from pepeseg3d_ns.runs import eval_setup

    out = tmp_path / "seg"
    line = _run_cli(["segment", "--load-config", contrast_run, "--click", "16", "16", "--threshold", "1.0",
                     "--output-dir", out], capsys)
    assert "selection is empty" in line and "--threshold" in line
    assert not out.exists()
    line = _run_cli(["segment", "--load-config", contrast_run, "--click", "40", "16"], capsys)
    assert "--click 40 16 is outside training view 0 (32x32" in line

    _, pipeline, _, _ = eval_setup(contrast_run, test_mode="inference")
    panel = pipeline.model.segmentation_panel
    cam = pipeline.datamanager.train_dataset.cameras[0:1]
    panel.add_click_at_pixel(cam, 16, 16) or panel.add_click_at_pixel(cam, 8, 24)
    assert panel.click_features is not None
    panel.threshold.value = 1.0
    assert not bool(panel.selected_gaussians().any())
    assert panel.export(tmp_path / "exp") is None
    assert "nothing exported" in panel.last_message and not (tmp_path / "exp").exists()
    panel.threshold.value = 0.0  # the same clicks at a low threshold do export
    assert panel.export(tmp_path / "exp")["ply"].is_file()


# ------------------------------------------------------------------------------------------------ resume
def _resume_config(method: str, original: Path, step: int, out: Path):
    """What ``ns-train METHOD --load-dir ORIGINAL/nerfstudio_models --load-step STEP --vis tensorboard`` builds:
    the method's defaults (30k / 10k steps, no data) plus the load flags."""
    from pepeseg3d_ns.methods import pepe_contrast, pepe_recon

    config = copy.deepcopy({"pepe-recon": pepe_recon, "pepe-contrast": pepe_contrast}[method].config)
    config.load_dir = original.parent / "nerfstudio_models"
    config.load_step = step
    config.output_dir = out
    config.timestamp = "resumed"
    config.vis = "tensorboard"
    config.machine.device_type = "cpu"
    return config


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["pepe-recon", "pepe-contrast"])
def test_resume_trains_the_loaded_parameters_on_the_original_schedule(stage, recon_run, contrast_run, tmp_path):
    from pepeseg3d_ns.runs import load_run_config

    original = recon_run if stage == "pepe-recon" else contrast_run
    total, at = (RECON_STEPS, RECON_SAVE) if stage == "pepe-recon" else (CONTRAST_STEPS, CONTRAST_SAVE)
    config = _resume_config(stage, original, at, tmp_path / "runs")
    if stage == "pepe-contrast":
        config.pipeline.model.recon_checkpoint = recon_run
    trainer = _train(config)
    resumed = config.get_base_dir()
    # the step count of the uninterrupted run, and only the steps after the checkpoint ran
    assert sorted(p.name for p in (resumed / "nerfstudio_models").glob("*.ckpt")) == [f"step-{total - 1:09d}.ckpt"]
    assert trainer.step == total - 1
    saved = load_run_config(resumed / "config.yml")
    first = load_run_config(original)
    assert saved.max_num_iterations == total
    assert saved.pipeline.model == first.pipeline.model  # the original schedule, not one re-scaled to 30k / 10k
    assert {k: v["scheduler"] for k, v in saved.optimizers.items()} == {k: v["scheduler"] for k, v in first.optimizers.items()}
    before, after, full = _ckpt(original, at), torch.load(resumed / "nerfstudio_models" / f"step-{total - 1:09d}.ckpt",
                                                          weights_only=True), _ckpt(original, total - 1)
    trained = (["_model.gauss_params.means", "_model.gauss_params.scales", "_model.gauss_params.opacities",
                "_model.gauss_params.features_dc", "_model.gauss_params.quats"] if stage == "pepe-recon"
               else ["_model.gauss_features", *[k for k in before["pipeline"] if k.startswith("_model.scale_gate.")]])
    for key in trained:
        a, b = before["pipeline"][key], after["pipeline"][key]
        assert a.shape != b.shape or not torch.equal(a, b), f"{key} did not change after resuming"
    # the optimizer state was loaded and stepped: Adam's step count is the uninterrupted run's
    group = "means" if stage == "pepe-recon" else "gauss_features"
    steps_after = after["optimizers"][group]["state"][0]["step"]
    assert float(steps_after) == float(full["optimizers"][group]["state"][0]["step"]) == total
    if stage == "pepe-contrast":  # the geometry stays frozen
        for k in ("means", "scales", "opacities"):
            assert torch.equal(before["pipeline"][f"_model.gauss_params.{k}"], after["pipeline"][f"_model.gauss_params.{k}"])


def test_resume_of_a_finished_run_says_so(recon_run, tmp_path):
    config = _resume_config("pepe-recon", recon_run, RECON_STEPS - 1, tmp_path / "runs")
    trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(UserError, match=r"step-0+39\.ckpt is step 39 of a 40-step run: nothing is left"):
        trainer.setup()
    config = _resume_config("pepe-recon", recon_run, 7, tmp_path / "runs2")
    with pytest.raises(UserError, match=r"--load-dir .*has no checkpoint of step 7"):
        config.setup(local_rank=0, world_size=1).setup()
