"""Ground-truth masks of a distorted capture go through the undistortion its images go through (MaskWarp), so
evaluation compares masks aligned with the undistorted, cropped view."""

from __future__ import annotations

import numpy as np
import torch

from pepeseg3d_ns.data.gt_masks import resize_nearest
from pepeseg3d_ns.data.undistort import MaskWarp


def _camera(h, w, k1):
    from nerfstudio.cameras import camera_utils
    from nerfstudio.cameras.cameras import Cameras, CameraType

    return Cameras(camera_to_worlds=torch.eye(4)[None, :3], fx=torch.tensor([[150.0]]), fy=torch.tensor([[150.0]]),
                   cx=torch.tensor([[w / 2]]), cy=torch.tensor([[h / 2]]), width=torch.tensor([[w]]),
                   height=torch.tensor([[h]]), distortion_params=camera_utils.get_distortion_params(k1=k1, k2=0.02)[None],
                   camera_type=CameraType.PERSPECTIVE)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_mask_warp_matches_nerfstudios_image_undistortion():
    from nerfstudio.data.datamanagers.full_images_datamanager import _undistort_image

    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    # three objects: one near the corner, where distortion moves pixels most
    mask = ((xx - 30) ** 2 + (yy - 25) ** 2 < 15 ** 2) | ((xx - 80) ** 2 + (yy - 60) ** 2 < 20 ** 2) \
        | ((xx > 125) & (yy > 90))
    image = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)  # the mask as a white-on-black photo
    cam = _camera(h, w, k1=-0.25)
    K = cam.get_intrinsics_matrices()[0].numpy()
    d = cam.distortion_params[0].numpy()
    _, und_image, _ = _undistort_image(cam[0], d, {}, image.copy(), K.copy())
    reference = und_image[..., 0] > 127  # what the trained image shows
    warped = MaskWarp(K=K, size=(h, w), distortion=d)(mask)
    assert warped.shape == reference.shape and warped.shape != (h, w)  # cropped like the image
    naive = resize_nearest(mask, reference.shape)  # the raw mask resized to the view: what evaluation did before
    iou_warp, iou_naive = _iou(warped, reference), _iou(naive, reference)
    assert iou_warp > 0.98 and iou_warp > iou_naive + 0.05, (iou_warp, iou_naive)
    # a mask file of another size than the image (e.g. annotated at half resolution) is brought to it first
    half = resize_nearest(mask, (h // 2, w // 2))
    assert _iou(MaskWarp(K=K, size=(h, w), distortion=d)(half), reference) > max(0.9, iou_naive)
