"""Reading and writing nerfstudio run folders without running code from them.

A run folder (``config.yml``, ``nerfstudio_models/step-*.ckpt``) is something users share. nerfstudio writes
``config.yml`` with ``yaml.dump`` (Python tags for its dataclasses) and reads it back with ``yaml.Loader``, which
constructs *any* Python object a tag names: ``!!python/object/apply:os.system ["..."]`` runs a command while the
file is read. Everything in this package that reads a run goes through this module instead:

* :func:`load_run_config`: ``yaml.load`` with :class:`RunConfigLoader`, which builds only

  - ``!!python/object:X`` where ``X`` is a dataclass of ``nerfstudio.*`` or ``pepeseg3d_ns.*`` (the config
    classes), its fields set from the mapping (no ``__setstate__``, no dunder keys);
  - ``!!python/name:X`` where ``X`` is a class of ``nerfstudio.*``, ``pepeseg3d_ns.*`` or ``torch.optim.*`` (the
    ``_target`` a config instantiates, the optimizer class an optimizer config names), never a function;
  - ``!!python/object/apply:X [args]`` (and ``/new``) where ``X`` is a ``pathlib`` path class or an ``Enum`` of
    ``nerfstudio.*`` / ``pepeseg3d_ns.*`` called with plain scalar arguments (``PosixPath("data")``,
    ``EventName("Train Iter (time)")``);
  - ``!!python/tuple`` and plain YAML; the only builtin nerfstudio configs need is ``tuple``.

  Anything else (``os.system``, ``subprocess.*``, ``builtins.eval``, ``!!python/module``, a nerfstudio
  *function*) is refused with :class:`UnsafeConfigError` naming the file, the line and the tag.
* :func:`load_checkpoint`: ``torch.load(..., weights_only=True)`` (tensors and plain containers only); a file
  that is not a checkpoint (text, truncated zip, pickled objects) is "X is not a ... checkpoint (why)", never
  torch's advice to retry with ``weights_only=False``.
* :func:`save_checkpoint_atomic`: ``torch.save`` to a hidden temporary name beside the checkpoint folder, then
  ``os.replace``: a checkpoint is complete or absent. A full disk is reported as such, naming the file.
* :func:`eval_setup`: nerfstudio's ``eval_setup`` (config -> pipeline -> latest checkpoint) built on the two
  loaders above, the checkpoint found next to the ``config.yml`` it was given.

``ns-eval``, ``ns-viewer`` and ``ns-render`` are nerfstudio's commands and use nerfstudio's own loader
(``yaml.Loader``): open a run from someone else with them only after ``pepeseg3d check-run --load-config
RUN/config.yml`` accepts it (a config this loader accepts builds the same objects under ``yaml.Loader``).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import importlib
import os
import pathlib
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Dict, Literal, Optional, Tuple

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from pepeseg3d_ns.errors import UserError, UserFileNotFoundError

CONFIG_MODULES = ("nerfstudio", "pepeseg3d_ns")
"""Packages whose dataclasses (``!!python/object``) and enums (``!!python/object/apply``) a config may build."""
CLASS_NAME_MODULES = CONFIG_MODULES + ("torch.optim",)
"""Packages whose classes a config may name (``!!python/name``)."""
PATH_CLASSES = {f"pathlib.{n}": getattr(pathlib, n)
                for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")


class UnsafeConfigError(UserError):
    """A ``config.yml`` names a Python object that :class:`RunConfigLoader` does not build."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (``errno`` is ``ENOSPC`` for a full disk); nothing was left behind."""

    def __init__(self, message: str, code: Optional[int] = None, filename: Optional[str] = None):
        super().__init__(message)
        self.message, self.errno, self.filename = message, code, filename

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------- config.yml
def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


