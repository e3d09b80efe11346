"""Generic folder: `labels.csv` with columns `path,labels` (labels separated by `|`; a `-` prefix
marks a verified negative, a `?` prefix an unknown label) + optional `classes.csv` (id,name,split)
+ the images.

A class an image's labels do not name is a negative (`absent="negative"`, the default: label files
usually list only the classes present), or unknown with `absent="unknown"`. `?cls` keeps one class
unknown for one image either way: `cat|?dog` = cat positive, dog unknown, every other class negative.

Without classes.csv the vocabulary is every label id found, sorted, all `seen`, names = ids.
With it, a label id missing from classes.csv makes that row a failed row (unknown_class).
Only images listed in labels.csv are inputs; other files in the folder are ignored.

Sample key = `records.sample_key` of the normalised relative path (distinct paths, distinct keys,
whatever characters they hold); `source.file` is the path exactly as labels.csv gives it."""
from __future__ import annotations

import functools
import os
import posixpath

from dart_core.data import records as R
from dart_core.storage import Storage, is_s3
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import csv_rows, read_text
from dart_core.vocab import Vocabulary, VocabularyError


ABSENT = ("negative", "unknown")  # what a class the labels do not name becomes
_MARK = {1: "positive", -1: "negative", 0: "unknown"}


def parse_labels(field: str) -> dict[str, int]:
    """'a|b|-c|?d' -> {'a': 1, 'b': 1, 'c': -1, 'd': 0} (0 = marked unknown). Raises ValueError on
    an empty token or a class given twice with different marks."""
    out: dict[str, int] = {}
    field = (field or "").strip()
    if not field:
        return out
    for tok in field.split("|"):
        tok = tok.strip()
        val = 1
        if tok[:1] in ("-", "?"):
            tok, val = tok[1:].strip(), -1 if tok[0] == "-" else 0
        if not tok or tok[:1] in ("-", "?"):
            raise ValueError(f"malformed label token in {field!r}")
        if out.get(tok, val) != val:
            raise ValueError(f"label {tok!r} is both {_MARK[out[tok]]} and {_MARK[val]}")
        out[tok] = val
    return out


def is_label_csv(rows: list[list[str]]) -> bool:
    """Whether CSV rows are a label file: the header is `path,labels`."""
    return bool(rows) and [c.strip().lower() for c in rows[0][:2]] == ["path", "labels"]


def label_rows(rows: list[list[str]], file: str):
    """The rows of a label file (`path,labels`, header first; `is_label_csv`) as
    (where, path, labels, error) per non-blank row: `where` = "FILE:LINE", `labels` as
    `parse_labels` gives them, or None with `error` = (reason, message) for a malformed row or cell.
    The one parser of the label-file format: the folder source and `refresh` read label files so."""
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{file}:{lineno}"
        rel = row[0].strip()
        if len(row) > 2 or not rel:
            yield where, rel, None, (R.MALFORMED_ROW, f"{where}: expected 2 columns path,labels, got {row!r}")
            continue
        try:
            labels = parse_labels(row[1] if len(row) > 1 else "")
        except ValueError as e:
            yield where, rel, None, (R.MALFORMED_LABEL, f"{where}: {e}")
            continue
        yield where, rel, labels, None


def read_label_files(files, fs: Storage | None = None, classes_file: str = "classes.csv"):
    """Labels and vocabulary from the CSV files of a raw-image prefix (`dart refresh`): `files` =
    (key relative to the prefix, url) pairs. `classes_file` at the top -> the vocabulary (None
    without one); every other CSV with the label-file header -> labels {path relative to the
    prefix: {class: mark}}, or (reason, message) for a malformed row; other CSVs are not ours and
    are skipped. Raises SourceError for an unreadable file or a malformed classes file."""
    fs = fs or Storage()
    labels: dict[str, dict | tuple] = {}
    vocab = None
    for key, url in files:
        if not key.lower().endswith(".csv"):
            continue
        text = read_text(fs, url, "CSV file")
        if key == classes_file:
            try:
                vocab = Vocabulary.parse_csv(text, where=url)
            except VocabularyError as e:
                raise SourceError(str(e)) from None
            continue
        rows = csv_rows(text)
        if not is_label_csv(rows):
            continue  # some other CSV; not ours
        base = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        for _, rel, marks, err in label_rows(rows, key):
            if rel:
                labels[base + rel] = marks if err is None else err
    return labels, vocab


