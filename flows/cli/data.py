"""CLI for the data plane: `dart shard`, `dart refresh`. Same code as the Prefect flows
(flows.shard.shard_source / flows.refresh.refresh_prefix). Inputs that fail are rows in the
report, not errors: exit 0. Exit 2 with one line on stderr when the run cannot proceed."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from flows.cli._app import app


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _run(fn, *args, **kw):
    """Known run-level failures -> one line, no traceback."""
    from flows.shard import ShardRunError

    try:
        return fn(*args, **kw)
    except ShardRunError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - botocore / OS errors that stop the whole run
        mod = type(e).__module__ or ""
        if mod.startswith(("botocore", "boto3")) or isinstance(e, OSError):
            _fail(f"{type(e).__name__}: {e}")
        raise


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
    format: str = typer.Option(..., "--format", help="openimages|nuswide|coco|folder"),
    out: str = typer.Option(..., "--out", help="output root (local or s3://): classes.csv + <split>/ shards"),
    shard_size: int = typer.Option(5000, "--shard-size", help="samples per shard"),
    mode: str = typer.Option("incremental", "--mode", help="incremental|overwrite|extend"),
    workers: Optional[int] = typer.Option(None, "--workers", help="decoding processes (default: all cores)"),
    split: Optional[str] = typer.Option(None, "--split", help="source split / output subdir (default per format)"),
    image_size: int = typer.Option(256, "--image-size", help="shorter side after resizing"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Turn a dataset into webdataset shards (+ parquet and stats sidecars) and classes.csv."""
    from dart_core.data.shard_writer import MODES
    from dart_core.data.sources import FORMATS
    from flows.shard import shard_source

    if format not in FORMATS:
        _fail(f"--format {format!r}: must be one of {'|'.join(FORMATS)}")
    if mode not in MODES:
        _fail(f"--mode {mode!r}: must be one of {'|'.join(MODES)}")
    r = _run(shard_source, source, format, out, split=split, shard_size=shard_size, mode=mode,
             workers=workers, image_size=image_size, progress=sys.stderr.isatty())
    if json_out:
        import json

        typer.echo(json.dumps(r, indent=1))
    else:
        _print_report(r)


@app.command()
def refresh(
    prefix: str = typer.Argument(..., help="raw images (+ label CSVs) under s3://BUCKET/PREFIX (or a local dir)"),
    out: str = typer.Option(..., "--out", help="shards root (local or s3://)"),
    split: str = typer.Option("train", "--split"),
    shard_size: int = typer.Option(5000, "--shard-size"),
    workers: Optional[int] = typer.Option(None, "--workers"),
) -> None:
    """Shard only objects not seen before (manifest of key + ETag); print the new shards."""
    from flows.refresh import refresh_prefix

    r = _run(refresh_prefix, prefix, out, split=split, shard_size=shard_size, workers=workers,
             progress=sys.stderr.isatty())
    if not r["new_objects"]:
        typer.echo(f"nothing new under {prefix} ({r['objects']} objects already sharded or not images)", err=True)
        return
    typer.echo(f"{r['new_objects']} new objects: ok {r['ok']}, failed {r['failed']} {r['failed_by_reason']}", err=True)
    for url in r["new_shards"]:
        typer.echo(url)
