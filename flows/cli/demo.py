"""`dart demo`: the whole pipeline on the embedded synthetic world."""
from __future__ import annotations

from pathlib import Path

import typer

from dart_core.options.demo import DemoOptions
from flows.cli._app import app
from flows.cli._command import options_command


@options_command(app, DemoOptions)
def demo(options: DemoOptions) -> None:
    """generate -> shard -> VLP -> CRG -> train -> annotate -> eval -> audit, printing the ZSL/GZSL table."""
    from flows.demo import demo_flow, format_label_noise, format_results

    res = demo_flow(options)
    typer.echo(f"\nCRG: {res['crg_source']}    VLP: {res['vlp']}")
    typer.echo("test split, percent (loc = top patch inside the class's box):")
    typer.echo(format_results(res))
    if "label_noise" in res:
        typer.echo("\n" + format_label_noise(res["label_noise"]))
    typer.echo(f"\naudit report: {res['report']}\nall results: {Path(options.workdir) / 'results.json'}  "
               f"({res['seconds']:.0f} s)")
