"""pepe-contrast (PePESeg3D stage 2): scale-aware contrastive features on a frozen 3D Gaussian scene.

Submodules (imported explicitly, this package stays import-light):

* ``losses``    -- pure loss functions ``Lm`` (scale-aware contrastive), ``Lp`` (perception), ``Lc`` (centroid
  pull), ``L2D`` (feature norm);
* ``sampling``  -- per-step pixel/pair sampling: mask membership, pixel weights, active labels, pair targets,
  hard-pair over-sampling, perception pairs with adaptive thresholds;
* ``centroids`` -- the global centroid bank (EMA merge of HDBSCAN candidates) behind ``Lc``.
"""
