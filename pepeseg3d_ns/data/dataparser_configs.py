"""nerfstudio dataparser registrations (entry points ``nerfstudio.dataparser_configs``).

Kept light on purpose: nerfstudio imports this module while it builds its own list of dataparsers, so it
must not import a datamanager, a model, ``nerfstudio.configs.dataparser_configs`` (a circular import there
makes nerfstudio drop the parser) or anything heavy (segment_anything, transformers).

Registered names: ``spinnerf`` and ``lerf-mask`` (see :mod:`pepeseg3d_ns.data.benchmarks`).
"""

from __future__ import annotations

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from pepeseg3d_ns.data.benchmarks import LerfMaskDataParserConfig, SpinNerfDataParserConfig

spinnerf = DataParserSpecification(
    config=SpinNerfDataParserConfig(),
    description="SPIn-NeRF / MVSeg LLFF scenes (images_N/, poses_bounds.npy or sparse/0) with ground-truth "
    "object masks (MVSeg masks_dir or the inpainting set's images_N/label/); every 8th view is held out.",
)

lerf_mask = DataParserSpecification(
    config=LerfMaskDataParserConfig(),
    description="LERF-Mask scenes (Gaussian Grouping release): images/, images_train/ = train split, sparse/0, "
    "test_mask/<k>/<prompt>.png ground truth for the sorted test views.",
)
