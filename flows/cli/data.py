"""CLI for the data plane: `dart shard` runs the `shard` flow, `dart refresh` the `refresh` flow
(flows.cli._run.plain_output: their report as before, Prefect's own lines kept off the terminal).
Inputs that fail are rows in the report, not errors: exit 0. Exit 2 with one line on stderr when
the run cannot proceed (see _guard)."""
from __future__ import annotations

from typing import Literal, Optional

import typer

from flows.cli._app import app

# dart_core.data.sources.FORMATS and dart_core.data.shard_writer.MODES (a test checks), spelled out
# here so that `dart --help` imports neither
SourceFormat = Literal["openimages", "nuswide", "coco", "folder"]
ShardMode = Literal["incremental", "overwrite", "extend"]


def _print_report(r: dict) -> None:
    by = ", ".join(f"{k} {v}" for k, v in r["failed_by_reason"].items()) or "none"
    typer.echo(f"inputs {r['inputs']} = already sharded {r['skipped']} + ok {r['ok']} + failed {r['failed']} ({by})")
    t = r["totals"]
    tby = ", ".join(f"{k} {v}" for k, v in t["failed_by_reason"].items()) or "none"
    typer.echo(f"total in {r['out']}: {t['shards']} shards, inputs {t['inputs']} = ok {t['ok']} + failed {t['failed']} ({tby})")
    typer.echo(f"new shards {len(r['new_shards'])}; {r['images_per_s']} images/s; reconciles: {r['reconciles']}")


@app.command()
def shard(
    source: str = typer.Argument(..., help="dataset root: local dir or s3://bucket/prefix"),
    format: SourceFormat = typer.Option(..., "--format", help="the dataset's layout"),
    out: str = typer.Option(..., "--out", help="output root (local or s3://): classes.csv + <split>/ shards"),
    shard_size: int = typer.Option(5000, "--shard-size", min=1, help="samples per shard"),
    mode: ShardMode = typer.Option("incremental", "--mode", help="incremental: shard what is not sharded yet (a "
                                   "rerun resumes); extend: the same, appending the source's new classes to "
                                   "classes.csv; overwrite: start over"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="decoding processes (default: all cores)"),
    split: Optional[str] = typer.Option(None, "--split", help="source split / output subdir (default per format)"),
    image_size: int = typer.Option(256, "--image-size", min=1, help="shorter side after resizing"),
    absent: Optional[Literal["negative", "unknown"]] = typer.Option(None, "--absent", help="folder only: a class an image's labels do not "
                                         "name is a 'negative' (default) or 'unknown' (`?cls` marks one unknown)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Turn a dataset into webdataset shards (+ parquet and stats sidecars) and classes.csv."""
    from flows.cli._run import plain_output
    from flows.shard import check_options, shard as shard_flow

    check_options(format, absent)  # before the flow starts
    with plain_output(echo=True):  # the task's lines (the split rule, progress) on stderr, as plain lines
        r = shard_flow(source, format, out, split=split, shard_size=shard_size, mode=mode, workers=workers,
                       image_size=image_size, absent=absent)
    if json_out:
        import json

        typer.echo(json.dumps(r, indent=1))
    else:
        _print_report(r)


@app.command()
def refresh(
    prefix: str = typer.Argument(..., help="raw images (+ label CSVs) under s3://BUCKET/PREFIX (or a local dir)"),
    out: str = typer.Option(..., "--out", help="shards root (local or s3://)"),
    split: str = typer.Option("train", "--split", help="output subdir of OUT the new shards go to"),
    shard_size: int = typer.Option(5000, "--shard-size", min=1, help="samples per shard"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="decoding processes (default: all cores)"),
) -> None:
    """Shard only objects not seen before (manifest of key + ETag); print the new shards."""
    from flows.cli._run import plain_output
    from flows.refresh import refresh as refresh_flow

    with plain_output():
        r = refresh_flow(prefix, out, split=split, shard_size=shard_size, workers=workers, details=True)
    if not r["new_objects"]:
        typer.echo(f"nothing new under {prefix} ({r['objects']} objects already sharded or not images)", err=True)
        return
    typer.echo(f"{r['new_objects']} new objects: ok {r['ok']}, failed {r['failed']} {r['failed_by_reason']}", err=True)
    for url in r["new_shards"]:
        typer.echo(url)
