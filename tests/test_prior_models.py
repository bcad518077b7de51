"""SAM / Depth-Anything prior models: one loading path for real and tiny random weights, clear errors, signatures.

Real weights cannot be downloaded here, so tiny random models (pepeseg3d_ns.priors.tiny_models) are saved to
tmp folders and loaded through exactly the code that loads sam_vit_h_4b8939.pth / Depth-Anything-V2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from pepeseg3d_ns.priors.sam import (  # noqa: E402
    SamConfig,
    SamMaskSource,
    build_sam_model,
    infer_sam_architecture,
    load_sam,
)
from pepeseg3d_ns.priors.tiny_models import TINY_SAM_ARCH, build_tiny_sam  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, points_per_side=8,
                  min_mask_region_area=0)


def shapes_image(h: int = 96, w: int = 120) -> np.ndarray:
    """[h, w, 3] uint8: grey background, a red rectangle, a green disc, a blue bar."""
    img = np.full((h, w, 3), 40, np.uint8)
    img[8:50, 10:60] = (220, 30, 30)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 62) ** 2 + (xx - 84) ** 2 < 20 ** 2] = (30, 200, 60)
    img[70:88, 8:70] = (40, 60, 230)
    return img


def _subprocess(code: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(REPO))


# ------------------------------------------------------------------------------------------------------------ SAM


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    return build_tiny_sam(tmp_path_factory.mktemp("sam"))


def test_tiny_sam_architecture_round_trip(tiny_sam):
    assert tiny_sam.name == "sam_tiny.pth" and tiny_sam.stat().st_size < 1_000_000
    saved = torch.load(tiny_sam, map_location="cpu", weights_only=True)
    assert infer_sam_architecture(saved) == TINY_SAM_ARCH
    model = load_sam(SamConfig(checkpoint=tiny_sam), "cpu")
    assert not model.training
    assert model.image_encoder.img_size == TINY_SAM_ARCH.image_size
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))


@pytest.mark.parametrize(
    "model_type, dim, heads, depth, global_idx",
    [("vit_b", 768, 12, 12, (2, 5, 8, 11)), ("vit_l", 1024, 16, 24, (5, 11, 17, 23)),
     ("vit_h", 1280, 16, 32, (7, 15, 23, 31))],
)
def test_infer_released_architectures(model_type, dim, heads, depth, global_idx):
    """The released shapes (built on the meta device: no memory, no weights) are read back correctly, and our
    constructor rebuilds exactly segment_anything's module from them."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        reference = sam_model_registry[model_type]()
    sd = reference.state_dict()
    arch = infer_sam_architecture(sd)
    assert (arch.embed_dim, arch.num_heads, arch.depth, arch.global_attn_indexes) == (dim, heads, depth, global_idx)
    assert (arch.image_size, arch.patch_size, arch.window_size, arch.prompt_embed_dim) == (1024, 16, 14, 256)
    assert arch.model_type == model_type
    with torch.device("meta"):
        rebuilt = build_sam_model(arch)
    ours = rebuilt.state_dict()
    assert ours.keys() == sd.keys()
    assert all(ours[k].shape == sd[k].shape for k in sd)


def test_tiny_sam_masks(tiny_sam):
    img = shapes_image(96, 120)
    source = SamMaskSource(SamConfig(checkpoint=tiny_sam, **PERMISSIVE), device="cpu")
    assert source.name == "sam"
    out = source(img, "view_000")
    masks, scores, stability = out["masks"], out["scores"], out["stability"]
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (96, 120)
    m = masks.shape[0]
    assert m > 0
    assert scores.shape == (m,) and scores.dtype == np.float32
    assert stability.shape == (m,) and stability.dtype == np.float32
    assert masks.reshape(m, -1).any(axis=1).any()
    json.dumps(source.signature())
    with pytest.raises(ValueError, match="uint8"):
        source(img.astype(np.float32), "bad")
    # the small-region clean-up (OpenCV) and crop layers keep the same output contract
    cleaned = SamMaskSource(SamConfig(checkpoint=tiny_sam, **{**PERMISSIVE, "points_per_side": 4,
                                                              "min_mask_region_area": 50, "crop_n_layers": 1}))
    out2 = cleaned(img, "view_000")
    assert out2["masks"].dtype == bool and out2["masks"].shape[1:] == (96, 120)
    assert out2["scores"].shape == out2["stability"].shape == (out2["masks"].shape[0],)


def test_missing_checkpoint_messages(tmp_path):
    for cfg in (SamConfig(), SamConfig(checkpoint=tmp_path / "absent.pth")):
        with pytest.raises(FileNotFoundError) as exc:
            load_sam(cfg)
        assert "sam_vit_h_4b8939.pth" in str(exc.value) and "--sam-checkpoint" in str(exc.value)
        with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
            SamMaskSource(cfg).signature()
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        load_sam(SamConfig(checkpoint=tmp_path / "absent.pth", model_type="vit_b"))


def test_bad_checkpoint_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong_keys)
    a_list = tmp_path / "a_list.pth"
    torch.save([torch.zeros(1)], a_list)
    for path in (garbage, wrong_keys, a_list):
        with pytest.raises(ValueError) as exc:
            load_sam(SamConfig(checkpoint=path))
        assert path.name in str(exc.value)
    with pytest.raises(ValueError, match="folder"):
        load_sam(SamConfig(checkpoint=tmp_path))


def test_model_type_mismatch(tiny_sam):
    for model_type in ("vit_h", "vit_b"):
        with pytest.raises(ValueError, match=model_type):
            load_sam(SamConfig(checkpoint=tiny_sam, model_type=model_type))


