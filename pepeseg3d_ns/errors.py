"""Errors the user can fix, and the argument checks that raise them.

:class:`UserError` marks bad input (a flag out of range, a file that is not what it should be, an empty
selection): the ``pepeseg3d`` command prints its message as one line and exits with status 2; any other
exception is a bug and keeps its traceback. It subclasses ``ValueError``, so callers that catch ``ValueError``
still do. :class:`UserFileNotFoundError` is the same for a missing file (also a ``FileNotFoundError``).

The checks take the flag as the user types it (``"--threshold"``) and put it first in the message, with what
would be accepted.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional


class UserError(ValueError):
    """Bad input with a message that names the file or flag and the fix (printed without a traceback)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file the user named (or that a step before should have written) does not exist."""


def check_count(flag: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or :class:`UserError` unless it is an integer ``>= minimum``."""
    try:
        ok = float(value) == int(value) and int(value) >= minimum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(f"{flag} {value}: must be a whole number >= {minimum}")
    return int(value)


def check_number(flag: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 what: str = "a number") -> float:
    """``value`` as a float, or :class:`UserError` unless it is finite and within ``[lo, hi]`` (bounds optional)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = ("" if lo is None and hi is None else f" in [{'-inf' if lo is None else f'{lo:g}'}, "
               f"{'inf' if hi is None else f'{hi:g}'}]")
        raise UserError(f"{flag} {value}: must be {what}, finite{rng}")
    return x


def check_scale(flag: str, value) -> float:
    """A segmentation scale ``s`` in [0, 1]."""
    return check_number(flag, value, 0.0, 1.0, "a scale s (0 = finest parts, 1 = whole groups)")


def check_threshold(flag: str, value) -> float:
    """A cosine-similarity threshold in [-1, 1] (a cosine never exceeds 1, so a larger one selects nothing)."""
    try:
        above = float(value) > 1.0
    except (TypeError, ValueError):
        above = False
    if above:
        raise UserError(f"{flag} {value}: a cosine similarity is at most 1, so nothing would be selected; give a "
                        "value in [-1, 1] (e.g. 0.7)")
    return check_number(flag, value, -1.0, 1.0, "a cosine similarity (e.g. 0.7)")


def check_all(flag: str, values: Iterable, check) -> list:
    """Apply ``check(flag, v)`` to every value; an empty list is an error too."""
    values = list(values)
    if not values:
        raise UserError(f"{flag}: give at least one value")
    return [check(flag, v) for v in values]


def check_file(flag: str, path, what: str = "file") -> None:
    """:class:`UserFileNotFoundError` unless ``path`` is an existing file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        why = "is a folder" if p.is_dir() else "does not exist"
        raise UserFileNotFoundError(f"{flag} {p}: {why}; expected the {what}")


__all__ = ["UserError", "UserFileNotFoundError", "check_all", "check_count", "check_file", "check_number",
           "check_scale", "check_threshold"]
