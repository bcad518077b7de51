"""Host-device read-backs in a training step: a counter that works without a GPU, and the places allowed to read.

On CUDA every value the host reads from the device (``.item()``, ``int(t)``, ``bool(t)``, ``if t:``, ``.tolist()``,
``.cpu()``, ``nonzero``, indexing with a bool mask, ``torch.unique``, ...) waits for the GPU to finish all queued
work; a few per step are enough to keep a GPU half idle. A training step should read nothing back, except in a few
marked places (the centroid refresh, logging, the rasterizer, which gsplat synchronises itself).

* :func:`allow_readback` marks such a place: ``with allow_readback("why"): ...``. It costs nothing when no
  counter is running; under :func:`cuda_sync_check` it suspends CUDA's sync check for its body.
* :class:`ReadbackCounter` is a ``torch.overrides.TorchFunctionMode`` that records every read-back operation called
  while it is active, with the first caller outside torch and whether an :func:`allow_readback` covered it. On a
  CPU-only machine every tensor is on the model's device, so it counts what *would* synchronise on a GPU::

      with ReadbackCounter() as rb:
          train_step(...)
      assert not rb.unallowed, rb.report()

* :func:`cuda_sync_check` wraps ``torch.cuda.set_sync_debug_mode("error")`` (CUDA's own check: it also catches
  host-to-device copies from pageable memory, which the counter cannot see).

What the counter cannot see: work done inside C++ (a kernel that synchronises internally) and host-to-device
copies; on CPU it also cannot tell a CPU generator from a device one (the model checks its generator's device).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["allow_readback", "ReadbackCounter", "ReadbackEvent", "cuda_sync_check"]

_local = threading.local()


def _allowances() -> List[str]:
    stack = getattr(_local, "why", None)
    if stack is None:
        stack = _local.why = []
    return stack


@contextlib.contextmanager
def allow_readback(why: str) -> Iterator[None]:
    """Mark a block that may read values back from the device (``why`` is reported by :class:`ReadbackCounter`).
    Under CUDA's sync debug mode the mode is switched off for the block and restored after it."""
    stack = _allowances()
    stack.append(str(why))
    mode = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mode = torch.cuda.get_sync_debug_mode()
        if mode:
            torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        stack.pop()
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def cuda_sync_check(mode: Union[str, int] = "error") -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (blocks under :func:`allow_readback` excepted)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_sync_check needs CUDA")
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


T = torch.Tensor
# operations whose result is a host value, or whose output size depends on the data (so the host must read it)
_ALWAYS = {
    T.item: "item", T.tolist: "tolist", T.__bool__: "bool(tensor)", T.__int__: "int(tensor)",
    T.__float__: "float(tensor)", T.__index__: "tensor used as an index", T.__complex__: "complex(tensor)",
    T.__format__: "format(tensor)", T.__repr__: "repr(tensor)", T.__str__: "str(tensor)",
    T.__array__: "numpy(tensor)", T.numpy: "numpy", T.cpu: "cpu()", T.__contains__: "x in tensor",
    torch.nonzero: "nonzero", T.nonzero: "nonzero", torch.argwhere: "argwhere", T.argwhere: "argwhere",
    torch.masked_select: "masked_select", T.masked_select: "masked_select", torch.unique: "unique",
    T.unique: "unique", torch.unique_consecutive: "unique_consecutive", T.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount", T.bincount: "bincount", torch.equal: "equal", T.equal: "equal",
    torch.allclose: "allclose", T.allclose: "allclose", torch.is_nonzero: "is_nonzero", T.is_nonzero: "is_nonzero",
}
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.multinomial, T.multinomial, torch.normal,
           torch.bernoulli, T.exponential_, T.uniform_, T.normal_, T.bernoulli_, T.random_, T.geometric_,
           T.cauchy_, T.log_normal_, torch.poisson}


def _is_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) and i.dim() > 0 for i in items)


@dataclass
class ReadbackEvent:
    """One read-back: the operation, the first caller outside torch (``file:line in function``), and the
    :func:`allow_readback` reason covering it (None = not allowed)."""

    op: str
    where: str
    allowed: Optional[str]

    def __str__(self) -> str:
        tag = f"allowed: {self.allowed}" if self.allowed else "NOT ALLOWED"
        return f"{self.op} at {self.where} ({tag})"


_SKIP = (os.path.dirname(torch.__file__), os.path.abspath(__file__), contextlib.__file__)


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_SKIP):
        f = f.f_back
    if f is None:
        return "?"
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"


class ReadbackCounter(TorchFunctionMode):
    """Records every read-back operation called while active (see the module docstring).

    Args:
        device: the model's device; tensors elsewhere are host data and do not count (default: CPU, on which
            every tensor counts).

    Attributes:
        events: every :class:`ReadbackEvent`, allowed or not; :attr:`unallowed` those outside any allowance.
    """

    def __init__(self, device: Union[str, torch.device, None] = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.events: List[ReadbackEvent] = []

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def _kind(self, func, args, kwargs) -> Optional[str]:
        first = args[0] if args else None
        if func in _ALWAYS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            return _ALWAYS[func] if any(self._on_device(t) for t in tensors) else None
        if func is torch.where and len(args) == 1 and not kwargs:
            return "where(condition)" if self._on_device(first) else None
        if func in (T.__getitem__, T.__setitem__) and len(args) > 1 and _is_bool_index(args[1]):
            if func is T.__setitem__ and len(args) > 2 and not isinstance(args[2], torch.Tensor):
                return None  # x[mask] = scalar is a masked fill
            return "bool-mask indexing" if self._on_device(first) else None
        if func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs:
            if len(args) > 1 and isinstance(args[1], torch.Tensor) and self._on_device(args[1]):
                return "repeat_interleave without output_size"
        if func is T.to and self._on_device(first) and self.device.type != "cpu":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                return "to(cpu)"
        if func in _RANDOM:
            gen = kwargs.get("generator")
            if isinstance(gen, torch.Generator) and gen.device.type != self.device.type:
                return f"random numbers from a {gen.device.type} generator"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            stack = _allowances()
            self.events.append(ReadbackEvent(kind, _caller(), stack[-1] if stack else None))
        return func(*args, **kwargs)

    @property
    def unallowed(self) -> List[ReadbackEvent]:
        return [e for e in self.events if e.allowed is None]

    def report(self) -> str:
        """One line per distinct event, with counts (the unallowed first)."""
        counts: dict = {}
        for e in self.events:
            counts[str(e)] = counts.get(str(e), 0) + 1
        lines = sorted(counts.items(), key=lambda kv: ("NOT ALLOWED" not in kv[0], kv[0]))
        return "\n".join(f"{n:4d} x {line}" for line, n in lines) or "no read-backs"
