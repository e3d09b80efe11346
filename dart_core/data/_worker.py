"""Code run in the shard writer's worker processes. Kept apart from shard_writer so that a
worker imports only PIL/numpy (not pyarrow): faster pool start-up, smaller workers."""
from __future__ import annotations

import os

from dart_core.data import records as R
from dart_core.data.fs import FileSystem
from dart_core.data.image import ImageFailure, normalise


_W: dict = {}
ENV_PREFIXES = ("AWS_", "DART_")


def storage_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def _init_worker(reader: FileSystem, size: int, quality: int, max_pixels: int, env: dict | None = None) -> None:
    if env is not None:
        # Workers fork from a long-lived forkserver started with the environment of its first
        # use; take the writer's current storage settings (endpoint, region, credentials).
        for k in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            del os.environ[k]
        os.environ.update(env)
    _W.update(reader=reader, size=size, quality=quality, max_pixels=max_pixels)


def _encode_one(path: str):
    try:
        data = _W["reader"].read_bytes(path)
    except FileNotFoundError:
        return ("failed", R.MISSING_FILE, f"{path}: no such file")
    except IsADirectoryError:
        return ("failed", R.NOT_AN_IMAGE, f"{path}: is a directory")
    except Exception as e:  # noqa: BLE001 - any I/O failure after retries is this input's problem
        return ("failed", R.READ_ERROR, f"{path}: {type(e).__name__}: {e}")
    try:
        return ("ok", normalise(data, size=_W["size"], quality=_W["quality"], max_pixels=_W["max_pixels"]))
    except ImageFailure as e:
        return ("failed", e.reason, f"{path}: {e.detail}")


def _encode_batch(paths: list[str | None]):
    return [None if p is None else _encode_one(p) for p in paths]


