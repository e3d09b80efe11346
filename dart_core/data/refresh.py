"""Refresh: shard only what is new under a raw-image prefix (local or s3://). The `refresh` flow's
task runs `refresh_prefix` (tests call it directly).

The prefix holds images (any depth) and optionally `classes.csv` and label CSVs (any other `*.csv`
with header `path,labels`, paths relative to the prefix, folder-format labels). A manifest
`OUT/_refresh/manifest.parquet` keyed by (prefix, object key, ETag) records every object already
turned into a shard sample or failed row. New objects (and changed ones: same key, new ETag, whose
sample key then gets an `_<etag8>` suffix so both versions stay distinct) are sharded in `extend`
mode into new shards; the new shard URLs are returned for annotation. Nothing new: no write at all.

Crash safety: the manifest is updated after the shards are written; a rerun after a crash hands
the same objects to the writer, which skips those already in complete shards (and still reports
those shards as new, since the manifest never recorded them)."""
from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from dart_core import storage
from dart_core.data import records as R
from dart_core.data.records import InputRecord, SourceError, sample_key
from dart_core.data.shard_run import ShardRunError, resolve_vocabulary
from dart_core.data.shard_writer import ShardWriteError, WriterConfig, write_shards
from dart_core.data.sources.folder import complete_labels, read_label_files
from dart_core.options.data import RefreshOptions
from dart_core.vocab import Vocabulary, VocabularyError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST = "_refresh/manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("prefix", pa.string()), ("key", pa.string()), ("etag", pa.string()), ("size", pa.int64()),
    ("sample_key", pa.string()), ("refreshed_at", pa.string())])


def read_manifest(url: str) -> list[dict]:
    """The manifest's rows; none before the first refresh."""
    try:
        return storage.read_parquet_bytes(storage.read_bytes(url)).to_pylist()
    except FileNotFoundError:
        return []


def write_manifest(url: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buf)
    storage.write_bytes(url, buf.getvalue())


def new_objects(prefix: str, objs, manifest: list[dict]) -> list:
    """The images among `objs` whose (prefix, key, ETag) the manifest does not hold yet."""
    known = {(r["prefix"], r["key"], r["etag"]) for r in manifest}
    return [o for o in objs if o.key.lower().endswith(IMAGE_EXTS) and (prefix, o.key, o.etag) not in known]


def labels_and_vocab(objs, out: str) -> tuple[dict, Vocabulary]:
    """Labels {relative path: {class: mark} | (reason, message)} and vocabulary from the prefix's
    CSVs (dart_core.data.sources.folder.read_label_files); without a classes.csv there, the label
    ids found, else OUT's classes.csv, else an empty vocabulary."""
    labels, vocab = read_label_files([(o.key, o.url) for o in objs], storage.Storage())
    if vocab is None:
        found = sorted({c for v in labels.values() if isinstance(v, dict) for c in v})
        if found:
            vocab = Vocabulary.from_names(found)
        elif storage.exists(storage.join(out, "classes.csv")):
            try:
                vocab = Vocabulary.read_csv(storage.join(out, "classes.csv"))
            except VocabularyError as e:
                raise SourceError(str(e)) from None
        else:
            vocab = Vocabulary((), (), ())
    return labels, vocab


def refresh_prefix(options: RefreshOptions, *, image_size: int = 256, progress: bool = True, log=None) -> dict:
    """Shard the objects under `options.prefix` not yet in OUT's manifest, then record them there;
    returns the report (ShardReport.to_dict() + prefix, out, objects, new_objects, new_shards)."""
    prefix, out, split = options.prefix.rstrip("/"), options.out, options.split
    try:
        objs = storage.list_objects(prefix)
    except Exception as e:  # noqa: BLE001 - e.g. NoSuchBucket: the run cannot proceed
        raise ShardRunError(f"{prefix}: cannot list ({type(e).__name__}: {e})") from None
    manifest_url = storage.join(out, MANIFEST)
    manifest = read_manifest(manifest_url)
    known_keys = {(r["prefix"], r["key"]) for r in manifest}
    new = new_objects(prefix, objs, manifest)
    result = {"prefix": prefix, "out": out, "objects": len(objs), "new_objects": len(new), "new_shards": []}
    if not new:
        return result
    try:
        labels, vocab = labels_and_vocab(objs, out)
        vocab = resolve_vocabulary(out, vocab, "extend") if len(vocab) else vocab
        known_ids = set(vocab.ids)
        records, rows = [], []
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for o in new:
            key = sample_key(o.key)
            if (prefix, o.key) in known_keys:  # changed object: keep both versions distinct
                key = sample_key(f"{o.key}#{o.etag}")
            src = {"dataset": "refresh", "prefix": prefix, "file": o.key, "key": o.key, "etag": o.etag}
            lab = labels.get(o.key, {})
            err = None
            if isinstance(lab, tuple):  # a malformed row of a label file: (reason, message)
                err, lab = lab, {}
            elif set(lab) - known_ids:
                err, lab = (R.UNKNOWN_CLASS, f"{o.key}: unknown class id(s) {sorted(set(lab) - known_ids)}"), {}
            records.append(InputRecord(key, o.url, complete_labels(lab, (), "unknown"), src, err))
            rows.append({"prefix": prefix, "key": o.key, "etag": o.etag, "size": o.size,
                         "sample_key": key, "refreshed_at": now})
        store = storage.ShardDir(storage.join(out, split))
        cfg = WriterConfig(shard_size=options.shard_size, mode="extend", workers=options.workers,
                           image_size=image_size, progress=progress)
        report = write_shards(records, store, cfg, reader=storage.Storage(),
                              meta={"dataset": "refresh", "split": split, "source": prefix}, log=log)
    except (SourceError, ShardWriteError) as e:
        raise ShardRunError(str(e)) from None
    write_manifest(manifest_url, manifest + rows)  # after the shards: a crash before is resumed
    result.update(report.to_dict())
    result["new_shards"] = sorted(set(report.resumed_shards) | set(report.new_shards))
    result.update(prefix=prefix, out=out, new_objects=len(new))
    return result
