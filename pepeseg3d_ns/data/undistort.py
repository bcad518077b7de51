"""The undistortion of nerfstudio's datamanager, for masks: ground truth of a distorted capture aligned with the
undistorted, cropped image the model is trained and evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from pepeseg3d_ns.data.gt_masks import resize_nearest


@dataclass
class MaskWarp:
    """The undistortion nerfstudio's datamanager applies to a perspective image (``cv2.getOptimalNewCameraMatrix``
    with alpha 0, ``cv2.undistort``, crop to the valid region), applied to a mask with nearest-neighbour sampling so
    that it stays binary and aligned pixel for pixel with the undistorted image.

    Attributes:
        K: ``[3, 3]`` intrinsics of the original (distorted) image; size: its ``(H, W)``.
        distortion: nerfstudio's ``[6]`` ``(k1, k2, k3, k4, p1, p2)`` (k4 must be 0, as nerfstudio requires).
    """

    K: np.ndarray
    size: Tuple[int, int]
    distortion: np.ndarray

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """``bool [h, w]`` (any size: first brought to the image's size, nearest) -> ``bool [H', W']`` undistorted."""
        import cv2

        h, w = self.size
        m = resize_nearest(np.asarray(mask, dtype=bool), (h, w)).astype(np.uint8)
        k1, k2, k3, k4, p1, p2 = (float(x) for x in self.distortion)
        dist = np.array([k1, k2, p1, p2, k3, k4, 0.0, 0.0], dtype=np.float64)  # OpenCV's order, as nerfstudio's
        K = np.array(self.K, dtype=np.float64)
        K[0, 2] -= 0.5  # OpenCV's pixel centres, as nerfstudio shifts them
        K[1, 2] -= 0.5
        new_k, roi = cv2.getOptimalNewCameraMatrix(K, dist, (w, h), 0)
        map_x, map_y = cv2.initUndistortRectifyMap(K, dist, None, new_k, (w, h), cv2.CV_32FC1)
        out = cv2.remap(m, map_x, map_y, interpolation=cv2.INTER_NEAREST)
        x, y, rw, rh = roi
        return out[y : y + rh, x : x + rw] > 0
