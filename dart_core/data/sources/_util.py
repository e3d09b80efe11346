from __future__ import annotations

import csv
import io
import logging

from dart_core.storage import Storage
from dart_core.data.records import SourceError

# Problems that cost one label, not an image or the run (a malformed cell of a label file): logged
# as warnings here, one line each naming file:line. With no logging configured, Python prints
# WARNING records to stderr (logging.lastResort), so `dart shard` shows them as they happen.
LOG = logging.getLogger("dart_core.data.sources")
MAX_WARNINGS_PER_FILE = 20


class CellWarnings:
    """One warning per malformed label cell, at most MAX_WARNINGS_PER_FILE per file; `finish()`
    logs one summary line per file that had more. `counts` (file -> cells) stays for callers."""

    def __init__(self, limit: int = MAX_WARNINGS_PER_FILE):
        self.limit = limit
        self.counts: dict[str, int] = {}

    def warn(self, where: str, line: int, message: str) -> None:
        n = self.counts[where] = self.counts.get(where, 0) + 1
        if n <= self.limit:
            LOG.warning("%s:%d: %s", where, line, message)

    def finish(self) -> None:
        for where, n in self.counts.items():
            if n > self.limit:
                LOG.warning("%s: %d more malformed label cells not shown (%d in all; each such label is unknown)",
                            where, n - self.limit, n)


def read_text(fs: Storage, url: str, what: str) -> str:
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


def positional_lines(text: str) -> list[str]:
    """Every line, stripped, trailing blank lines dropped: line i+1 of the file is element i
    (files whose rows are positional — one row per image — keep inner blank lines as rows)."""
    out = [ln.strip() for ln in text.splitlines()]
    while out and not out[-1]:
        out.pop()
    return out
