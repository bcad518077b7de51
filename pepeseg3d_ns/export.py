"""Export of a selection of Gaussians: the standard 3DGS ``.ply`` (the layout of the original 3D Gaussian
Splatting code, which SuperSplat, antimatter15/splat, gsplat's viewers and ``ns-export gaussian-splat`` readers
all load), its Gaussian indices, and its 2D masks in the training views.

PLY vertex properties, all ``float32``, in this order: ``x y z`` (means, in the run's world frame, i.e. after
the dataparser's transform), ``nx ny nz`` (zeros), ``f_dc_0..2`` (SH degree-0 coefficients),
``f_rest_0..3K-1`` (the higher SH coefficients, channel-major: all of red's K, then green's, then blue's),
``opacity`` (logit), ``scale_0..2`` (log), ``rot_0..3`` (quaternion ``w x y z``, as stored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from pepeseg3d_ns.errors import UserError
from pepeseg3d_ns.plyio import write_vertex_ply


class EmptySelectionError(UserError):
    """Nothing would be exported: the selection holds no Gaussian (with finite parameters). No file is written."""


def splat_ply_properties(n_rest: int) -> list[str]:
    """Property names of the PLY for ``n_rest`` higher-order SH bases per colour channel."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_splat_ply(path: Path, gauss_params: Dict[str, Tensor], selection: Optional[Tensor] = None) -> int:
    """Write the Gaussians (raw parameters as splatfacto stores them: ``means [N, 3]``, ``features_dc [N, 3]``,
    ``features_rest [N, K, 3]``, ``opacities [N, 1]`` logits, ``scales [N, 3]`` logs, ``quats [N, 4]`` wxyz),
    restricted to ``selection`` (``bool [N]`` or indices; None = all), as a binary little-endian 3DGS PLY.
    Gaussians with a non-finite parameter are dropped. Returns the number written; :class:`EmptySelectionError`
    (and no file) when that number would be 0."""
    n = gauss_params["means"].shape[0]
    idx = torch.arange(n) if selection is None else torch.as_tensor(selection).cpu()
    if idx.dtype == torch.bool:
        if idx.shape[0] != n:
            raise ValueError(f"selection has {idx.shape[0]} entries for {n} Gaussians")
        idx = torch.nonzero(idx).flatten()
    if len(idx) == 0:
        raise EmptySelectionError(f"nothing written to {path}: the selection is empty")
    get = lambda k: gauss_params[k].detach().cpu().float()[idx]  # noqa: E731
    rest = get("features_rest")
    cols = [get("means"), torch.zeros(len(idx), 3), get("features_dc"),
            rest.transpose(1, 2).reshape(len(idx), -1), get("opacities").reshape(-1, 1), get("scales"), get("quats")]
    data = torch.cat(cols, dim=1).numpy()
    data = data[np.isfinite(data).all(1)]
    if data.shape[0] == 0:
        raise EmptySelectionError(f"nothing written to {path}: all {len(idx)} selected Gaussians have NaN/inf parameters")
    names = splat_ply_properties(rest.shape[1])
    write_vertex_ply(path, {nm: data[:, i].astype(np.float32) for i, nm in enumerate(names)})
    return int(data.shape[0])


def save_selection(out_dir: Path, model, selected: Tensor, meta: Optional[dict] = None) -> Dict[str, Path]:
    """Write ``selection.ply`` (the selected Gaussians), ``selection_indices.npy`` (``int64 [S]`` indices into the
    checkpoint's Gaussians) and ``selection.json`` (count, query settings in ``meta``) into ``out_dir``.
    An empty selection writes nothing (not even ``out_dir``) and raises :class:`EmptySelectionError`."""
    out_dir = Path(out_dir)
    idx = torch.nonzero(selected.cpu()).flatten().numpy().astype(np.int64)
    if idx.size == 0:
        raise EmptySelectionError(f"nothing exported to {out_dir}: the selection holds no Gaussian")
    out_dir.mkdir(parents=True, exist_ok=True)
    ply = out_dir / "selection.ply"
    count = write_splat_ply(ply, model.gauss_params, torch.from_numpy(idx))
    np.save(out_dir / "selection_indices.npy", idx)
    info = {"num_selected": int(idx.size), "num_written": count, "num_gaussians": int(model.num_points), **(meta or {})}
    (out_dir / "selection.json").write_text(json.dumps(info, indent=2))
    return {"ply": ply, "indices": out_dir / "selection_indices.npy", "json": out_dir / "selection.json"}


def save_masks(out_dir: Path, masks: Sequence[np.ndarray], names: Sequence[str]) -> list[Path]:
    """Write ``bool [H, W]`` masks as 8-bit PNGs (0 / 255) named ``<name>.png``."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for m, name in zip(masks, names):
        p = out_dir / f"{Path(name).stem}.png"
        Image.fromarray((np.asarray(m, dtype=bool) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths
