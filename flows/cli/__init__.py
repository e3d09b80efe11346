"""`dart` console script. Heavy imports (torch, prefect) happen inside the commands."""
from flows.cli._app import app

# Each module adds its commands to `app` when imported.
from flows.cli import model as _model  # noqa: F401,E402  train, info
from flows.cli import data as _data  # noqa: F401,E402  shard, refresh
from flows.cli import crg as _crg  # noqa: F401,E402  crg mine, crg show
from flows.cli import annotate as _annotate  # noqa: F401,E402  annotate, eval, audit, calibrate
from flows.cli import demo as _demo  # noqa: F401,E402  demo
from flows.cli import pipeline as _pipeline  # noqa: F401,E402  pipeline

__all__ = ["app"]
