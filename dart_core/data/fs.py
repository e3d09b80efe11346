"""File access for source readers and the shard writer, injectable so that dart_core stays free
of boto3: `LocalFS` here; `flows.storage.StorageFS` adds s3:// with the same four methods.

Objects must be picklable: the shard writer's worker processes call `read_bytes`."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class FileSystem(Protocol):
    def read_bytes(self, url: str) -> bytes: ...      # FileNotFoundError when absent
    def exists(self, url: str) -> bool: ...
    def join(self, base: str, *parts: str) -> str: ...
    def list(self, prefix: str) -> list[str]: ...     # keys relative to prefix, recursive, sorted


class LocalFS:
    def read_bytes(self, url: str) -> bytes:
        return Path(url).read_bytes()

    def exists(self, url: str) -> bool:
        return Path(url).exists()

    def join(self, base: str, *parts: str) -> str:
        return str(Path(base, *parts))

    def list(self, prefix: str) -> list[str]:
        root = Path(prefix)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def is_remote(url: str) -> bool:
    return "://" in str(url)
