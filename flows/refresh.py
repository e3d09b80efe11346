"""`refresh` flow: shard only what is new under a raw-image prefix (local or s3://).

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

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage
from flows.shard import ShardRunError, resolve_vocabulary

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST = "_refresh/manifest.parquet"


def _read_manifest(url: str):
    try:
        return storage.read_parquet_bytes(storage.read_bytes(url)).to_pylist()
    except FileNotFoundError:
        return []


def _write_manifest(url: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("prefix", pa.string()), ("key", pa.string()), ("etag", pa.string()), ("size", pa.int64()),
        ("sample_key", pa.string()), ("refreshed_at", pa.string())])), buf)
    storage.write_bytes(url, buf.getvalue())


def _labels_and_vocab(prefix: str, objs, out: str):
    """Labels {relative path: {class: mark} | (reason, message)} and vocabulary from the prefix's
    CSVs (dart_core.data.sources.folder.read_label_files); without a classes.csv there, the label
    ids found, else OUT's classes.csv, else an empty vocabulary."""
    from dart_core.data.records import SourceError
    from dart_core.data.sources.folder import read_label_files
    from dart_core.vocab import Vocabulary, VocabularyError

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


def refresh_prefix(prefix: str, out: str, *, split: str = "train", shard_size: int = 5000,
                   workers: int | None = None, image_size: int = 256, progress: bool = True, log=None) -> dict:
    from dart_core.data import records as R
    from dart_core.data.records import InputRecord, SourceError, sample_key
    from dart_core.data.shard_writer import ShardWriteError, WriterConfig, write_shards
    from dart_core.data.sources.folder import complete_labels

    prefix = prefix.rstrip("/")
    try:
        objs = storage.list_objects(prefix)
    except Exception as e:  # noqa: BLE001 - e.g. NoSuchBucket: the run cannot proceed
        raise ShardRunError(f"{prefix}: cannot list ({type(e).__name__}: {e})") from None
    manifest_url = storage.join(out, MANIFEST)
    manifest = _read_manifest(manifest_url)
    known = {(r["prefix"], r["key"], r["etag"]) for r in manifest}
    known_keys = {(r["prefix"], r["key"]) for r in manifest}
    new = [o for o in objs if o.key.lower().endswith(IMAGE_EXTS) and (prefix, o.key, o.etag) not in known]
    result = {"prefix": prefix, "out": out, "objects": len(objs), "new_objects": len(new), "new_shards": []}
    if not new:
        return result
    try:
        labels, vocab = _labels_and_vocab(prefix, objs, out)
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
        report = write_shards(records, store, WriterConfig(shard_size=shard_size, mode="extend", workers=workers,
                                                           image_size=image_size, progress=progress),
                              reader=storage.Storage(), meta={"dataset": "refresh", "split": split, "source": prefix},
                              log=log)
    except (SourceError, ShardWriteError) as e:
        raise ShardRunError(str(e)) from None
    _write_manifest(manifest_url, manifest + rows)  # after the shards: a crash before is resumed
    result.update(report.to_dict())
    result["new_shards"] = sorted(set(report.resumed_shards) | set(report.new_shards))
    result.update(prefix=prefix, out=out, new_objects=len(new))
    return result


@task(name="refresh-shard-new", cache_policy=NO_CACHE)  # must look at the bucket every time
def refresh_task(prefix: str, out: str, split: str, shard_size: int, workers: int | None) -> dict:
    return refresh_prefix(prefix, out, split=split, shard_size=shard_size, workers=workers, log=get_run_logger().info)


@flow(name="refresh")
def refresh(prefix: str, out: str, split: str = "train", shard_size: int = 5000,
            workers: int | None = None, details: bool = False) -> list[str] | dict:
    """Shard the objects under PREFIX not yet in OUT's manifest; returns the new shard URLs, or with
    details=True the whole report (`refresh_prefix`'s; what `dart refresh` prints)."""
    report = refresh_task(prefix, out, split, shard_size, workers)
    return report if details else report["new_shards"]
