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
    split_rule: str = ""          # one line: how the seen/unseen split was made, with the counts


MAX_KEY_LEN = 96
_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
HASH_SEP = "~"   # never in a plain key: hashed keys and plain keys cannot meet


def sample_key(path: str) -> str:
    """The webdataset-safe sample key of an input's relative path (or any identifying text),
    unique and stable: distinct paths never share a key, the same path always gets the same one.

    - `NAME.jpg` with NAME made only of [A-Za-z0-9_-] (at most 96 characters) has the key NAME:
      Open Images ids, COCO file stems and most camera/export names stay readable;
    - any other path (other extensions, folders, dots, spaces, quotes, CJK, ...) becomes a
      readable slug of the whole path, `~`, and the first 16 hex digits of the SHA-1 of the exact
      path: `写真/猫.jpg` -> `jpg~…`, `a/b_c.jpg` -> `a_b_c_jpg~9e82…`, `a_b/c.jpg` ->
      `a_b_c_jpg~c7cf…`, `a.png` -> `a_png~…` (not `a`, which is `a.jpg`'s).
    Plain keys never hold `~`, so the two kinds cannot meet; two hashed keys meet only if two
    paths share a slug and a 64-bit hash, and the writer would still report that as a duplicate id
    rather than merge two images. No dots (webdataset splits the extension at the first dot) and
    no slashes in any key."""
    stem = path[:-4] if path.endswith(".jpg") else None
    if stem and _SAFE.fullmatch(stem) and len(stem) <= MAX_KEY_LEN:
        return stem
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    slug = _UNSAFE.sub("_", path).strip("_")[:MAX_KEY_LEN - len(digest) - 1]
    return f"{slug}{HASH_SEP}{digest}"
