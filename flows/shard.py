"""`shard` flow: one source (local or s3://) in one of the four formats -> `OUT/classes.csv` +
`OUT/<split>/NNNNNN.{tar,parquet}` + `NNNNNN_stats.json` (dart_core.data.shard_format). `dart shard`
runs this flow; `shard_source` is what its task runs (and what tests and benchmarks call directly).

Vocabulary per mode: incremental requires OUT/classes.csv (if any) to equal the source's
vocabulary; extend appends the source's new classes after the existing ones (class indices of
existing shards stay valid); overwrite replaces it."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage


class ShardRunError(RuntimeError):
    """The run cannot proceed; the message is one line naming the file or argument."""


def resolve_vocabulary(out: str, vocab, mode: str):
    """OUT/classes.csv for `vocab`'s data added in `mode` (dart_core.vocab.for_output), written when it
    changes; returns it."""
    from dart_core.vocab import Vocabulary, VocabularyError, for_output

    url = storage.join(out, "classes.csv")
    try:
        existing = Vocabulary.read_csv(url) if mode != "overwrite" and storage.exists(url) else None
        final = for_output(existing, vocab, mode, url)
    except VocabularyError as e:
        raise ShardRunError(str(e)) from None
    if len(final) and (existing is None or final.hash() != existing.hash()):
        final.write(url)
    return final


def check_absent_rule(store, absent: str, mode: str) -> None:
    """An incremental rerun must label absent classes as the complete shards already did. Shards
    that do not record the rule (written before it was recorded) are not checked: the demo's, for
    one, name every class explicitly, so either rule gives them the same labels."""
    from dart_core.data import shard_format as F

    if mode != "incremental":
        return
    for i in sorted(F.scan(store.list_names())[0]):
        name = F.file_name(i, F.STATS)
        stats = F.read_stats(store, i)
        had = stats.get("absent") if stats.get("dataset") == "folder" else None
        if had is not None and had != absent:
            raise ShardRunError(f"{store.url_of(name)}: written with --absent {had}, this run asks for --absent "
                                f"{absent}; rerun with --absent {had} or use --mode overwrite")


def check_options(fmt: str, absent: str | None) -> None:
    """`absent` is for the folder format only, and one of its values."""
    from dart_core.data.sources.folder import ABSENT

    if absent is not None and fmt != "folder":
        raise ShardRunError(f"--absent applies to --format folder only ({fmt} defines its own negatives)")
    if absent is not None and absent not in ABSENT:
        raise ShardRunError(f"--absent {absent!r}: must be one of {'|'.join(ABSENT)}")


def shard_source(source: str, fmt: str, out: str, *, split: str | None = None, shard_size: int = 5000,
                 mode: str = "incremental", workers: int | None = None, image_size: int = 256,
                 max_shard_bytes: int = 1 << 30, progress: bool = True, absent: str | None = None,
                 log=None) -> dict:
    """Shard one source; returns the reconciliation report (ShardReport.to_dict() + vocabulary).
    `absent` (folder only): what a class an image's labels do not name becomes, "negative"
    (default) or "unknown"; recorded in every shard's stats file."""
    from dart_core.data.records import SourceError
    from dart_core.data.shard_writer import ShardWriteError, WriterConfig, write_shards
    from dart_core.data.sources import open_source

    check_options(fmt, absent)
    options = {"absent": absent or "negative"} if fmt == "folder" else {}
    try:
        cfg = WriterConfig(shard_size=shard_size, mode=mode, workers=workers, image_size=image_size,
                           max_shard_bytes=max_shard_bytes, progress=progress)
        fs = storage.Storage()
        src = open_source(fmt, source, split=split, fs=fs, **options)
        store = storage.ShardDir(storage.join(out, src.split))
        if options:
            check_absent_rule(store, options["absent"], mode)
        vocab = resolve_vocabulary(out, src.vocab, mode)
        if log is not None and src.split_rule:  # before the (long) run: a wrong split can be stopped now
            log(f"{src.dataset} {src.split}: {src.split_rule}")
        report = write_shards(src.records, store, cfg, reader=fs,
                              meta={"dataset": src.dataset, "split": src.split, "source": source, **options},
                              log=log)
    except (SourceError, ShardWriteError) as e:
        raise ShardRunError(str(e)) from None
    d = report.to_dict()
    d.update(split=src.split, dataset=src.dataset, classes=len(vocab), vocab_hash=vocab.hash(), split_rule=src.split_rule,
             classes_csv=storage.join(out, "classes.csv"), **options)
    return d


@task(name="shard-split", cache_policy=NO_CACHE)  # side effects; a rerun must resume, not replay
def shard_split_task(source: str, fmt: str, out: str, split: str | None, shard_size: int, mode: str,
                     workers: int | None, image_size: int, absent: str | None = None) -> dict:
    return shard_source(source, fmt, out, split=split, shard_size=shard_size, mode=mode,
                        workers=workers, image_size=image_size, absent=absent, log=get_run_logger().info)


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile_task(shard_dir: str) -> dict:
    from dart_core.data.shard_writer import totals

    return totals(storage.ShardDir(shard_dir))


@flow(name="shard")
def shard(source: str, format: str, out: str, split: str | None = None, shard_size: int = 5000,
          mode: str = "incremental", workers: int | None = None, image_size: int = 256,
          absent: str | None = None) -> dict:
    """Shard SOURCE (format openimages|nuswide|coco|folder) into OUT; returns the report.
    `absent` (folder only): classes an image's labels do not name are "negative" (default) or "unknown"."""
    report = shard_split_task(source, format, out, split, shard_size, mode, workers, image_size, absent)
    report["totals"] = reconcile_task(storage.join(out, report["split"]))
    return report