class _RunConfigConstructor(SafeConstructor):
    """SafeConstructor plus the few Python tags nerfstudio configs use, each checked against the allow-lists."""

    def _refuse(self, node, tag: str, why: str):
        raise ConstructorError(None, None, f"{tag} ({why})", node.start_mark)

    def _find(self, name: str, node, tag: str, packages):
        module_name, _, attr = name.rpartition(".")
        if not module_name or not attr:
            self._refuse(node, tag, "expected a dotted module.name")
        if not _within(module_name, packages):
            self._refuse(node, tag, f"module {module_name!r} is outside {', '.join(p + '.*' for p in packages)}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            self._refuse(node, tag, f"cannot import {module_name!r}: {err}")
        if not hasattr(module, attr):
            self._refuse(node, tag, f"{module_name!r} has no {attr!r}")
        return getattr(module, attr)

    def construct_python_name(self, suffix: str, node):
        tag = f"!!python/name:{suffix}"
        obj = self._find(suffix, node, tag, CLASS_NAME_MODULES)
        if not isinstance(obj, type):
            self._refuse(node, tag, f"a {type(obj).__name__}, not a class")
        if not isinstance(node, ScalarNode) or self.construct_scalar(node):
            self._refuse(node, tag, "expected an empty value")
        return obj

    def construct_python_object(self, suffix: str, node):
        tag = f"!!python/object:{suffix}"
        cls = self._find(suffix, node, tag, CONFIG_MODULES)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            self._refuse(node, tag, "not a config dataclass")
        if not isinstance(node, MappingNode):
            self._refuse(node, tag, "expected a mapping of fields")
        instance = cls.__new__(cls)
        yield instance
        state = self.construct_mapping(node)
        for key in state:
            if not isinstance(key, str) or key.startswith("__"):
                self._refuse(node, tag, f"field name {key!r} not allowed")
        instance.__dict__.update(state)

    def construct_python_object_apply(self, suffix: str, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        if suffix in PATH_CLASSES:
            cls = PATH_CLASSES[suffix]
        else:
            cls = self._find(suffix, node, tag, CONFIG_MODULES)
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
                self._refuse(node, tag, "only pathlib paths and nerfstudio / pepeseg3d_ns enums are built")
        if isinstance(node, SequenceNode):
            args = self.construct_sequence(node, deep=True)
        elif isinstance(node, MappingNode):
            value = self.construct_mapping(node, deep=True)
            if set(value) - {"args"}:
                self._refuse(node, tag, f"only 'args' is accepted, got {sorted(map(str, value))}")
            args = value.get("args", [])
        else:
            self._refuse(node, tag, "expected a list of arguments")
        if not all(isinstance(a, (str, int, float)) for a in args):
            self._refuse(node, tag, "arguments must be plain strings or numbers")
        try:
            return cls(*args)
        except (TypeError, ValueError) as err:
            self._refuse(node, tag, f"{type(err).__name__}: {err}")

    def construct_refused(self, suffix: str, node):
        self._refuse(node, node.tag.replace("tag:yaml.org,2002:", "!!"), "this tag is never built")

    def construct_python_tuple(self, node):
        return tuple(self.construct_sequence(node))


_P = "tag:yaml.org,2002:python/"
for _name, _base in (("none", "null"), ("bool", "bool"), ("str", "str"), ("int", "int"), ("float", "float"),
                     ("list", "seq"), ("dict", "map")):
    _RunConfigConstructor.add_constructor(_P + _name, SafeConstructor.yaml_constructors[f"tag:yaml.org,2002:{_base}"])
_RunConfigConstructor.add_constructor(_P + "tuple", _RunConfigConstructor.construct_python_tuple)
_RunConfigConstructor.add_multi_constructor(_P + "name:", _RunConfigConstructor.construct_python_name)
_RunConfigConstructor.add_multi_constructor(_P + "object:", _RunConfigConstructor.construct_python_object)
_RunConfigConstructor.add_multi_constructor(_P + "object/apply:", _RunConfigConstructor.construct_python_object_apply)
_RunConfigConstructor.add_multi_constructor(_P + "object/new:", _RunConfigConstructor.construct_python_object_apply)
_RunConfigConstructor.add_multi_constructor(_P + "module:", _RunConfigConstructor.construct_refused)
_RunConfigConstructor.add_multi_constructor(_P, _RunConfigConstructor.construct_refused)  # any other python/ tag


class RunConfigLoader(Reader, Scanner, Parser, Composer, _RunConfigConstructor, Resolver):
    """``yaml.load(text, Loader=RunConfigLoader)``: nerfstudio's config.yml files, nothing that runs code (see
    the module docstring for what is built)."""

    def __init__(self, stream):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _RunConfigConstructor.__init__(self)
        Resolver.__init__(self)


def load_run_config(path, flag: str = "--load-config"):
    """The ``TrainerConfig`` stored in ``path`` (a run's ``config.yml``), read with :class:`RunConfigLoader`.

    Raises :class:`UserFileNotFoundError` (missing), :class:`UnsafeConfigError` (a refused tag, with file and
    line), :class:`UserError` (not YAML, not a run config)."""
    from nerfstudio.engine.trainer import TrainerConfig

    p = Path(path)
    if not p.is_file():
        raise UserFileNotFoundError(f"{flag} {p}: {'is a folder' if p.is_dir() else 'does not exist'}; expected "
                                    "the config.yml of an ns-train run")
    try:
        text = p.read_text(encoding="utf8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p} is not a readable config.yml ({type(err).__name__}: {err})") from None
    try:
        config = yaml.load(text, Loader=RunConfigLoader)
    except ConstructorError as err:
        line = f" line {err.problem_mark.line + 1}" if err.problem_mark is not None else ""
        raise UnsafeConfigError(
            f"{p}{line}: refused to build {err.problem}. A config.yml is loaded with a restricted loader that builds "
            "only nerfstudio / pepeseg3d_ns config classes, pathlib paths and their enums; this file names something "
            "else, which could run code: do not open it with ns-viewer / ns-eval either"
        ) from None
    except yaml.YAMLError as err:
        raise UserError(f"{p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, TrainerConfig):
        raise UserError(f"{p} is not the config.yml of an ns-train run (it holds a {type(config).__name__})")
    return config


# ---------------------------------------------------------------------------------------------- checkpoints
def _why_not_a_checkpoint(path: Path, err: BaseException) -> str:
    """One phrase on why ``torch.load(path, weights_only=True)`` failed, without torch's advice to unpickle."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read: {e}"
    msg = str(err)
    if size == 0:
        return "the file is empty"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"a truncated zip archive of {size} bytes: the save was cut short (disk full or interrupted)"
        if "Weights only load failed" in msg or "weights_only" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            return (f"it holds a pickled Python object{what} besides tensors; it is not unpickled, as unpickling "
                    "a file from elsewhere can run code")
        return f"a zip archive that torch cannot read as a checkpoint: {msg.splitlines()[0][:200]}"
    if head[:1] == b"\x80":
        return "a legacy pickle, not a torch zip checkpoint; it is not unpickled, as that can run code"
    return f"not a torch checkpoint: it starts with {head!r}, not a zip archive"


def load_checkpoint(path, what: str = "nerfstudio checkpoint") -> Dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a nerfstudio checkpoint (a dict with
    ``pipeline``, ``step``, ...). :class:`UserError` "``path`` is not a ``what`` (why)" otherwise."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserFileNotFoundError(f"{p} does not exist (expected a {what})")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError / ... for a bad file
        raise UserError(f"{p} is not a {what} ({_why_not_a_checkpoint(p, err)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("pipeline"), dict):
        raise UserError(f"{p} is not a {what} (it loads, but holds no 'pipeline' state dict)")
    return state


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of ``.../step-000001999.ckpt`` (None for other names)."""
    m = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(folder, step: Optional[int] = None) -> Path:
    """``folder/step-*.ckpt`` with the highest step (or exactly ``step``); :class:`UserFileNotFoundError` if none."""
    folder = Path(folder)
    found = {checkpoint_step(p): p for p in folder.glob("step-*.ckpt") if checkpoint_step(p) is not None} \
        if folder.is_dir() else {}
    if step is not None:
        if step not in found:
            raise UserFileNotFoundError(f"{folder} has no checkpoint of step {step} (it has: "
                                        f"{sorted(found) if found else 'none'})")
        return found[step]
    if not found:
        raise UserFileNotFoundError(f"{folder} holds no step-*.ckpt: the run has not saved a checkpoint")
    return found[max(found)]


def _nbytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint_atomic(state: Dict, path, save: Optional[Callable] = None) -> Path:
    """Write ``state`` to ``path`` (``torch.save``) through a hidden temporary file in the folder above ``path``'s
    (nerfstudio reads every name in a checkpoint folder as a step), renamed into place when complete. On failure
    the temporary file is removed and :class:`CheckpointWriteError` says what happened, naming ``path``; a full
    disk (``ENOSPC``, or too little space left for the checkpoint's tensors) is reported as such."""
    import torch

    save = save or torch.save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent.parent / f".{path.parent.name}-{path.name}.partial"
    needed = _nbytes(state)
    try:
        save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = None
        tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception):
            raise  # KeyboardInterrupt / SystemExit: re-raised as is, the partial file removed
        full = (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err)
                or (free is not None and free < max(needed - written, 1 << 20)))
        if full:
            out = CheckpointWriteError(
                f"disk full while writing checkpoint {path} (needs about {needed / 2**20:.0f} MiB; "
                f"{'?' if free is None else f'{free / 2**20:.0f}'} MiB free on that disk): nothing was saved for this "
                f"step and no partial file is left; free some space, then resume with --load-dir {path.parent}",
                errno.ENOSPC, str(path))
        else:
            out = CheckpointWriteError(f"could not write checkpoint {path} ({type(err).__name__}: {err}); "
                                       "no partial file is left", getattr(err, "errno", None), str(path))
        raise out from err
    return path


# ---------------------------------------------------------------------------------------------- eval_setup
def eval_setup(config_path, test_mode: Literal["test", "val", "inference"] = "test",
               update_config_callback: Optional[Callable] = None, flag: str = "--load-config"
               ) -> Tuple[object, object, Path, int]:
    """Load a finished run for evaluation, like nerfstudio's ``eval_setup`` but through :func:`load_run_config`
    and :func:`load_checkpoint`. The checkpoint is the latest ``step-*.ckpt`` in the ``nerfstudio_models`` folder
    beside ``config_path`` (so a run folder can be moved), else in the config's own output path.

    Returns ``(config, pipeline, checkpoint_path, step)``; the pipeline is on CUDA when available, in eval mode."""
    import torch

    config_path = Path(config_path)
    config = load_run_config(config_path, flag=flag)
    if update_config_callback is not None:
        config = update_config_callback(config)
    beside = config_path.parent / config.relative_model_dir
    ckpt_dir = beside if beside.is_dir() else config.get_checkpoint_dir()
    ckpt = latest_checkpoint(ckpt_dir)
    state = load_checkpoint(ckpt, what=f"{config.method_name} checkpoint")
    config.load_dir = ckpt_dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = config.pipeline.setup(device=device, test_mode=test_mode)
    pipeline.eval()
    step = int(state.get("step", checkpoint_step(ckpt) or 0))
    pipeline.load_pipeline(state["pipeline"], step)
    return config, pipeline, ckpt, step


__all__ = ["CheckpointWriteError", "RunConfigLoader", "UnsafeConfigError", "checkpoint_step", "eval_setup",
           "latest_checkpoint", "load_checkpoint", "load_run_config", "save_checkpoint_atomic"]
