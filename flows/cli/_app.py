"""The one typer application; each area registers its commands in its own module."""
import typer

app = typer.Typer(
    name="dart",
    help="dart-annotate: open-vocabulary multi-label tagging of image collections with DART.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
