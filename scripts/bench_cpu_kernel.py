"""Time only the CPU compositing kernel (forward and backward of _RasterizeToPixelsCPU inside rasterize(), median
of 9 after one warm-up) on random scenes at 256 px. Compare two builds side by side with PYTHONPATH=<checkout>
and PEPESEG3D_EXT_DIR=<separate build folder> per checkout."""
import sys, time, statistics, torch
torch.set_num_threads(2)
import importlib
from pepeseg3d_ns.benchmarks import render as B
R = importlib.import_module("pepeseg3d_ns.render.rasterize")
from pepeseg3d_ns.render import cpu_backend as C
F = C._RasterizeToPixelsCPU
T = {"f": 0.0, "b": 0.0}
of, ob = F.forward, F.backward
def fwd(ctx, *a):
    t = time.perf_counter(); r = of(ctx, *a); T["f"] += time.perf_counter() - t; return r
def bwd(ctx, *a):
    t = time.perf_counter(); r = ob(ctx, *a); T["b"] += time.perf_counter() - t; return r
F.forward, F.backward = staticmethod(fwd), staticmethod(bwd)
for n, res, ch in [(50000, 256, 3), (50000, 256, 32), (200000, 256, 3), (200000, 256, 32)]:
    sc = B.random_scene(n, ch, res)
    params = {k: sc[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    wgt = torch.rand(1, res, res, ch)
    fs, bs = [], []
    for r in range(10):
        T["f"] = T["b"] = 0.0
        img, _, info = R.rasterize(**params, viewmats=sc["viewmats"], Ks=sc["Ks"], width=res, height=res)
        (img * wgt).sum().backward()
        if r:
            fs.append(T["f"]); bs.append(T["b"])
    print(f"{n} {res} {ch} kfwd {statistics.median(fs)*1e3:.1f} kbwd {statistics.median(bs)*1e3:.1f}", flush=True)
print("variant", getattr(C, "loaded_variant", lambda: "scalar (before vectorisation)")())
