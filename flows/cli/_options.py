"""Option checks that typer's `min`/`max` (closed ranges) cannot express, as option callbacks:
a bad value is a usage error naming the option (one `error:` line, exit 2, see _guard)."""
from __future__ import annotations

import re

import typer


def positive(value: float | None) -> float | None:
    if value is not None and not value > 0:  # NaN too
        raise typer.BadParameter(f"{value} is not > 0")
    return value


def share(value: float | None) -> float | None:
    """A share of something that must not be empty: (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not a share in (0, 1]")
    return value


def share_held_out(value: float | None) -> float | None:
    """A share taken away from something that must keep some: [0, 1)."""
    if value is not None and not 0 <= value < 1:
        raise typer.BadParameter(f"{value} is not a share in [0, 1)")
    return value


DEVICE_HELP = "cpu, cuda or cuda:N (GPU N)."


def device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of cpu, cuda, cuda:N")
    return value
