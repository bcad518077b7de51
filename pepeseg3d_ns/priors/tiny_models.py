"""Tiny randomly initialised SAM and Depth-Anything models, saved in the same formats as the real weights.

They exist because real weights cannot be downloaded on offline machines: tests, benchmarks and offline demos
build one of these into a folder and load it through exactly the code that loads the real models
(:func:`pepeseg3d_ns.priors.sam.load_sam`, :class:`pepeseg3d_ns.priors.depth.DepthAnythingSource`). Their
outputs are meaningless (random weights) but have the right types, shapes and cost structure.

* :func:`build_tiny_sam` -> ``sam_tiny.pth``: a plain state dict (like ``sam_vit_h_4b8939.pth``) of a 2-block,
  32-d ViT SAM with a 256 px input (~0.4 MB).
* :func:`build_tiny_depth_anything` -> a ``save_pretrained`` folder (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) of a 4-layer, 32-d DINOv2 Depth-Anything with a 112 px processor (~0.6 MB).

Both are deterministic for a given ``seed`` and leave the global torch RNG untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from pepeseg3d_ns.priors.sam import DECODER_NUM_HEADS, SamArchitecture, build_sam_model

#: The tiny SAM's architecture; :func:`pepeseg3d_ns.priors.sam.infer_sam_architecture` recovers exactly this.
TINY_SAM_ARCH = SamArchitecture(
    image_size=256,
    patch_size=16,
    in_chans=3,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=4.0,
    qkv_bias=True,
    window_size=4,
    global_attn_indexes=(1,),
    out_chans=32,
    prompt_embed_dim=32,
    mask_in_chans=16,
    num_multimask_outputs=3,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=DECODER_NUM_HEADS,
    attention_downsample_rate=2,
    iou_head_depth=3,
    iou_head_hidden_dim=32,
)
TINY_SAM_FILENAME = "sam_tiny.pth"
#: Input size (short side, multiple of 14) of the tiny Depth-Anything processor; the real one uses 518.
TINY_DEPTH_INPUT_SIZE = 112


def build_tiny_sam(folder_or_file: Union[str, Path], seed: int = 0) -> Path:
    """Build a tiny random SAM and save its state dict.

    Args:
        folder_or_file: a ``.pth`` file path, or a folder (created if needed) that receives ``sam_tiny.pth``.
        seed: torch seed of the random init.

    Returns:
        Path of the saved checkpoint (pass it as ``SamConfig(checkpoint=...)``).
    """
    import torch

    target = Path(folder_or_file)
    path = target if target.suffix in (".pth", ".pt") else target / TINY_SAM_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_model(TINY_SAM_ARCH)
        # ImageEncoderViT zero-initialises the position embeddings; randomise them so that the tiny model's
        # output depends on where things are in the image, like a trained one.
        with torch.no_grad():
            sam.image_encoder.pos_embed.normal_(0.0, 0.02)
            for blk in sam.image_encoder.blocks:
                blk.attn.rel_pos_h.normal_(0.0, 0.02)
                blk.attn.rel_pos_w.normal_(0.0, 0.02)
            # Random 2x2 transposed-conv kernels in the mask decoder's upscaling give salt-and-pepper masks
            # (~2.6k runs per 96x120 mask), whose RLE bookkeeping in SamAutomaticMaskGenerator costs ~5x the
            # network. Kernels constant over their 2x2 taps (nearest-neighbour-like upsampling) give smooth,
            # blob-like masks (~50 runs), as a trained SAM does.
            for layer in sam.mask_decoder.output_upscaling:
                if isinstance(layer, torch.nn.ConvTranspose2d):
                    layer.weight.copy_(layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight))
    torch.save(sam.state_dict(), path)
    return path


def build_tiny_depth_anything(folder: Union[str, Path], seed: int = 0) -> Path:
    """Build a tiny random Depth-Anything (V2 layout, relative depth head) and save it with its image processor.

    The processor is configured like Depth-Anything-V2's (keep aspect ratio, sides multiples of 14, bicubic,
    ImageNet normalisation) but resizes to a 112 px short side instead of 518, for speed.

    Args:
        folder: output folder (created if needed); it becomes a ``from_pretrained``-loadable model folder.
        seed: torch seed of the random init.

    Returns:
        ``folder`` (pass it as ``DepthConfig(model=str(folder), local_files_only=True)``).
    """
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=TINY_DEPTH_INPUT_SIZE,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=32,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config).eval()
        # transformers' init (std 0.02) makes the neck/head signal vanish and the final ReLU then outputs ~0
        # everywhere. PyTorch's default conv init there, plus a small positive bias on the last conv, gives a
        # varying, positive "inverse depth" instead.
        with torch.no_grad():
            for mod in list(model.neck.modules()) + list(model.head.modules()):
                if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    mod.reset_parameters()
            model.head.conv3.bias.fill_(0.1)
    model.save_pretrained(folder)
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": TINY_DEPTH_INPUT_SIZE, "width": TINY_DEPTH_INPUT_SIZE},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,  # PIL bicubic, as Depth-Anything-V2's processor
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )
    processor.save_pretrained(folder)
    return folder
