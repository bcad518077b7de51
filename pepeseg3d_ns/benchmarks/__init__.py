"""Benchmark drivers, apart from the method: they time and measure the method's parts and write the tables in
``docs/`` (``pepeseg3d bench-render``, ``bench-contrast``, ``bench-step``, ``bench-priors``,
``python -m pepeseg3d_ns.benchmarks.contrast_parts``). The method packages never import from here."""

from typing import List, Sequence, Tuple


def parse_sizes(flag: str, values: Sequence[str]) -> List[Tuple[int, int]]:
    """``["1008x756", ...]`` (width x height, as image sizes are written) -> ``[(H, W), ...]``; a malformed value
    is a :class:`~pepeseg3d_ns.errors.UserError` naming ``flag``."""
    from pepeseg3d_ns.errors import UserError

    out = []
    for s in values:
        try:
            w, h = (int(v) for v in str(s).lower().split("x"))
        except ValueError:
            raise UserError(f"{flag} takes WIDTHxHEIGHT values such as 1008x756, got {s!r}") from None
        if w < 1 or h < 1:
            raise UserError(f"{flag} {s}: width and height must be >= 1")
        out.append((h, w))
    return out
