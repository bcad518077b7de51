"""CPU alpha compositing of projected 2D Gaussians: a C++ twin of gsplat 1.4.0's ``rasterize_to_pixels``.

The kernel (``csrc/rasterize_cpu.cpp``) is compiled just in time with :func:`torch.utils.cpp_extension.load`
(g++/clang++ and ninja, OpenMP, no CUDA toolkit) the first time it is needed, and cached under
``~/.cache/pepeseg3d_ns/torch_extensions/<torch version>/`` (or ``$PEPESEG3D_EXT_DIR``).  It registers the
ops ``torch.ops.pepeseg3d_cpu.rasterize_fwd`` / ``rasterize_bwd``; :func:`rasterize_to_pixels_cpu` wraps them
in a :class:`torch.autograd.Function` with the analytic backward.

Semantics are gsplat's (non-packed mode): per pixel, front-to-back over its tile's depth-sorted list,
``alpha = min(0.999, opacity * exp(-sigma))``, Gaussians with ``sigma < 0`` or ``alpha < 1/255`` skipped, stop
(exclusive) when the transmittance would drop to ``<= 1e-4``; gradients as gsplat's CUDA backward (no gradient
through the 0.999 clamp).  Nothing here imports gsplat.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["load_extension", "is_available", "rasterize_to_pixels_cpu", "extension_build_dir"]

_EXT_NAME = "pepeseg3d_rasterize_cpu"
_OPS_NAMESPACE = "pepeseg3d_cpu"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "rasterize_cpu.cpp")
# (tag, extra cflags, extra ldflags), tried in order.  The kernel is compiled on the machine that runs it, so the
# first try targets its own CPU (-march=native: AVX2 / AVX-512 / NEON lanes); the portable flags are the fallback
# when the compiler refuses -march=native.  -ffp-contract=off everywhere: the compiler never fuses a*b+c into an
# FMA on its own, so forward and backward recompute bitwise the same sigma and alpha, and the native and portable
# builds give bitwise the same results.  The serial variants are only tried when the compiler has no OpenMP
# (e.g. Apple clang).  Each flag set builds under its own extension name (see _variant_name).
_BASE_FLAGS = ["-O3", "-ffp-contract=off"]
_VARIANTS = (
    ("native", _BASE_FLAGS + ["-march=native", "-fopenmp"], ["-fopenmp"]),
    ("portable", _BASE_FLAGS + ["-fopenmp"], ["-fopenmp"]),
    ("native_serial", _BASE_FLAGS + ["-march=native"], []),
    ("serial", list(_BASE_FLAGS), []),
)
_OPENMP_TROUBLE = re.compile(r"omp\.h|unsupported option '-fopenmp'|-lgomp|-lomp\b|libgomp|libomp")

_lock = threading.Lock()
_ops = None
_error: Optional[str] = None
_loaded: Optional[Tuple[str, str, Tuple[str, ...]]] = None  # (tag, extension name, cflags) of the loaded build


def extension_build_dir() -> str:
    """Where the compiled extension lives: ``$PEPESEG3D_EXT_DIR`` or
    ``~/.cache/pepeseg3d_ns/torch_extensions/<torch version>``."""
    env = os.environ.get("PEPESEG3D_EXT_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    version = re.sub(r"[^A-Za-z0-9_.+-]", "_", torch.__version__)
    return os.path.join(os.path.expanduser("~"), ".cache", "pepeseg3d_ns", "torch_extensions", version)


def _tail(text: str, n: int = 25) -> str:
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _native_target() -> Optional[str]:
    """What ``-march=native`` means to this compiler on this CPU (its predefined macros, e.g. ``__AVX512F__``),
    or None when the compiler refuses the flag."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return "\n".join(sorted(out.stdout.splitlines()))


