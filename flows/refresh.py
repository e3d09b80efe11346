"""`refresh` flow: shard only what is new under a raw-image prefix (dart_core.data.refresh: the
key + ETag manifest, crash safety). The deployment `refresh/nightly` (infra/prefect.yaml) runs it."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core.data.refresh import refresh_prefix
from dart_core.options.data import RefreshOptions


@task(name="refresh-shard-new", cache_policy=NO_CACHE)  # must look at the bucket every time
def refresh_task(options: RefreshOptions) -> dict:
    return refresh_prefix(options, log=get_run_logger().info)


@flow(name="refresh")
def refresh(options: RefreshOptions, details: bool = False) -> list[str] | dict:
    """Shard the objects under PREFIX not yet in OUT's manifest; returns the new shard URLs, or with
    details=True the whole report (dart_core.data.refresh.refresh_prefix's; what `dart refresh` prints)."""
    report = refresh_task(options)
    return report if details else report["new_shards"]
