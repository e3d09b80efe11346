"""Where finished shard files go. The writer stages every file locally and `publish`es it whole;
`LocalShardStore` renames within one file system (atomic), `flows.storage.S3ShardStore` uploads
(multipart) — an S3 object also appears whole or not at all. The stats file is published last."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol


def read_parquet_bytes(data: bytes, columns: list[str] | None = None):
    """A parquet file held in memory, as a pyarrow Table, read synchronously.

    pq.read_table's default pre-buffering hands the reads to Arrow's I/O threads, which can still
    be releasing their view of the Python `bytes` after the call returns; if the interpreter is
    finalising by then, that thread aborts the process ("terminate called without an active
    exception", seen on `dart refresh`). Without pre-buffering or threads nothing outlives the call."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data), columns=columns, pre_buffer=False, use_threads=False)


class ShardStore(Protocol):
    url: str

    def list_names(self) -> list[str]: ...          # file names directly in the shard dir
    def read_bytes(self, name: str) -> bytes: ...
    def publish(self, local: Path, name: str) -> None: ...
    def delete(self, name: str) -> None: ...
    def url_of(self, name: str) -> str: ...
    def staging_dir(self) -> Path: ...               # a local, empty-at-start scratch dir


class LocalShardStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.url = str(self.path)

    def list_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def publish(self, local: Path, name: str) -> None:
        os.replace(local, self.path / name)  # same file system: staging is inside the shard dir

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def url_of(self, name: str) -> str:
        return str(self.path / name)

    def staging_dir(self) -> Path:
        d = self.path / ".staging"
        shutil.rmtree(d, ignore_errors=True)  # leftovers of a killed run
        d.mkdir(parents=True, exist_ok=True)
        return d
