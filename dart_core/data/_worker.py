"""Code run in the shard writer's worker processes. Kept apart from shard_writer so that a
worker imports only PIL/numpy (not pyarrow): faster pool start-up, smaller workers."""
from __future__ import annotations

import os
from typing import NamedTuple

from dart_core.data import records as R
from dart_core.data import shard_format as F
from dart_core.storage import Storage
from dart_core.data.image import ImageFailure, normalise


class Sample(NamedTuple):
    """One encoded sample as the writer needs it: sizes for the sidecar, and its tar members."""
    width: int          # original size (after EXIF rotation)
    height: int
    out_width: int
    out_height: int
    mode: str
    jpg_bytes: int
    tar: bytes          # `<key>.jpg` + `<key>.json` members, ready to append (shard_format)


_W: dict = {}
ENV_PREFIXES = ("AWS_", "DART_")


def storage_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def _init_worker(reader: Storage, size: int, quality: int, max_pixels: int, env: dict | None = None) -> None:
    if env is not None:
        # Workers fork from a long-lived forkserver started with the environment of its first
        # use; take the writer's current storage settings (endpoint, region, credentials).
        for k in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            del os.environ[k]
        os.environ.update(env)
    _W.update(reader=reader, size=size, quality=quality, max_pixels=max_pixels)


def _encode_one(path: str, key: str, labels: dict, source: dict):
    """("ok", Sample) or ("failed", reason, detail). The sample's tar members are built here, in
    the worker, so the writer process only appends bytes (its CPU is the pipeline's bottleneck)."""
    try:
        data = _W["reader"].read_bytes(path)
    except FileNotFoundError:
        return ("failed", R.MISSING_FILE, f"{path}: no such file")
    except IsADirectoryError:
        return ("failed", R.NOT_AN_IMAGE, f"{path}: is a directory")
    except Exception as e:  # noqa: BLE001 - any I/O failure after retries is this input's problem
        return ("failed", R.READ_ERROR, f"{path}: {type(e).__name__}: {e}")
    try:
        enc = normalise(data, size=_W["size"], quality=_W["quality"], max_pixels=_W["max_pixels"])
    except ImageFailure as e:
        return ("failed", e.reason, f"{path}: {e.detail}")
    meta = F.sample_json(key, labels, {**source, "width": enc.width, "height": enc.height, "mode": enc.mode})
    return ("ok", Sample(enc.width, enc.height, enc.out_width, enc.out_height, enc.mode, len(enc.jpg),
                         F.sample_tar_bytes(key, enc.jpg, meta)))


def _encode_batch(items: list[tuple | None]):
    """items: (path, key, labels, source) per input to encode, None for an input failed already."""
    return [None if it is None else _encode_one(*it) for it in items]
