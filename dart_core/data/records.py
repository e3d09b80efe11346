"""What a source reader yields: one `InputRecord` per input image, plus the vocabulary."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable

from dart_core.vocab import Vocabulary

# Why an input became a failed row. The reconciliation report counts per reason.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
DECODE_ERROR = "decode_error"          # truncated / corrupt image data
DECOMPRESSION_BOMB = "decompression_bomb"
DUPLICATE_ID = "duplicate_id"          # the first occurrence of an id wins
UNKNOWN_CLASS = "unknown_class"
MALFORMED_LABEL = "malformed_label"    # e.g. an Open Images confidence that is not 0/1
MALFORMED_ROW = "malformed_row"        # a metadata row that cannot be parsed at all
PATH_ESCAPES_SOURCE = "path_escapes_source"
READ_ERROR = "read_error"              # any other I/O failure (after the client's retries)

REASONS = (MISSING_FILE, EMPTY_FILE, NOT_AN_IMAGE, DECODE_ERROR, DECOMPRESSION_BOMB, DUPLICATE_ID,
           UNKNOWN_CLASS, MALFORMED_LABEL, MALFORMED_ROW, PATH_ESCAPES_SOURCE, READ_ERROR)


class SourceError(ValueError):
    """The source as a whole cannot be read (missing metadata file, inconsistent files).
    The message names the file; the CLI prints it as a one-line error."""


@dataclass(slots=True)
class InputRecord:
    key: str                      # stable, filesystem-safe sample key (webdataset __key__)
    path: str                     # local path or URL of the image bytes
    labels: dict[str, int]        # class id -> +1 / -1; absent classes are unknown
    source: dict = field(default_factory=dict)   # small JSON-able provenance (dataset, row, ...)
    error: tuple[str, str] | None = None          # (reason, detail): fail without decoding


@dataclass
class SourceData:
    dataset: str
    split: str
    vocab: Vocabulary
    records: Iterable[InputRecord]
    root: str = ""


MAX_KEY_LEN = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A webdataset-safe key: no dots (webdataset splits the extension at the first dot), no
    slashes. Different inputs may collide after this; the writer then reports a duplicate id."""
    key = _UNSAFE.sub("_", text).strip("_") or "_"
    if len(key) > MAX_KEY_LEN:  # tar member names stay short; the hash keeps long keys distinct
        key = key[:MAX_KEY_LEN - 17] + "_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    return key
