"""The ``pepeseg3d priors`` command line that computes the priors of a datamanager's training images, as the
datamanager's "priors missing" message prints it. Light (no datamanager, no model): the datamanager imports it
without importing the command (:mod:`pepeseg3d_ns.priors.cli`), which builds a datamanager."""

from __future__ import annotations

import dataclasses
import shlex

from pepeseg3d_ns.data.dataparser import PepeDataParserConfig

__all__ = ["priors_command", "dataparser_cli_args"]


def _flag_value(v) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(_flag_value(x) for x in v)
    return shlex.quote(str(v))


# dataparser fields that do not change the images (so they never need repeating for the priors)
_IMAGE_NEUTRAL_FIELDS = {"data", "load_3D_points", "_target"}


def dataparser_cli_args(dataparser) -> str:
    """The dataparser subcommand and options (``"colmap --downscale-factor 2"``) that give ``dataparser`` from
    the command line of ``ns-train pepe-recon`` / ``pepeseg3d priors``; empty for the default parser with its
    defaults. Only fields that differ from the parser's defaults are listed."""
    from nerfstudio.configs.dataparser_configs import all_dataparsers

    name = next((k for k, v in all_dataparsers.items() if type(v) is type(dataparser)), None)
    if isinstance(dataparser, PepeDataParserConfig):
        name = "nerfstudio-data"
    defaults = type(dataparser)()
    args = []
    for f in dataclasses.fields(dataparser):
        if f.name in _IMAGE_NEUTRAL_FIELDS or not f.init:
            continue
        value, default = getattr(dataparser, f.name), getattr(defaults, f.name)
        if value != default:
            args.append(f"--{f.name.replace('_', '-')} {_flag_value(value)}")
    if name is None:
        return " ".join(args)
    if not args and isinstance(dataparser, PepeDataParserConfig):
        return ""
    return " ".join([name] + args)


def priors_command(datamanager_config, extra: str = "") -> str:
    """The ``pepeseg3d priors`` command line that computes the priors of the images ``datamanager_config`` (a
    PepeDatamanagerConfig) trains on; ``extra`` (e.g. ``--sam-checkpoint X``) goes before the dataparser part."""
    dm = datamanager_config
    data = dm.data or dm.dataparser.data
    parts = ["pepeseg3d priors", f"--data {shlex.quote(str(data))}"]
    if dm.priors_dir is not None:
        parts.append(f"--cache-dir {shlex.quote(str(dm.priors_dir))}")
    if float(dm.camera_res_scale_factor) != 1.0:
        parts.append(f"--camera-res-scale-factor {dm.camera_res_scale_factor}")
    if extra:
        parts.append(extra)
    dp = dataparser_cli_args(dm.dataparser)
    if dp:
        parts.append(dp)
    return " ".join(parts)
