"""Dataparser for nerfstudio-format scenes that reads the initial point cloud without open3d.

nerfstudio 1.1.5 reads ``ply_file_path`` with open3d, whose wheel needs system libraries (``libusb-1.0``)
that a minimal Linux install lacks: ``import open3d`` then fails and training stops before it starts.
:class:`PepeDataParserConfig` is nerfstudio's ``nerfstudio-data`` parser with ``load_3D_points=True`` and a
``plyfile``-based reader, so pip alone is enough.

``transforms.json`` is checked before nerfstudio parses it (:func:`pepeseg3d_ns.data.validate.check_transforms`):
frames present, poses finite and not all at one position, and no path leading outside the dataset folder unless
``allow_outside_paths``; points of the cloud with a NaN or inf coordinate are dropped with a warning.

Scenes made by :mod:`pepeseg3d_ns.data.synthetic` also get their ground truth indexed in
``DataparserOutputs.metadata["gt_masks"]`` (a :class:`~pepeseg3d_ns.data.gt_masks.GtMasks` of instance-id maps
per hierarchy level), like the benchmark parsers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Type

import numpy as np
import torch
from PIL import UnidentifiedImageError

from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig

from pepeseg3d_ns.data.gt_masks import GtMasks, index_id_maps


def read_ply_points(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Vertices ``[P, 3] float32`` and colours ``[P, 3] uint8`` (or None) of a PLY point cloud (ASCII or binary).

    Colour properties ``red/green/blue`` may be uint8 (0-255) or float (0-1).
    """
    from plyfile import PlyData

    try:
        ply = PlyData.read(str(path))
        vertex = ply["vertex"]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Point cloud {path} (ply_file_path in transforms.json) does not exist") from err
    except Exception as err:
        raise ValueError(f"Point cloud {path} is not a readable PLY file with a 'vertex' element: {err}") from err
    names = vertex.data.dtype.names
    if not all(k in names for k in ("x", "y", "z")):
        raise ValueError(f"Point cloud {path} has no x/y/z vertex properties (found {names})")
    xyz = np.stack([vertex[k] for k in ("x", "y", "z")], axis=-1).astype(np.float32)
    rgb = None
    if all(k in names for k in ("red", "green", "blue")):
        rgb = np.stack([vertex[k] for k in ("red", "green", "blue")], axis=-1)
        if np.issubdtype(rgb.dtype, np.floating):
            rgb = np.clip(rgb * 255.0, 0, 255).round()
        rgb = rgb.astype(np.uint8)
    return xyz, rgb


def synthetic_gt_masks(scene_dir: Path, image_filenames: List[Path], split: str) -> Optional[GtMasks]:
    """Ground-truth index of a synthetic scene (``gt/hierarchy.json`` + ``gt/<level>/<stem>.png`` id maps), or
    None for a scene without ``gt/``.

    Every image of the split gets the id map of each level (``parts``, ``objects``, ``groups``) with the same
    stem; the "objects" of a level are the instance ids present (0 = background excluded). A ``gt/`` folder
    whose maps do not cover every image is an error listing the missing files.
    """
    from pepeseg3d_ns.data.synthetic import LEVELS

    gt_dir = Path(scene_dir) / "gt"
    if not (gt_dir / "hierarchy.json").exists():
        return None
    id_maps: Dict[str, Dict[int, Path]] = {}
    missing: List[str] = []
    for level in LEVELS:
        id_maps[level] = {}
        for i, f in enumerate(image_filenames):
            p = gt_dir / level / f"{Path(f).stem}.png"
            if p.exists():
                id_maps[level][i] = p
            else:
                missing.append(f"{level}/{p.name}")
    if missing:
        raise ValueError(f"{gt_dir} lacks instance-id maps for images of split {split!r}: {missing[:30]}"
                         + (f" ... ({len(missing) - 30} more)" if len(missing) > 30 else ""))
    return GtMasks(
        dataset="synthetic",
        split=split,
        image_names=[Path(f).name for f in image_filenames],
        id_maps=id_maps,
        level_ids=index_id_maps(id_maps),
        notes=[f"instance-id maps from {gt_dir} (0 = background)"],
    )


@dataclass
class PepeDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-data parser that loads the initial point cloud with plyfile (no open3d)."""

    _target: Type = field(default_factory=lambda: PepeDataParser)
    load_3D_points: bool = True
    """Seed the Gaussians from ``ply_file_path`` in transforms.json."""
    allow_outside_paths: bool = False
    """Read frame / point-cloud paths of transforms.json that lead outside the dataset folder (``../x.png``,
    absolute paths); refused by default, since a shared transforms.json could otherwise read other files."""


class PepeDataParser(Nerfstudio):
    """Nerfstudio dataparser with an open3d-free point cloud loader."""

    config: PepeDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train"):
        data = Path(self.config.data)
        meta = data if data.suffix == ".json" else data / "transforms.json"
        if not meta.exists():
            raise FileNotFoundError(
                f"{meta} does not exist: --data must be a nerfstudio scene folder holding transforms.json "
                "(make one with `pepeseg3d synth` or `ns-process-data`)"
            )
        import json

        from pepeseg3d_ns.data.validate import check_transforms
        from pepeseg3d_ns.errors import UserError

        try:
            parsed = json.loads(meta.read_text(encoding="utf8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{meta} is not a readable JSON file: {err}") from None
        check_transforms(parsed, meta, allow_outside_paths=self.config.allow_outside_paths)
        try:
            outputs = super()._generate_dataparser_outputs(split)
        except UnidentifiedImageError as err:
            raise ValueError(f"An image of {meta} could not be decoded: {err}") from err
        gt = synthetic_gt_masks(meta.parent, outputs.image_filenames, split)
        if gt is not None:
            outputs.metadata["gt_masks"] = gt
        return outputs

    def _load_3D_points(self, ply_file_path: Path, transform_matrix: torch.Tensor, scale_factor: float) -> Optional[Dict[str, torch.Tensor]]:
        """Points ``points3D_xyz [P, 3]`` in the parser's normalised world frame and ``points3D_rgb [P, 3] uint8``,
        or None for an empty cloud (then splatfacto starts from random points). Points with a NaN or inf coordinate
        are dropped with a warning naming the file."""
        from pepeseg3d_ns.data.validate import finite_points

        xyz, rgb = read_ply_points(ply_file_path)
        if xyz.shape[0] == 0:
            return None
        xyz, rgb = finite_points(xyz, rgb, ply_file_path)
        pts = torch.from_numpy(xyz)
        pts = torch.cat([pts, torch.ones_like(pts[:, :1])], dim=-1) @ transform_matrix.T
        pts = pts * scale_factor
        if rgb is None:
            rgb = np.full((xyz.shape[0], 3), 128, dtype=np.uint8)
        return {"points3D_xyz": pts, "points3D_rgb": torch.from_numpy(rgb)}
