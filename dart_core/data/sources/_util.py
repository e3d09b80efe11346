from __future__ import annotations

import csv
import io

from dart_core.data.fs import FileSystem
from dart_core.data.records import SourceError


def read_text(fs: FileSystem, url: str, what: str) -> str:
    try:
        data = fs.read_bytes(url)
    except FileNotFoundError:
        raise SourceError(f"{url}: {what} not found") from None
    except OSError as e:
        raise SourceError(f"{url}: cannot read {what}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{url}: {what} is not UTF-8 text ({e})") from None


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]
