"""No host-device read-back in a steady-state pepe-contrast step: the counter (readback.py) and the steps."""

from __future__ import annotations

import pytest
import torch

from pepeseg3d_ns.benchmarks import contrast_step as sb
from pepeseg3d_ns.readback import ReadbackCounter, allow_readback, cuda_sync_check

# the places a step may read back, and why (every allowance in the step must be one of these)
ALLOWED = ("rasterizer", "image size", "centroid refresh", "Adam keeps its step count on the host")


def test_counter_sees_read_backs_and_allowances():
    x = torch.arange(6.0)
    with ReadbackCounter() as rb:
        x.sum().item()
        bool(x.any())
        int(x[2])
        x.tolist()
        torch.nonzero(x > 2)
        x[x > 2]
        torch.unique(x)
        x.cpu()
        # not read-backs: elementwise selection, a masked fill, shapes, reductions kept on the device
        torch.where(x > 2, x, 0.0)
        y = x.clone()
        y[x > 2] = 0.0
        _ = x.shape[0] + x.numel()
        x.max()
        with allow_readback("logging"):
            float(x.mean())
    ops = [e.op for e in rb.unallowed]
    assert ops == ["item", "bool(tensor)", "int(tensor)", "tolist", "nonzero", "bool-mask indexing", "unique", "cpu()"]
    assert [e.allowed for e in rb.events if e.allowed] == ["logging"]
    assert all(__file__ in e.where for e in rb.events)
    assert "NOT ALLOWED" in rb.report() and "allowed: logging" in rb.report()
    # tensors off the watched device are host data
    with ReadbackCounter(device="cuda") as rb2:
        x.sum().item()
    assert rb2.events == []


def _steps(tmp_path, n_gaussians=300, res=(24, 24)):
    torch.set_num_threads(1)
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, n_gaussians), centroid_start=3, centroid_every=10,
                              centroid_lag=0, centroid_worker="inline", cluster_min_size=5, gate_warmup=2)
    opt = sb.make_optimizer(model)
    cam, batch = sb.make_camera(res), sb.make_batch(res, num_masks=12)
    batch = {k: v for k, v in batch.items() if k not in ("sam_masks", "sam_mask_areas")}  # what the datamanager gives

    def step(s):
        model.step = s
        out = model(cam)
        metrics = model.get_metrics_dict(out, batch)
        losses = model.get_loss_dict(out, batch, metrics)
        sum(losses.values()).backward()
        with allow_readback("Adam keeps its step count on the host"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    return model, step


def test_contrast_steps_read_nothing_back(tmp_path):
    """After the first step (set-up): steps before the centroid loss, the refresh step, and steps with the centroid
    loss: every read-back lies in an allowed place (rasterizer, camera size, refresh, optimizer); the loss path
    itself reads nothing back."""
    model, step = _steps(tmp_path)
    step(0)  # the first step builds the kNN smoothing matrices (set-up, not the steady state)
    with ReadbackCounter() as rb:
        for s in (1, 2):  # gate held (warm-up), then trained
            step(s)
    assert not rb.unallowed, rb.report()
    step(3)  # the refresh (clustered and merged in this step: lag 0): allowed to read back
    assert model.centroids_upper.shape[0] > 0, "the centroid loss must be active in the steps below"
    with ReadbackCounter() as rb:
        for s in (4, 5):
            losses = step(s)
    assert not rb.unallowed, rb.report()
    assert set(losses) == {"contrast_loss", "perception_loss", "centroid_loss", "norm_loss"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert float(losses["centroid_loss"]) > 0
    assert all(any(e.allowed.startswith(a) for a in ALLOWED) for e in rb.events), rb.report()
    assert model._sample_gen.device == model.device  # random numbers are drawn where they are used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_contrast_steps_pass_cuda_sync_check(tmp_path):
    """The same steps on CUDA under torch.cuda.set_sync_debug_mode("error") (allowed places excepted)."""
    torch.set_num_threads(1)
    model, _ = sb.build_model(sb.make_recon_checkpoint(tmp_path, 2000), device="cuda", centroid_start=10**6)
    opt = sb.make_optimizer(model)
    cam, batch = sb.make_camera((64, 64), device="cuda"), sb.make_batch((64, 64), num_masks=20, device="cuda")
    batch = {k: v for k, v in batch.items() if k not in ("sam_masks", "sam_mask_areas")}
    sb.train_step(model, opt, cam, batch, 0)  # first step: lazy set-up (kNN matrices on the device, generator)
    torch.cuda.synchronize()
    with cuda_sync_check("error"):
        for s in (1, 2, 3):
            model.step = s
            out = model(cam)
            loss = sum(model.get_loss_dict(out, batch).values())
            loss.backward()
            with allow_readback("Adam keeps its step count on the host"):
                opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


class _Untouchable:
    """Stands in for the batch's PixelMasks: any use of it fails the step."""

    def __getattr__(self, name):
        raise AssertionError(f"masks used ({name})")


def _recon_model(refine_start, depth_loss_weight=0.0):
    from nerfstudio.data.scene_box import SceneBox

    from pepeseg3d_ns.recon.model import PepeReconModelConfig

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(400, 3, generator=g) * 2 + torch.tensor([-1.0, -1.0, 2.0])
    cfg = PepeReconModelConfig(random_init=False, refine_start=refine_start, num_downscales=0,
                               depth_loss_weight=depth_loss_weight, use_absgrad=False)
    model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-2.0, -2.0, 1.0], [2.0, 2.0, 5.0]])), num_train_data=4,
                      metadata={}, seed_points=(pts, (torch.rand(400, 3, generator=g) * 255).byte()))
    model.optimizers = {k: torch.optim.Adam(p, lr=1e-3) for k, p in model.get_param_groups().items()}
    return model.train()


def test_recon_steps_outside_the_refinement_window_leave_the_masks_alone():
    """Outside the window a pepe-recon step never touches the masks and reads nothing back outside the marked
    places. (The depth loss is off here: recon/losses.py is being made sync-free separately.)"""
    torch.set_num_threads(1)
    model = _recon_model(refine_start=10**6)
    cam, b = sb.make_camera((24, 24)), sb.make_batch((24, 24), num_masks=8)
    batch = {"image": b["image"], "depth_prior": b["depth_prior"], "pixel_masks": _Untouchable()}
    unallowed = []
    for s in range(3):
        model.step = s
        with ReadbackCounter() as rb:
            out = model(cam)
            losses = model.get_loss_dict(out, batch, model.get_metrics_dict(out, batch))
            sum(losses.values()).backward()
        unallowed += rb.unallowed
        model.step_post_backward(s)  # densification bookkeeping (gsplat's strategy reads back; not counted)
    assert not unallowed, "\n".join(map(str, unallowed))
    # inside the window the same batch is used (and fails): the check above has teeth
    model = _recon_model(refine_start=0)
    model.step = 0
    out = model(cam)
    sum(model.get_loss_dict(out, batch, model.get_metrics_dict(out, batch)).values()).backward()
    with pytest.raises(AssertionError, match="masks used"):
        model.step_post_backward(0)