def test_sam_signature(tiny_sam, tmp_path):
    ckpt = tmp_path / "sam_a.pth"
    shutil.copy(tiny_sam, ckpt)
    base = SamConfig(checkpoint=ckpt)
    sig0 = SamMaskSource(base).signature()
    json.dumps(sig0)
    assert sig0 == SamMaskSource(SamConfig(checkpoint=ckpt)).signature()
    assert SamMaskSource(dataclasses.replace(base, pred_iou_thresh=1)).signature() == \
        SamMaskSource(dataclasses.replace(base, pred_iou_thresh=1.0)).signature()
    changed = {"model_type": "vit_b", "points_per_side": 16, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.9,
               "box_nms_thresh": 0.5, "min_mask_region_area": 0, "crop_n_layers": 1, "points_per_batch": 32}
    names = {f.name for f in dataclasses.fields(SamConfig)} - {"checkpoint"}
    assert names == set(changed), "new SamConfig field: add it to this test"
    for name, value in changed.items():
        assert getattr(base, name) != value
        assert SamMaskSource(dataclasses.replace(base, **{name: value})).signature() != sig0, name
    renamed = tmp_path / "sam_b.pth"
    shutil.copy(ckpt, renamed)
    assert SamMaskSource(SamConfig(checkpoint=renamed)).signature() != sig0
    data = bytearray(ckpt.read_bytes())  # same file, same size, one byte different
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    sig1 = SamMaskSource(base).signature()
    assert sig1["checkpoint"]["size"] == sig0["checkpoint"]["size"]
    assert sig1["checkpoint"]["sha256"] != sig0["checkpoint"]["sha256"] and sig1 != sig0


# ------------------------------------------------------------------------------------------------ Depth-Anything


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from pepeseg3d_ns.priors.tiny_models import build_tiny_depth_anything

    return build_tiny_depth_anything(tmp_path_factory.mktemp("da"))


def test_tiny_depth_anything(tiny_da, tmp_path):
    from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig

    source = DepthAnythingSource(DepthConfig(model=str(tiny_da), local_files_only=True))
    assert source.name == "depth-anything-v2"
    img = shapes_image(75, 131)  # non-square, sides not multiples of 14
    depth = source(img, "view_000")
    assert depth.dtype == np.float32 and depth.shape == (75, 131)
    assert np.isfinite(depth).all() and depth.std() > 0

    sig = source.signature()
    json.dumps(sig)
    assert sig["kind"] == "folder" and sig["input_size"] is None
    small = DepthAnythingSource(DepthConfig(model=str(tiny_da), local_files_only=True, input_size=56))
    assert small.signature() != sig
    assert small(img, "view_000").shape == (75, 131)
    # another folder with a different processor config -> another signature
    other = tmp_path / "da_copy"
    shutil.copytree(tiny_da, other)
    pp = json.loads((other / "preprocessor_config.json").read_text())
    pp["size"] = {"height": 98, "width": 98}
    (other / "preprocessor_config.json").write_text(json.dumps(pp))
    sig_other = DepthAnythingSource(DepthConfig(model=str(other), local_files_only=True)).signature()
    assert sig_other["fingerprint"] != sig["fingerprint"]


def test_depth_unavailable_messages(tmp_path):
    from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig

    with pytest.raises(FileNotFoundError) as exc:
        DepthAnythingSource(DepthConfig(model="pepeseg3d-test/no-such-model", local_files_only=True)).signature()
    msg = str(exc.value)
    assert "pepeseg3d-test/no-such-model" in msg and "download pepeseg3d-test/no-such-model" in msg
    assert "--depth-model" in msg and "Traceback" not in msg
    with pytest.raises(FileNotFoundError, match="depth-anything/Depth-Anything-V2-Small-hf"):
        DepthAnythingSource(DepthConfig(model=str(tmp_path / "missing" / "folder"))).signature()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DepthAnythingSource(DepthConfig(model=str(tmp_path / "empty"))).load()


def test_depth_hf_offline_and_cache(tiny_da, tmp_path):
    """With HF_HUB_OFFLINE=1: an uncached hub id gives the download message at once (no network retries), and a
    hub id present in the Hugging Face cache loads from it, pinned to the cached commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--pepeseg3d-test--tiny-da"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_da, repo / "snapshots" / commit)
    res = _subprocess(
        """
        import numpy as np
        from pepeseg3d_ns.priors.depth import DepthAnythingSource, DepthConfig
        try:
            DepthAnythingSource(DepthConfig(model="depth-anything/Depth-Anything-V2-Small-hf")).signature()
        except FileNotFoundError as e:
            print("MISSING:", e)
        src = DepthAnythingSource(DepthConfig(model="pepeseg3d-test/tiny-da"))
        sig = src.signature()
        print("REVISION:", sig["kind"], sig["revision"])
        print("SHAPE:", src(np.zeros((30, 44, 3), np.uint8), "x").shape)
        """,
        env_extra={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "MISSING:" in out and "hf download depth-anything/Depth-Anything-V2-Small-hf" in out
    assert "--depth-model" in out
    assert f"REVISION: hub {commit}" in out
    assert "SHAPE: (30, 44)" in out


# ------------------------------------------------------------------------------------------------------- imports


def test_priors_package_import_is_light():
    res = _subprocess(
        """
        import sys
        import pepeseg3d_ns.priors, pepeseg3d_ns.priors.sam, pepeseg3d_ns.priors.depth, pepeseg3d_ns.priors.tiny_models
        print(sorted(m for m in ("segment_anything", "transformers", "torchvision") if m in sys.modules))
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"
