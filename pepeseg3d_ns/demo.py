"""``pepeseg3d demo``: synthesise a scene, train ``pepe-recon`` on it, evaluate held-out views.

The run is an ordinary nerfstudio run (``<output_dir>/runs/<scene>/pepe-recon/demo/config.yml``), so
``ns-eval`` / ``ns-viewer`` / ``ns-render`` work on it afterwards. Held-out views are nerfstudio's default
split (every ~10th image, ``eval_mode="fraction"``, ``train_split_fraction=0.9``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

import torch


def run_demo(
    output_dir: Path = Path("demo_out"),
    scene: str = "tabletop",
    resolution: int = 128,
    n_views: int = 40,
    seed: int = 0,
    steps: int = 2000,
    device: Optional[str] = None,
    contrast_steps: int = 1000,
) -> Dict[str, float]:
    """The whole method on a synthetic scene: synthesise (or reuse) it, build its simulated perception priors,
    train ``pepe-recon`` for ``steps`` iterations, evaluate held-out views (PSNR), then train ``pepe-contrast``
    for ``contrast_steps`` on the frozen geometry (which measures the mask scales first) and evaluate it by label
    propagation on the held-out views (mIoU / mAcc / mBIoU per hierarchy level).

    Writes ``<output_dir>/demo_comparison.png`` (GT | render | depth), ``<output_dir>/decomposition/`` (HDBSCAN
    clusters at three scales, contact sheet), ``<output_dir>/demo_report.json`` and the scene's ``pepe_priors/``
    (``preview.png``); returns the report.
    """
    from nerfstudio.scripts.train import train_loop

    from pepeseg3d_ns.data.synthetic import SynthConfig, generate_scene
    from pepeseg3d_ns.priors.cli import Priors
    from pepeseg3d_ns.recipes import evaluate_run, evaluate_segmentation, finished_run, make_config, make_contrast_config

    output_dir = Path(output_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scene_dir = output_dir / "scenes" / scene
    t0 = time.perf_counter()
    if not (scene_dir / "transforms.json").exists():
        generate_scene(SynthConfig(scene=scene, output_dir=scene_dir, n_views=n_views, resolution=resolution, seed=seed))
    t_synth = time.perf_counter() - t0
    Priors(data=scene_dir, seed=seed, progress=False).main()  # simulated SAM / Depth-Anything priors

    config = make_config(scene_dir, output_dir / "runs", steps, device, seed)
    config.pipeline.datamanager.priors = "require"
    t1 = time.perf_counter()
    if not finished_run(config, steps):  # a re-run reuses a finished run
        config.save_config()
        train_loop(local_rank=0, world_size=1, config=config)
    t_train = time.perf_counter() - t1

    config_path = config.get_base_dir() / "config.yml"
    report = evaluate_run(config_path, picture=output_dir / "demo_comparison.png")
    report.update(
        {"scene": scene, "resolution": resolution, "steps": steps, "device": device,
         "synth_s": round(t_synth, 1), "train_s": round(t_train, 1), "config": str(config_path)}
    )
    print(
        f"\npepe-recon on '{scene}' ({resolution}px, {steps} steps, {device}): held-out PSNR {report['psnr']:.2f} dB, "
        f"SSIM {report['ssim']:.3f} over {report['n_eval_views']} views, {report['num_gaussians']} Gaussians; "
        f"training took {t_train:.0f} s.\nPicture (GT | render | depth): {output_dir / 'demo_comparison.png'}"
    )
    if contrast_steps > 0:
        # stage 2 measures the mask scales on the frozen geometry itself and keeps them in its checkpoint
        from pepeseg3d_ns.decompose import run_decompose
        from pepeseg3d_ns.eval.propagation import format_summary

        cconfig = make_contrast_config(config_path, output_dir / "runs", contrast_steps, device, seed)
        t2 = time.perf_counter()
        if not finished_run(cconfig, contrast_steps):
            cconfig.save_config()
            train_loop(local_rank=0, world_size=1, config=cconfig)
        t_contrast = time.perf_counter() - t2
        cpath = cconfig.get_base_dir() / "config.yml"
        seg = evaluate_segmentation(cpath)
        dec = run_decompose(cpath, scales=(0.1, 0.5, 0.9), output_dir=output_dir / "decomposition", split="eval",
                            max_views=3, progress=False)
        report.update({"contrast_steps": contrast_steps, "contrast_s": round(t_contrast, 1), "contrast_config": str(cpath),
                       "segmentation": seg["summary"]["per_level"], "segmentation_overall": seg["summary"]["overall"],
                       "decomposition": dec["contact_sheet"]})
        print(f"\npepe-contrast ({contrast_steps} steps, {t_contrast:.0f} s), label propagation on held-out views "
              f"(cosine >= 0.7):\n{format_summary(seg['summary'])}Decomposition (rgb | s=0.1 | 0.5 | 0.9): "
              f"{dec['contact_sheet']}\nRun: {cpath}  (ns-viewer --load-config {cpath})")
    (output_dir / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report
