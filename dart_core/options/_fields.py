"""What an options field may carry besides its pydantic declaration, and the checks shared by
several commands.

A field is declared once, as a pydantic field: its type, default, `description` (the `--help` text
and the Prefect UI's label) and bounds (`ge`/`le`, or one of the checks below). Prefect validates a
deployment run's parameters with it; flows.cli._command builds the typer option from it, with the
same bounds, so a bad value is refused the same way from both doors. `Cli` holds what only the
command line needs: other flag names, an argument instead of an option, a metavar, or nothing at
all (`Cli(hidden=True)`: a setting of the flow that the command does not offer).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Options(BaseModel):
    """Base of every command's options: unknown names are refused (a misspelt deployment parameter
    fails the run instead of being ignored), and a pathlib.Path is taken where text is declared."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _paths_as_text(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in data.items()}
        return data


@dataclass(frozen=True)
class Cli:
    """Command-line extras of one options field (see the module doc). `flags`: the option's
    names (default: typer's `--field-name`, with `--no-field-name` for a bool)."""

    flags: tuple[str, ...] = ()
    argument: bool = False
    metavar: str | None = None
    hidden: bool = False

    def __init__(self, *flags: str, argument: bool = False, metavar: str | None = None, hidden: bool = False):
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "argument", argument)
        object.__setattr__(self, "metavar", metavar)
        object.__setattr__(self, "hidden", hidden)


# ---- checks that closed ranges (ge / le) cannot express: ValueError with the message the user sees ----

def positive(value: float | None) -> float | None:
    if value is not None and not value > 0:  # NaN too
        raise ValueError(f"{value} is not > 0")
    return value


def share(value: float | None) -> float | None:
    """A share of something that must not be empty: (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{value} is not a share in (0, 1]")
    return value


def share_held_out(value: float | None) -> float | None:
    """A share taken away from something that must keep some: [0, 1)."""
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"{value} is not a share in [0, 1)")
    return value


def device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N")
    return value


DEVICE_HELP = "cpu, cuda or cuda:N (GPU N)."
Device = Annotated[str, AfterValidator(device), Field(description=DEVICE_HELP)]
