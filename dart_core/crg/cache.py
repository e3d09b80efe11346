"""Content-addressed cache of raw LLM answers.

Key = sha256 of (model, prompt hash, query index, sampling parameters): the same question asked
the same way is never paid for twice, and the three queries of a class (same prompt, different
index) are three entries. The record holds the raw answer text and usage counts; it never holds
the API key, the base URL's credentials or anything from the request headers.

Only successful completions are stored (a 429/5xx/timeout is never cached); an answer that cannot
be parsed *is* stored, raw, so that it is not bought again and can be inspected.

The storage is pluggable so that dart_core stays free of boto3: `LocalCache(dir)` here, an S3
one in flows/crg.py built on flows.storage.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol


def cache_key(model: str, prompt_sha: str, query_index: int, sampling: dict) -> str:
    blob = json.dumps({"model": model, "prompt": prompt_sha, "query": int(query_index),
                       "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, record: dict) -> None: ...


def _relpath(key: str) -> str:
    return f"{key[:2]}/{key}.json"  # fan out so a 20k-answer cache is not one huge directory


class LocalCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def get(self, key: str) -> dict | None:
        p = self.root / _relpath(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a torn write from a killed run: ask again

    def put(self, key: str, record: dict) -> None:
        p = self.root / _relpath(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)  # atomic: concurrent readers see the whole record or none


class CallbackCache:
    """A cache over byte get/put callables (used by flows/ for s3:// caches via flows.storage)."""

    def __init__(self, read, write, exists, join, root: str):
        self._read, self._write, self._exists, self._join, self.root = read, write, exists, join, root

    def get(self, key: str) -> dict | None:
        url = self._join(self.root, _relpath(key))
        if not self._exists(url):
            return None
        try:
            return json.loads(self._read(url).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, key: str, record: dict) -> None:
        self._write(self._join(self.root, _relpath(key)), json.dumps(record, ensure_ascii=False).encode("utf-8"))


class MemoryCache:
    """No persistence (when no --cache is given): still dedupes within one run."""

    def __init__(self):
        self.d: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        return self.d.get(key)

    def put(self, key: str, record: dict) -> None:
        self.d[key] = record
