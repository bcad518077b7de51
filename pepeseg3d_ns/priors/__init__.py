"""Perception priors: SAM masks and Depth-Anything-V2 relative depth, computed once per training image.

Submodules (import them explicitly; this package imports nothing so that ``import pepeseg3d_ns.priors`` stays
light and never pulls in ``segment_anything``, ``torchvision`` or ``transformers``):

* :mod:`pepeseg3d_ns.priors.sam` -- :class:`SamConfig`, :func:`load_sam` (architecture inferred from the
  checkpoint's tensor shapes, so real ViT-H/L/B checkpoints and tiny test models share one loading path) and
  :class:`SamMaskSource` (automatic masks at every granularity).
* :mod:`pepeseg3d_ns.priors.depth` -- :class:`DepthConfig` and :class:`DepthAnythingSource` (relative inverse
  depth at image resolution, from a Hugging Face id or a local folder).
* :mod:`pepeseg3d_ns.priors.tiny_models` -- builders of tiny randomly initialised SAM / Depth-Anything models
  that load through the same code as the real weights (tests, benchmarks, offline demos).

Both sources follow the same small protocol, used by the on-disk prior cache::

    source.name                 # "sam" / "depth-anything-v2"
    source.signature() -> dict  # JSON-serialisable; changes whenever the output could change
    source(image, stem)         # image: [H, W, 3] uint8 RGB; stem: the image file stem (ignored by real models)
"""
