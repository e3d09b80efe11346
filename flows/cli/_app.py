"""The one typer application; each area registers its commands in its own module."""
from importlib import metadata
from typing import Any

import typer
from typer.core import TyperGroup

from flows.cli._guard import guarded


class DartGroup(TyperGroup):
    """Runs every command (and every sub-command) under `guarded`: how user errors and Ctrl-C end."""

    def invoke(self, ctx) -> Any:
        with guarded():
            return super().invoke(ctx)


app = typer.Typer(
    name="dart",
    cls=DartGroup,
    help="dart-annotate: open-vocabulary multi-label tagging of image collections with DART.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dart-annotate {metadata.version('dart-annotate')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the installed dart-annotate version and exit.")) -> None:
    pass
