"""PePESeg3D for nerfstudio: multi-scale 3DGS segmentation guided by perception priors."""

__version__ = "0.1.0"
