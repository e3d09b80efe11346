"""Content-addressed cache of raw LLM answers.

Key = sha256 of (model, prompt hash, query index, sampling parameters): the same question asked
the same way is never paid for twice, and the three queries of a class (same prompt, different
index) are three entries. The record holds the raw answer text and usage counts; it never holds
the API key, the base URL's credentials or anything from the request headers.

Only successful completions are stored (a 429/5xx/timeout is never cached); an answer that cannot
be parsed *is* stored, raw, so that it is not bought again and can be inspected.

`StorageCache(root)` keeps the records under a local folder or an s3:// prefix (dart_core.storage);
`MemoryCache` keeps them for one run.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol

from dart_core import storage


def cache_key(model: str, prompt_sha: str, query_index: int, sampling: dict) -> str:
    blob = json.dumps({"model": model, "prompt": prompt_sha, "query": int(query_index),
                       "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, record: dict) -> None: ...


def _relpath(key: str) -> str:
    return f"{key[:2]}/{key}.json"  # fan out so a 20k-answer cache is not one huge directory


class StorageCache:
    """Records as `<root>/<k[:2]>/<k>.json`, root a local folder or an s3:// prefix."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.join(root)

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(storage.join(self.root, _relpath(key))).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write from a killed run: ask again

    def put(self, key: str, record: dict) -> None:
        # atomic (temp + rename locally, one PUT on S3): concurrent readers see the whole record or none
        storage.write_bytes(storage.join(self.root, _relpath(key)), json.dumps(record, ensure_ascii=False).encode("utf-8"))




class MemoryCache:
    """No persistence (when no --cache is given): still dedupes within one run."""

    def __init__(self):
        self.d: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        return self.d.get(key)

    def put(self, key: str, record: dict) -> None:
        self.d[key] = record