def complete_labels(labels: dict[str, int], class_ids, absent: str) -> dict[str, int]:
    """The ±1 labels to store: named classes as marked (`?` ones left out: unknown) and, with
    absent="negative", -1 for every other class of `class_ids`."""
    out = {c: -1 for c in class_ids} if absent == "negative" else {}
    out.update(labels)
    return {c: v for c, v in out.items() if v}


def resolve_inside(root: str, rel: str) -> str | None:
    """The image path for `rel` under `root`, or None if it escapes the root (absolute paths,
    `..`, and — locally — symlinks pointing outside)."""
    rel = rel.replace("\\", "/")
    if not rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return None
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    if is_s3(root):
        return root.rstrip("/") + "/" + norm
    base = _real_dir(root)
    full = os.path.join(base, norm)
    parent, name = os.path.split(full)
    real = os.path.join(_real_dir(parent), name)  # folders resolved once each, not once per image
    if os.path.islink(real):
        real = os.path.realpath(real)
    return full if real == base or real.startswith(base.rstrip(os.sep) + os.sep) else None


@functools.lru_cache(maxsize=65536)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def key_for(rel: str) -> str:
    return sample_key(posixpath.normpath(rel.replace("\\", "/")))


def read_folder(root: str, *, fs: Storage | None = None, split: str = "train",
                labels_file: str = "labels.csv", classes_file: str = "classes.csv",
                absent: str = "negative") -> SourceData:
    if absent not in ABSENT:
        raise SourceError(f"--absent {absent!r}: must be one of {'|'.join(ABSENT)}")
    fs = fs or Storage()
    labels_url = fs.join(root, labels_file)
    classes_url = fs.join(root, classes_file)
    rows = csv_rows(read_text(fs, labels_url, "labels file (path,labels)"))
    if not is_label_csv(rows):
        raise SourceError(f"{labels_url}: header must be path,labels")
    vocab = None
    if fs.exists(classes_url):
        try:
            vocab = Vocabulary.parse_csv(read_text(fs, classes_url, "classes file"), where=classes_url)
        except VocabularyError as e:
            raise SourceError(str(e)) from None
    parsed = list(label_rows(rows, labels_file))
    found = {c for _, _, labels, _ in parsed if labels for c in labels}
    vocab_from_file = vocab is not None
    if vocab is None:
        if not found:
            raise SourceError(f"{labels_url}: no labels and no {classes_file}; cannot build a vocabulary")
        vocab = Vocabulary.from_names(sorted(found))
    src = SourceData("folder", split, vocab, _records(root, parsed, vocab.ids, absent), root)
    n_unseen = sum(s == "unseen" for s in vocab.splits)
    src.split_rule = (f"seen = {len(vocab) - n_unseen}, unseen = {n_unseen} classes: "
                      + (f"the split column of {classes_file}" if vocab_from_file else
                         f"every label of {labels_file}, all seen (no {classes_file})"))
    return src


def _records(root: str, parsed, class_ids, absent: str):
    known = set(class_ids)
    for where, rel, labels, err in parsed:
        key = key_for(rel) if rel else sample_key(where)
        src = {"dataset": "folder", "row": where, "file": rel}
        if err is not None:
            yield InputRecord(key, rel, {}, src, err)
            continue
        path = resolve_inside(root, rel)
        if path is None:
            yield InputRecord(key, rel, {}, src, (R.PATH_ESCAPES_SOURCE, f"{where}: {rel!r} is outside the source folder"))
            continue
        unknown = sorted(set(labels) - known)
        if unknown:
            yield InputRecord(key, path, {}, src, (R.UNKNOWN_CLASS, f"{where}: unknown class id(s) {unknown}"))
            continue
        yield InputRecord(key, path, complete_labels(labels, class_ids, absent), src)
