"""`dart pipeline`: shard -> CRG -> train -> annotate -> evaluate -> audit over a real source."""
from __future__ import annotations

import typer

from dart_core.options.pipeline import PipelineOptions
from flows.cli._app import app
from flows.cli._command import options_command


@options_command(app, PipelineOptions)
def pipeline(options: PipelineOptions) -> None:
    """Run the whole pipeline on a real source: shard (incremental) -> CRG (cached) -> train -> annotate
    -> evaluate -> audit. Each stage is skipped when its inputs have not changed; prints the eval table."""
    from flows.pipeline import pipeline_flow, summary_markdown

    options.resolved()  # a bad option: one error line now, before Prefect starts
    from dart_core.devices import require_device

    require_device(options.device)
    s = pipeline_flow(options)
    typer.echo(summary_markdown(s), nl=False)
    typer.echo(f"summary: {s['summary_md']}")