def _variant_name(tag: str, cflags, ldflags, target: str = "") -> str:
    """Extension name of one build variant: the tag and a hash of its flags (and, for -march=native, of the CPU
    target the compiler resolved), so a build made with other flags or on another CPU (a shared home directory)
    is never loaded."""
    key = "\0".join([tag, " ".join(cflags), " ".join(ldflags), target])
    return f"{_EXT_NAME}_{tag}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _native_disabled() -> bool:
    return os.environ.get("PEPESEG3D_CPU_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def loaded_variant() -> Optional[Tuple[str, str, Tuple[str, ...]]]:
    """``(tag, extension name, cflags)`` of the loaded build (tag ``native``, ``portable``, ``native_serial`` or
    ``serial``), or None before :func:`load_extension` succeeded."""
    return _loaded


@contextlib.contextmanager
def _quiet_cpp_extension_logger(verbose: bool):
    """torch.utils.cpp_extension warns "No CUDA runtime is found" at import on GPU-less machines; irrelevant here."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _build_and_load(name: str, build_dir: str, cflags, ldflags, verbose: bool) -> None:
    os.makedirs(build_dir, exist_ok=True)
    with _quiet_cpp_extension_logger(verbose):
        from torch.utils.cpp_extension import load

        load(
            name=name,
            sources=[_SOURCE],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=build_dir,
            verbose=verbose,
            with_cuda=False,
            is_python_module=False,
        )


def load_extension(verbose: bool = False):
    """Compile (once per process; later processes reuse the cached build) and load the C++ kernel.

    Returns the op namespace ``torch.ops.pepeseg3d_cpu`` (attributes ``rasterize_fwd``, ``rasterize_bwd``).
    Raises RuntimeError, with the compiler's last lines, when the build fails.
    """
    global _ops, _error, _loaded
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is not None:
            return _ops
        if _error is not None and not verbose:
            raise RuntimeError(_error)
        build_dir = extension_build_dir()
        errors = []
        openmp_trouble = False
        native_target = None if _native_disabled() else _native_target()
        for tag, cflags, ldflags in _VARIANTS:
            native = "-march=native" in cflags
            if native and native_target is None:
                continue  # the compiler refuses -march=native (or PEPESEG3D_CPU_NATIVE=0): portable flags
            if not ldflags and not openmp_trouble:
                continue  # serial builds only for a compiler without OpenMP
            name = _variant_name(tag, cflags, ldflags, native_target if native else "")
            try:
                _build_and_load(name, os.path.join(build_dir, name), cflags, ldflags, verbose)
                _ops = getattr(torch.ops, _OPS_NAMESPACE)
                _ops.rasterize_fwd  # noqa: B018  (raises if the library did not register the ops)
                _error = None
                _loaded = (tag, name, tuple(cflags))
                return _ops
            except Exception as exc:  # compiler missing, ninja missing, compile error, ...
                errors.append(exc)
                if _OPENMP_TROUBLE.search(str(exc)):
                    openmp_trouble = True
                elif not native:
                    break  # not an OpenMP problem: another portable build would fail the same way
        exc = errors[-1]
        detail = _tail(exc) if not verbose else f"{_tail(exc)}\n(see the compiler output above)"
        _error = (
            "pepeseg3d_ns could not build its C++ CPU rasterizer. The package needs a C++ compiler "
            "(g++ or clang++, with OpenMP) and ninja (`pip install ninja`) to compile it just in time "
            f"(no CUDA toolkit needed). Build directory: {build_dir}\n{type(exc).__name__}: {detail}"
        )
        raise RuntimeError(_error) from exc


def is_available() -> bool:
    """True when the C++ kernel compiles/loads (compiling it on first use); never raises."""
    try:
        load_extension()
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------


def _check(name: str, t: Tensor, shape: Tuple[Optional[int], ...], dtype: Optional[torch.dtype]) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (got device {t.device}); use gsplat on CUDA")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


class _RasterizeToPixelsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                isect_offsets, flatten_ids, absgrad):
        ops = load_extension()
        # keep the caller's tensor object: `.absgrad` is attached to it in backward (as gsplat does)
        ctx.means2d_ref = means2d if absgrad else None
        means2d, conics, colors, opacities = (t.contiguous() for t in (means2d, conics, colors, opacities))
        render_colors, render_alphas, t_final, last_ids = ops.rasterize_fwd(
            means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids,
                              t_final, last_ids)
        ctx.geometry = (width, height, tile_size)
        ctx.absgrad = absgrad
        return render_colors, render_alphas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_render_colors, v_render_alphas):
        (means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, t_final,
         last_ids) = ctx.saved_tensors
        width, height, tile_size = ctx.geometry
        dtype = means2d.dtype
        if v_render_colors is None:
            v_render_colors = torch.zeros(*t_final.shape, colors.shape[-1], dtype=dtype)
        if v_render_alphas is None:
            v_render_alphas = torch.zeros(*t_final.shape, 1, dtype=dtype)
        v_means2d, v_conics, v_colors, v_opacities, v_abs, v_bg = load_extension().rasterize_bwd(
            means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets,
            flatten_ids, t_final, last_ids, v_render_colors.to(dtype).contiguous(),
            v_render_alphas.to(dtype).contiguous(), bool(ctx.absgrad),
        )
        if ctx.absgrad:
            ctx.means2d_ref.absgrad = v_abs
        needs = ctx.needs_input_grad
        return (
            v_means2d if needs[0] else None,
            v_conics if needs[1] else None,
            v_colors if needs[2] else None,
            v_opacities if needs[3] else None,
            v_bg if (backgrounds is not None and needs[4]) else None,
            None, None, None, None, None, None,
        )


def rasterize_to_pixels_cpu(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,  # [C, tile_height, tile_width] int32
    flatten_ids: Tensor,  # [n_isects] int32 (int64 accepted, converted)
    backgrounds: Optional[Tensor] = None,  # [C, D]
    absgrad: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Differentiable CPU twin of ``gsplat.rasterize_to_pixels`` (non-packed, no masks).

    Float32 CPU tensors (float64 is accepted too, e.g. for ``torch.autograd.gradcheck``; all floating inputs
    must share one dtype). Returns ``render_colors [C, H, W, D]`` and ``render_alphas [C, H, W, 1]``.
    With ``absgrad=True`` the backward pass also sets ``means2d.absgrad`` to the sum over pixels of
    ``|dL/dmeans2d|`` (gsplat's ``absgrad``).
    """
    if not isinstance(means2d, Tensor) or means2d.dim() != 3:
        raise ValueError(f"means2d must be a [C, N, 2] tensor, got {getattr(means2d, 'shape', type(means2d))}")
    dtype = means2d.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"means2d must be float32 (or float64), got {dtype}")
    C, N = means2d.shape[0], means2d.shape[1]
    _check("means2d", means2d, (C, N, 2), dtype)
    _check("conics", conics, (C, N, 3), dtype)
    _check("colors", colors, (C, N, None), dtype)
    _check("opacities", opacities, (C, N), dtype)
    D = colors.shape[-1]
    if D < 1:
        raise ValueError("colors must have at least one channel")
    if backgrounds is not None:
        _check("backgrounds", backgrounds, (C, D), dtype)
    width, height, tile_size = int(image_width), int(image_height), int(tile_size)
    if width < 0 or height < 0 or tile_size < 1:
        raise ValueError(f"bad image size {width}x{height} or tile_size {tile_size}")
    _check("isect_offsets", isect_offsets, (C, None, None), None)
    _check("flatten_ids", flatten_ids, (None,), None)
    for name, t in (("isect_offsets", isect_offsets), ("flatten_ids", flatten_ids)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    th, tw = isect_offsets.shape[1], isect_offsets.shape[2]
    if th * tile_size < height or tw * tile_size < width:
        raise ValueError(
            f"isect_offsets tile grid {th}x{tw} (tile_size {tile_size}) does not cover the {height}x{width} image"
        )
    isect_offsets = isect_offsets.to(torch.int32).contiguous()
    flatten_ids = flatten_ids.to(torch.int32).contiguous()
    if backgrounds is not None:
        backgrounds = backgrounds.contiguous()
    return _RasterizeToPixelsCPU.apply(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids,
        bool(absgrad),
    )
