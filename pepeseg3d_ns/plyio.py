"""The one place that writes PLY files: a binary little-endian ``vertex`` element with named, typed properties,
through ``plyfile``. Used by the synthetic scenes' ``sparse_pc.ply`` (``x y z`` float, ``red green blue`` uchar,
what nerfstudio's and our dataparser read) and by the 3DGS export (:func:`pepeseg3d_ns.export.write_splat_ply`)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["write_vertex_ply"]


def write_vertex_ply(path: Path, properties: Mapping[str, np.ndarray], comments: Sequence[str] = ()) -> Path:
    """Write ``properties`` (name -> ``[N]`` array, in file order; each keeps its dtype, e.g. ``float32`` ->
    ``float``, ``uint8`` -> ``uchar``) as the ``vertex`` element of a binary little-endian PLY at ``path``
    (parent folders created). Returns ``path``."""
    from plyfile import PlyData, PlyElement

    cols = {name: np.asarray(v).reshape(-1) for name, v in properties.items()}
    n = {c.shape[0] for c in cols.values()}
    if len(n) > 1:
        raise ValueError(f"{path}: PLY properties of different lengths {sorted(n)}")
    arr = np.empty(n.pop() if n else 0, dtype=[(name, c.dtype.newbyteorder("<")) for name, c in cols.items()])
    for name, c in cols.items():
        arr[name] = c
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(arr, "vertex")], byte_order="<", comments=list(comments)).write(str(path))
    return path
