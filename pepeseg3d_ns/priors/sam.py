"""SAM automatic masks at every granularity, from a local segment-anything checkpoint.

Output of :class:`SamMaskSource` for one image ``[H, W, 3]`` uint8 RGB::

    {"masks":     bool    [M, H, W]  one binary mask per SAM proposal, at image resolution, overlapping,
                                     whole / part / sub-part granularities all kept (SAM's 3 multimask outputs),
     "scores":    float32 [M]        SAM's predicted IoU of each mask,
     "stability": float32 [M]        SAM's stability score of each mask}

``M`` may be 0 (a random model with default thresholds yields nothing).

Loading (:func:`load_sam`) has one path for the released checkpoints (``sam_vit_h_4b8939.pth``,
``sam_vit_l_0b3195.pth``, ``sam_vit_b_01ec64.pth``, plain state dicts) and for tiny test models: the
architecture is read off the state dict's tensor shapes (:func:`infer_sam_architecture`) and the model is built
from ``ImageEncoderViT`` / ``PromptEncoder`` / ``MaskDecoder`` directly, because segment_anything's
``build_sam`` hard-codes a 1024 px input and 256-d prompts. The one hyperparameter that no tensor shape
records is the number of attention heads of the mask decoder's two-way transformer; every released SAM uses
8 (:data:`DECODER_NUM_HEADS`), and :mod:`pepeseg3d_ns.priors.tiny_models` builds its tiny model with 8 too.

``torch`` and ``segment_anything`` (which imports ``torchvision``) are imported lazily, inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Literal, Mapping, Optional, Tuple, Union

import numpy as np

from pepeseg3d_ns.priors.cache import check_rgb_image, file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

SamModelType = Literal["auto", "vit_h", "vit_l", "vit_b"]

#: Released checkpoints: model type -> (file name, download URL).
SAM_CHECKPOINTS: Dict[str, Tuple[str, str]] = {
    "vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "vit_l": ("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
}
#: Released image-encoder sizes: model type -> (embed dim, number of blocks).
SAM_VARIANTS: Dict[str, Tuple[int, int]] = {"vit_h": (1280, 32), "vit_l": (1024, 24), "vit_b": (768, 12)}
#: Attention heads of the mask decoder's two-way transformer (not recoverable from tensor shapes; 8 in all SAMs).
DECODER_NUM_HEADS = 8
#: ImageNet pixel statistics SAM normalises with (non-persistent buffers, absent from checkpoints).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_ENC = "image_encoder."
_REQUIRED_KEYS = (
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.pos_embed",
    "image_encoder.neck.0.weight",
    "prompt_encoder.point_embeddings.0.weight",
    "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight",
)


@dataclass
class SamConfig:
    """Segment Anything (SAM) automatic mask generation. Defaults follow SAGA / GARField practice with ViT-H."""

    checkpoint: Optional[Path] = None
    """SAM checkpoint file (.pth state dict), e.g. sam_vit_h_4b8939.pth from the segment-anything release."""
    model_type: SamModelType = "auto"
    """Expected SAM variant; 'auto' reads the architecture from the checkpoint, others also cross-check it."""
    points_per_side: int = 32
    """Prompt grid: points_per_side x points_per_side points over the image (per crop layer 0)."""
    pred_iou_thresh: float = 0.88
    """Drop masks whose SAM-predicted IoU is below this."""
    stability_score_thresh: float = 0.95
    """Drop masks whose stability score (IoU between masks thresholded at +/- 1 logit) is below this."""
    box_nms_thresh: float = 0.7
    """Box IoU above which duplicate masks are suppressed (1.0 keeps all)."""
    min_mask_region_area: int = 100
    """Remove disconnected regions and holes smaller than this many pixels (0 disables; needs OpenCV)."""
    crop_n_layers: int = 0
    """Extra layers of image crops on which SAM is run again (0 = whole image only)."""
    points_per_batch: int = 64
    """Prompt points decoded at once (memory/speed trade-off only; does not change the masks)."""


@dataclass(frozen=True)
class SamArchitecture:
    """Every hyperparameter needed to rebuild a segment-anything ``Sam`` module (see :func:`build_sam_model`)."""

    image_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    window_size: int
    global_attn_indexes: Tuple[int, ...]
    out_chans: int
    prompt_embed_dim: int
    mask_in_chans: int
    num_multimask_outputs: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_num_heads: int
    attention_downsample_rate: int
    iou_head_depth: int
    iou_head_hidden_dim: int

    @property
    def model_type(self) -> str:
        """``"vit_h"`` / ``"vit_l"`` / ``"vit_b"`` when the encoder matches a released size, else ``"custom"``."""
        for name, (dim, depth) in SAM_VARIANTS.items():
            if (self.embed_dim, self.depth) == (dim, depth):
                return name
        return "custom"


# ----------------------------------------------------------------------------------------------------------------
# architecture <-> state dict


def _shape(sd: Mapping[str, Any], key: str) -> Tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"missing tensor {key!r}")
    return tuple(int(s) for s in sd[key].shape)


def _count_indexed(sd: Mapping[str, Any], prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` groups (``prefix0.``, ``prefix1.``, ...) among the keys."""
    found = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    n = 0
    while n in found:
        n += 1
    return n


def infer_sam_architecture(state_dict: Mapping[str, Any]) -> SamArchitecture:
    """Read a SAM architecture off the tensor shapes of its state dict.

    Args:
        state_dict: ``Sam.state_dict()``-style mapping (keys ``image_encoder.*``, ``prompt_encoder.*``,
            ``mask_decoder.*``); values only need a ``.shape``.

    Returns:
        The architecture. ``decoder_num_heads`` is :data:`DECODER_NUM_HEADS` (not recorded by any shape).

    Raises:
        ValueError: keys are missing or shapes are inconsistent with a SAM ViT model.
    """
    sd = state_dict
    missing = [k for k in _REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(f"not a SAM (segment-anything ViT) state dict: missing {missing}")

    # --- image encoder
    embed_dim, in_chans, patch, patch_w = _shape(sd, _ENC + "patch_embed.proj.weight")
    if patch != patch_w:
        raise ValueError(f"non-square patch embedding {patch}x{patch_w}")
    pos = _shape(sd, _ENC + "pos_embed")  # [1, grid, grid, dim]
    if len(pos) != 4 or pos[1] != pos[2] or pos[3] != embed_dim:
        raise ValueError(f"pos_embed has shape {pos}, expected [1, G, G, {embed_dim}]")
    grid = pos[1]
    image_size = grid * patch
    depth = _count_indexed(sd, _ENC + "blocks.")
    if depth == 0:
        raise ValueError("no image_encoder.blocks.* tensors")
    if _ENC + "blocks.0.attn.rel_pos_h" not in sd:
        raise ValueError("image encoder without relative position embeddings (rel_pos_h); not a SAM encoder")
    head_dim = _shape(sd, _ENC + "blocks.0.attn.rel_pos_h")[1]
    if head_dim <= 0 or embed_dim % head_dim:
        raise ValueError(f"head dim {head_dim} (from rel_pos_h) does not divide embed dim {embed_dim}")
    num_heads = embed_dim // head_dim
    mlp_dim = _shape(sd, _ENC + "blocks.0.mlp.lin1.weight")[0]
    qkv_bias = (_ENC + "blocks.0.attn.qkv.bias") in sd
    global_idx, window_sizes = [], set()
    for i in range(depth):
        n_rel = _shape(sd, f"{_ENC}blocks.{i}.attn.rel_pos_h")[0]
        if n_rel == 2 * grid - 1:
            global_idx.append(i)
        else:
            if n_rel % 2 == 0:
                raise ValueError(f"block {i}: rel_pos_h length {n_rel} is not 2*window-1")
            window_sizes.add((n_rel + 1) // 2)
    if len(window_sizes) > 1:
        raise ValueError(f"blocks use different attention window sizes {sorted(window_sizes)}")
    window_size = window_sizes.pop() if window_sizes else 0
    out_chans = _shape(sd, _ENC + "neck.0.weight")[0]

    # --- prompt encoder
    prompt_dim = _shape(sd, "prompt_encoder.point_embeddings.0.weight")[1]
    mask_in_chans = _shape(sd, "prompt_encoder.mask_downscaling.3.weight")[0]

    # --- mask decoder
    transformer_dim = _shape(sd, "mask_decoder.iou_token.weight")[1]
    n_mask_tokens = _shape(sd, "mask_decoder.mask_tokens.weight")[0]
    dec_depth = _count_indexed(sd, "mask_decoder.transformer.layers.")
    if dec_depth == 0:
        raise ValueError("no mask_decoder.transformer.layers.* tensors")
    dec_mlp_dim = _shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0]
    internal = _shape(sd, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")[0]
    if internal <= 0 or transformer_dim % internal:
        raise ValueError(f"decoder cross-attention dim {internal} does not divide {transformer_dim}")
    downsample = transformer_dim // internal
    iou_depth = _count_indexed(sd, "mask_decoder.iou_prediction_head.layers.")
    iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight")[0]

    if not (out_chans == prompt_dim == transformer_dim):
        raise ValueError(
            f"inconsistent prompt dims: encoder neck {out_chans}, prompt encoder {prompt_dim}, "
            f"mask decoder {transformer_dim}"
        )
    if internal % DECODER_NUM_HEADS:
        raise ValueError(f"decoder attention dim {internal} is not divisible by {DECODER_NUM_HEADS} heads")

    return SamArchitecture(
        image_size=image_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_dim / embed_dim,
        qkv_bias=qkv_bias,
        window_size=window_size,
        global_attn_indexes=tuple(global_idx),
        out_chans=out_chans,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=mask_in_chans,
        num_multimask_outputs=n_mask_tokens - 1,
        decoder_depth=dec_depth,
        decoder_mlp_dim=dec_mlp_dim,
        decoder_num_heads=DECODER_NUM_HEADS,
        attention_downsample_rate=downsample,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=iou_hidden,
    )


def build_sam_model(arch: SamArchitecture) -> "Sam":
    """Construct a randomly initialised ``segment_anything.modeling.Sam`` with this architecture (on the current
    default torch device; use ``with torch.device("meta"):`` to skip allocation)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.image_size // arch.patch_size
    encoder = ImageEncoderViT(
        img_size=arch.image_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        out_chans=arch.out_chans,
        qkv_bias=arch.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=arch.window_size,
        global_attn_indexes=arch.global_attn_indexes,
    )
    prompt = PromptEncoder(
        embed_dim=arch.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(arch.image_size, arch.image_size),
        mask_in_chans=arch.mask_in_chans,
    )
    decoder = MaskDecoder(
        transformer_dim=arch.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=arch.decoder_depth,
            embedding_dim=arch.prompt_embed_dim,
            mlp_dim=arch.decoder_mlp_dim,
            num_heads=arch.decoder_num_heads,
            attention_downsample_rate=arch.attention_downsample_rate,
        ),
        num_multimask_outputs=arch.num_multimask_outputs,
        iou_head_depth=arch.iou_head_depth,
        iou_head_hidden_dim=arch.iou_head_hidden_dim,
    )
    return Sam(encoder, prompt, decoder, pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))


# ----------------------------------------------------------------------------------------------------------------
# checkpoint files


def _missing_checkpoint_message(model_type: str, given: Optional[Path]) -> str:
    kind = model_type if model_type in SAM_CHECKPOINTS else "vit_h"
    fname, url = SAM_CHECKPOINTS[kind]
    head = "No SAM checkpoint given." if given is None else f"SAM checkpoint not found: {given}."
    label = "ViT-" + kind.split("_")[1].upper()
    return (
        f"{head} Download {fname} (SAM {label}, from the segment-anything release: {url}) "
        f"and pass it with --sam-checkpoint PATH."
    )


def resolve_checkpoint(cfg: SamConfig) -> Path:
    """The checkpoint file of ``cfg`` as an existing path.

    Raises:
        FileNotFoundError: no checkpoint given or the file does not exist; the message names the file to download.
        ValueError: the path is a folder.
    """
    if cfg.checkpoint is None or str(cfg.checkpoint) == "":
        raise FileNotFoundError(_missing_checkpoint_message(cfg.model_type, None))
    path = Path(cfg.checkpoint).expanduser()
    if path.is_dir():
        raise ValueError(f"SAM checkpoint {path} is a folder; pass the .pth file itself (e.g. {path}/"
                         f"{SAM_CHECKPOINTS['vit_h'][0]}).")
    if not path.is_file():
        raise FileNotFoundError(_missing_checkpoint_message(cfg.model_type, path))
    return path


def _read_state_dict(path: Path) -> Dict[str, "torch.Tensor"]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` a SAM state dict, with clear errors."""
    import torch

    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # zip (torch >= 1.6) or legacy pickle
        raise ValueError(
            f"{path} is not a SAM checkpoint: not a torch file (starts with {magic!r}). "
            f"Expected a segment-anything state dict such as {SAM_CHECKPOINTS['vit_h'][0]}."
        )
    try:
        # Not mmap=True: the tensors are assigned into the model, and a memory-mapped file rewritten while the
        # model lives would crash the process (SIGBUS). One CPU copy of the weights is the peak either way.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is not a SAM checkpoint: torch.load(weights_only=True) failed ({type(e).__name__}: {reason}). "
            f"Expected a segment-anything state dict such as {SAM_CHECKPOINTS['vit_h'][0]}."
        ) from None
    if isinstance(obj, Mapping) and _REQUIRED_KEYS[0] not in obj:
        for wrapper in ("model", "state_dict"):  # common training-framework wrappers
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and _REQUIRED_KEYS[0] in inner:
                obj = inner
                break
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DistributedDataParallel
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} is not a SAM checkpoint: it holds a {type(obj).__name__}, not a state dict.")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise ValueError(f"{path} is not a SAM state dict: entry {bad!r} is a {type(obj[bad]).__name__}.")
    return dict(obj)


