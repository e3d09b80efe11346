"""CLI for the data plane: `dart shard` runs the `shard` flow, `dart refresh` the `refresh` flow
(flows.cli._run.plain_output: their report as before, Prefect's own lines kept off the terminal).
Inputs that fail are rows in the report, not errors: exit 0. Exit 2 with one line on stderr when
the run cannot proceed (see _guard)."""
from __future__ import annotations

import typer

# SourceFormat and ShardMode: importable from here, where the choices were first spelled out (a test
# checks them against the library)
from dart_core.options.data import RefreshOptions, ShardMode, ShardOptions, SourceFormat  # noqa: F401
from flows.cli._app import app
from flows.cli._command import options_command


def _print_report(r: dict) -> None:
    by = ", ".join(f"{k} {v}" for k, v in r["failed_by_reason"].items()) or "none"
    typer.echo(f"inputs {r['inputs']} = already sharded {r['skipped']} + ok {r['ok']} + failed {r['failed']} ({by})")
    t = r["totals"]
    tby = ", ".join(f"{k} {v}" for k, v in t["failed_by_reason"].items()) or "none"
    typer.echo(f"total in {r['out']}: {t['shards']} shards, inputs {t['inputs']} = ok {t['ok']} + failed {t['failed']} ({tby})")
    typer.echo(f"new shards {len(r['new_shards'])}; {r['images_per_s']} images/s; reconciles: {r['reconciles']}")


@options_command(app, ShardOptions)
def shard(options: ShardOptions) -> None:
    """Turn a dataset into webdataset shards (+ parquet and stats sidecars) and classes.csv."""
    from dart_core.data.shard_run import check_options
    from flows.cli._run import plain_output
    from flows.shard import shard as shard_flow

    check_options(options)  # before the flow starts
    with plain_output(echo=True):  # the task's lines (the split rule, progress) on stderr, as plain lines
        r = shard_flow(options)
    if options.json_out:
        import json

        typer.echo(json.dumps(r, indent=1))
    else:
        _print_report(r)


@options_command(app, RefreshOptions)
def refresh(options: RefreshOptions) -> None:
    """Shard only objects not seen before (manifest of key + ETag); print the new shards."""
    from flows.cli._run import plain_output
    from flows.refresh import refresh as refresh_flow

    with plain_output():
        r = refresh_flow(options, details=True)
    if not r["new_objects"]:
        typer.echo(f"nothing new under {options.prefix} ({r['objects']} objects already sharded or not images)",
                   err=True)
        return
    typer.echo(f"{r['new_objects']} new objects: ok {r['ok']}, failed {r['failed']} {r['failed_by_reason']}", err=True)
    for url in r["new_shards"]:
        typer.echo(url)
