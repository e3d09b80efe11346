"""`shard` flow: one source into shards + classes.csv (dart_core.data.shard_run), then the shard
folder's totals. `dart shard` runs this flow."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage
from dart_core.data.shard_run import shard_source
from dart_core.data.shard_writer import totals
from dart_core.options.data import ShardOptions


@task(name="shard-split", cache_policy=NO_CACHE)  # side effects; a rerun must resume, not replay
def shard_split_task(options: ShardOptions) -> dict:
    return shard_source(options, log=get_run_logger().info)


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile_task(shard_dir: str) -> dict:
    return totals(storage.ShardDir(shard_dir))


@flow(name="shard")
def shard(options: ShardOptions) -> dict:
    """Shard SOURCE (format openimages|nuswide|coco|folder) into OUT; returns the report.
    `absent` (folder only): classes an image's labels do not name are "negative" (default) or "unknown"."""
    report = shard_split_task(options)
    report["totals"] = reconcile_task(storage.join(options.out, report["split"]))
    return report
