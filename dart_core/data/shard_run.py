"""One shard run: one source (local or s3://) in one of the four formats -> `OUT/classes.csv` +
`OUT/<split>/NNNNNN.{tar,parquet}` + `NNNNNN_stats.json` (dart_core.data.shard_format). The `shard`
flow's task runs `shard_source` (tests and benchmarks call it directly).

Vocabulary per mode: incremental requires OUT/classes.csv (if any) to equal the source's
vocabulary; extend appends the source's new classes after the existing ones (class indices of
existing shards stay valid); overwrite replaces it."""
from __future__ import annotations

from dart_core import storage
from dart_core.data import shard_format as F
from dart_core.data.records import SourceError
from dart_core.data.shard_writer import ShardWriteError, WriterConfig, write_shards
from dart_core.data.sources import open_source
from dart_core.options.data import ShardOptions
from dart_core.vocab import Vocabulary, VocabularyError, for_output


class ShardRunError(RuntimeError):
    """The run cannot proceed; the message is one line naming the file or argument."""


def resolve_vocabulary(out: str, vocab: Vocabulary, mode: str) -> Vocabulary:
    """OUT/classes.csv for `vocab`'s data added in `mode` (dart_core.vocab.for_output), written when it
    changes; returns it."""
    url = storage.join(out, "classes.csv")
    try:
        existing = Vocabulary.read_csv(url) if mode != "overwrite" and storage.exists(url) else None
        final = for_output(existing, vocab, mode, url)
    except VocabularyError as e:
        raise ShardRunError(str(e)) from None
    if len(final) and (existing is None or final.hash() != existing.hash()):
        final.write(url)
    return final


def check_absent_rule(store: storage.ShardDir, absent: str, mode: str) -> None:
    """An incremental rerun must label absent classes as the complete shards already did. Shards
    that do not record the rule (written before it was recorded) are not checked: the demo's, for
    one, name every class explicitly, so either rule gives them the same labels."""
    if mode != "incremental":
        return
    for i in sorted(F.scan(store.list_names())[0]):
        name = F.file_name(i, F.STATS)
        stats = F.read_stats(store, i)
        had = stats.get("absent") if stats.get("dataset") == "folder" else None
        if had is not None and had != absent:
            raise ShardRunError(f"{store.url_of(name)}: written with --absent {had}, this run asks for --absent "
                                f"{absent}; rerun with --absent {had} or use --mode overwrite")


def check_options(options: ShardOptions) -> None:
    """`absent` is for the folder format only (its values are checked by ShardOptions)."""
    if options.absent is not None and options.format != "folder":
        raise ShardRunError(f"--absent applies to --format folder only ({options.format} defines its own negatives)")


def shard_source(options: ShardOptions, *, max_shard_bytes: int = 1 << 30, progress: bool = True,
                 log=None) -> dict:
    """Shard one source; returns the reconciliation report (ShardReport.to_dict() + vocabulary).
    `options.absent` (folder only): what a class an image's labels do not name becomes, "negative"
    (default) or "unknown"; recorded in every shard's stats file."""
    check_options(options)
    source_options = {"absent": options.absent or "negative"} if options.format == "folder" else {}
    try:
        cfg = WriterConfig(shard_size=options.shard_size, mode=options.mode, workers=options.workers,
                           image_size=options.image_size, max_shard_bytes=max_shard_bytes, progress=progress)
        fs = storage.Storage()
        src = open_source(options.format, options.source, split=options.split, fs=fs, **source_options)
        store = storage.ShardDir(storage.join(options.out, src.split))
        if source_options:
            check_absent_rule(store, source_options["absent"], options.mode)
        vocab = resolve_vocabulary(options.out, src.vocab, options.mode)
        if log is not None and src.split_rule:  # before the (long) run: a wrong split can be stopped now
            log(f"{src.dataset} {src.split}: {src.split_rule}")
        report = write_shards(src.records, store, cfg, reader=fs,
                              meta={"dataset": src.dataset, "split": src.split, "source": options.source,
                                    **source_options},
                              log=log)
    except (SourceError, ShardWriteError) as e:
        raise ShardRunError(str(e)) from None
    d = report.to_dict()
    d.update(split=src.split, dataset=src.dataset, classes=len(vocab), vocab_hash=vocab.hash(), split_rule=src.split_rule,
             classes_csv=storage.join(options.out, "classes.csv"), **source_options)
    return d