def load_sam(cfg: SamConfig, device: Union[str, "torch.device"] = "cpu") -> "Sam":
    """Load a SAM model from ``cfg.checkpoint``, its architecture read from the tensor shapes.

    Released checkpoints (ViT-H/L/B) and tiny random ones (:func:`pepeseg3d_ns.priors.tiny_models.build_tiny_sam`)
    go through exactly this code. The module is built on the meta device and the loaded tensors are assigned
    into it (no random init, no second copy of the weights), then moved to ``device`` as float32, in eval mode.

    Raises:
        FileNotFoundError: no checkpoint given / file missing (the message says what to download and the flag).
        ValueError: the file is not a SAM state dict, or its architecture contradicts ``cfg.model_type``.
    """
    import torch

    if cfg.model_type != "auto" and cfg.model_type not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM model type {cfg.model_type!r}; expected 'auto', {', '.join(SAM_VARIANTS)}")
    path = resolve_checkpoint(cfg)
    sd = _read_state_dict(path)
    try:
        arch = infer_sam_architecture(sd)
    except ValueError as e:
        sample = ", ".join(list(sd)[:4])
        raise ValueError(f"{path} is not a SAM checkpoint: {e} (found {len(sd)} tensors, e.g. {sample}).") from None
    if cfg.model_type != "auto":
        want_dim, want_depth = SAM_VARIANTS[cfg.model_type]
        if (arch.embed_dim, arch.depth) != (want_dim, want_depth):
            raise ValueError(
                f"{path} does not hold SAM {cfg.model_type}: expected a {want_dim}-d, {want_depth}-block image "
                f"encoder, found {arch.embed_dim}-d with {arch.depth} blocks ({arch.model_type}). "
                f"Set the SAM model type to 'auto'"
                + (f" (or '{arch.model_type}')" if arch.model_type != "custom" else "")
                + " or pass the right checkpoint."
            )
    with torch.device("meta"):
        sam = build_sam_model(arch)
    try:
        sam.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: tensors do not fit the SAM architecture inferred from them ({arch}): "
            f"{str(e).strip().splitlines()[0]}"
        ) from None
    # Non-persistent buffers are not in checkpoints: set them (they were created on the meta device).
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), persistent=False)
    left = [n for n, t in list(sam.named_parameters()) + list(sam.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - strict loading makes this unreachable
        raise ValueError(f"{path}: tensors {left[:5]} were not loaded")
    sam = sam.to(device=device, dtype=torch.float32)
    sam.requires_grad_(False)
    return sam.eval()


# ----------------------------------------------------------------------------------------------------------------
# mask source

#: SamAutomaticMaskGenerator parameters we do not expose; they enter the signature so a change here is noticed.
_FIXED_GENERATOR_PARAMS: Dict[str, Any] = {
    "stability_score_offset": 1.0,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 1,
    "output_mode": "binary_mask",
    "multimask_output": True,
}


class SamMaskSource:
    """:class:`MaskSource` backed by ``SamAutomaticMaskGenerator`` (all granularities kept).

    The model is loaded lazily, on the first call (or by :meth:`load`), so a prior cache can compare
    :meth:`signature` with what is on disk without paying for a ViT-H load. :meth:`signature` does need the
    checkpoint file (it hashes it, once) and raises the same ``FileNotFoundError`` as :func:`load_sam` when it
    is missing.
    """

    name = "sam"

    def __init__(self, cfg: Optional[SamConfig] = None, device: Union[str, "torch.device"] = "cpu") -> None:
        self.cfg = cfg if cfg is not None else SamConfig()
        self.device = str(device)
        self._generator = None

    def signature(self) -> Dict[str, Any]:
        """JSON-serialisable description of everything that changes the masks (checkpoint name, size, sha256;
        model type; every generator parameter)."""
        path = resolve_checkpoint(self.cfg)
        c = self.cfg
        params = {  # normalised types, so that 0 and 0.0 give the same signature
            "model_type": str(c.model_type),
            "points_per_side": int(c.points_per_side),
            "pred_iou_thresh": float(c.pred_iou_thresh),
            "stability_score_thresh": float(c.stability_score_thresh),
            "box_nms_thresh": float(c.box_nms_thresh),
            "min_mask_region_area": int(c.min_mask_region_area),
            "crop_n_layers": int(c.crop_n_layers),
            "points_per_batch": int(c.points_per_batch),
        }
        for f in fields(c):  # fields added later still enter the signature
            if f.name != "checkpoint" and f.name not in params:
                params[f.name] = getattr(c, f.name)
        return {
            "source": self.name,
            "checkpoint": {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)},
            **params,
            **_FIXED_GENERATOR_PARAMS,
        }

    def load(self) -> None:
        """Load the model and build the generator now (idempotent)."""
        if self._generator is not None:
            return
        from segment_anything import SamAutomaticMaskGenerator

        sam = load_sam(self.cfg, self.device)
        c = self.cfg
        fixed = {k: v for k, v in _FIXED_GENERATOR_PARAMS.items() if k != "multimask_output"}
        self._generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=c.points_per_side,
            points_per_batch=c.points_per_batch,
            pred_iou_thresh=c.pred_iou_thresh,
            stability_score_thresh=c.stability_score_thresh,
            box_nms_thresh=c.box_nms_thresh,
            crop_n_layers=c.crop_n_layers,
            min_mask_region_area=c.min_mask_region_area,
            **fixed,
        )

    def __call__(self, image: np.ndarray, stem: str = "") -> Dict[str, np.ndarray]:
        """Masks of one image.

        Args:
            image: [H, W, 3] uint8 RGB.
            stem: image file stem (unused; part of the source protocol).

        Returns:
            ``{"masks": bool [M, H, W], "scores": float32 [M] (predicted IoU), "stability": float32 [M]}``.
        """
        image = check_rgb_image(image, stem)
        self.load()
        records = self._generator.generate(image)
        h, w = image.shape[:2]
        if records:
            masks = np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])
        else:
            masks = np.zeros((0, h, w), dtype=bool)
        return {
            "masks": masks,
            "scores": np.asarray([r["predicted_iou"] for r in records], dtype=np.float32).reshape(-1),
            "stability": np.asarray([r["stability_score"] for r in records], dtype=np.float32).reshape(-1),
        }
