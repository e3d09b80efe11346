"""Input records -> webdataset shards `NNNNNN.tar` + `NNNNNN.parquet` + `NNNNNN_stats.json`
(the format: dart_core.data.shard_format), in a local folder or under an s3:// prefix
(dart_core.storage.ShardDir).

Exactly-once under kill -9, without any journal:
- every file of a shard is staged locally and published whole (rename / single S3 object), and the
  stats file is published last, so "has a stats file" == "complete";
- shards are written one after another, each from the next inputs in source order;
- a rerun (incremental or extend) deletes the files of incomplete shards, reads the `key`/`path`
  columns of the complete shards' parquet files (ok *and* failed rows) and skips exactly those
  inputs; numbering continues after the last complete shard, so the incomplete one is redone.
An input is identified by (key, path) and counted with multiplicity, so a duplicate id seen again
after a crash is classified the same way as in an uninterrupted run.

Decoding/encoding runs in a process pool (all cores by default) over small batches, with a bounded
window of batches in flight: memory does not grow with the number of inputs, and results come
back in input order so shard contents are deterministic."""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from dart_core.data import records as R
from dart_core.data import shard_format as F
from dart_core.data.image import DEFAULT_MAX_PIXELS
from dart_core.data.records import InputRecord
from dart_core.interrupt import check as check_interrupt
from dart_core.storage import ShardDir, Storage, read_parquet_bytes

MODES = ("incremental", "overwrite", "extend")
ROW_SCHEMA = F.row_schema()


class ShardWriteError(RuntimeError):
    """The run itself cannot proceed (bad mode, unreadable existing shards, dead worker pool)."""


@dataclass
class WriterConfig:
    shard_size: int = 5000                 # ok samples per shard
    max_shard_bytes: int = 1 << 30         # ... or this many tar bytes, whichever comes first
    image_size: int = 256                  # shorter side after resizing (never upscaled)
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS   # larger images are rejected as decompression bombs
    workers: int | None = None             # None: all cores; 1: in-process
    mode: str = "incremental"
    batch: int = 16                        # images per task sent to a worker
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ShardWriteError(f"--mode {self.mode!r}: must be one of {', '.join(MODES)}")
        if self.shard_size < 1:
            raise ShardWriteError(f"--shard-size {self.shard_size}: must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ShardWriteError(f"--workers {self.workers}: must be >= 1")


@dataclass
class ShardReport:
    out: str
    inputs: int = 0                 # inputs seen by this run
    skipped: int = 0                # ... already in complete shards (a rerun)
    ok: int = 0
    failed: int = 0
    failed_by_reason: dict = field(default_factory=dict)
    new_shards: list = field(default_factory=list)   # tar URLs written by this run
    resumed_shards: list = field(default_factory=list)  # complete shards holding skipped inputs
    seconds: float = 0.0
    totals: dict = field(default_factory=dict)        # over every complete shard in `out`

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds else 0.0

    def reconciles(self) -> bool:
        t = self.totals
        return (self.inputs == self.skipped + self.ok + self.failed
                and self.failed == sum(self.failed_by_reason.values())
                and t.get("inputs") == t.get("ok", 0) + sum(t.get("failed_by_reason", {}).values()))

    def to_dict(self) -> dict:
        return {"out": self.out, "inputs": self.inputs, "skipped": self.skipped, "ok": self.ok,
                "failed": self.failed, "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
                "new_shards": list(self.new_shards), "resumed_shards": list(self.resumed_shards),
                "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 1), "totals": self.totals,
                "reconciles": self.reconciles()}


from dart_core.data._worker import Sample, _encode_batch, _init_worker, storage_env  # noqa: E402 - light module for the pool


# ---- main side ----------------------------------------------------------------------------------
def _scan(store: ShardDir) -> tuple[set[int], set[int]]:
    return F.scan(store.list_names())


def _delete_shard(store: ShardDir, i: int) -> None:
    # stats first: a shard stops being "complete" before any of its data disappears
    for suffix in (F.STATS, F.TAR, F.SIDECAR):
        store.delete(F.file_name(i, suffix))


def totals(store: ShardDir) -> dict:
    """Reconciliation over every complete shard of the store (from the stats files)."""
    complete, _ = _scan(store)
    t = {"shards": len(complete), "inputs": 0, "ok": 0, "failed": 0, "failed_by_reason": Counter()}
    for i in sorted(complete):
        s = F.read_stats(store, i)
        t["inputs"] += s["inputs"]
        t["ok"] += s["ok"]
        t["failed"] += s["failed"]
        t["failed_by_reason"].update(s["failed_by_reason"])
    t["failed_by_reason"] = dict(sorted(t["failed_by_reason"].items()))
    return t


class _Shard:
    """One shard being filled in the staging dir."""

    def __init__(self, index: int, staging: Path, meta: dict, store: ShardDir):
        self.index, self.name, self.staging, self.meta = index, F.shard_name(index), staging, meta
        self.id = F.shard_id(store.url_of(F.file_name(index, F.TAR)))  # <split>-<NNNNNN>
        self.tar_path = staging / f"{self.name}{F.TAR}.{os.getpid()}"
        self.fh = open(self.tar_path, "wb")
        # The workers send each sample's tar members ready-made (shard_format.tar_member, the bytes
        # tarfile writes): this process appends and hashes them, nothing more per image.
        self.sha256 = hashlib.sha256()
        self.rows: list[dict] = []
        self.ok = 0
        self.failed = Counter()

    def add_ok(self, rec: InputRecord, sample: Sample) -> None:
        self._append(sample.tar)
        self.ok += 1
        self._row(rec, "ok", None, None, sample)

    def _append(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha256.update(data)

    def add_failed(self, rec: InputRecord, reason: str, detail: str) -> None:
        self.failed[reason] += 1
        self._row(rec, "failed", reason, f"{reason}: {detail}", None)

    def _row(self, rec, status, reason, error, enc) -> None:
        vals = rec.labels.values()
        self.rows.append({
            "key": rec.key, "status": status, "reason": reason, "error": error, "path": rec.path,
            "shard": self.id, "width": enc.width if enc else None, "height": enc.height if enc else None,
            "out_width": enc.out_width if enc else None, "out_height": enc.out_height if enc else None,
            "jpg_bytes": enc.jpg_bytes if enc else None, "n_pos": sum(v > 0 for v in vals) if status == "ok" else None,
            "n_neg": sum(v < 0 for v in vals) if status == "ok" else None,
            "source": json.dumps(rec.source, sort_keys=True, default=str)})

    @property
    def tar_bytes(self) -> int:
        return self.fh.tell()

    def finish(self, store: ShardDir) -> str:
        self._append(F.tar_end(self.fh.tell()))
        self.fh.close()
        h = self.sha256
        tar_size = self.tar_path.stat().st_size
        pq_path = self.staging / f"{self.name}{F.SIDECAR}.{os.getpid()}"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=ROW_SCHEMA), pq_path)
        stats = {"shard": self.id, "inputs": len(self.rows), "ok": self.ok,
                 "failed": sum(self.failed.values()), "failed_by_reason": dict(sorted(self.failed.items())),
                 "tar_bytes": tar_size, "tar_sha256": h.hexdigest(),
                 "first_key": self.rows[0]["key"] if self.rows else None,
                 "last_key": self.rows[-1]["key"] if self.rows else None,
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self.meta}
        st_path = self.staging / f"{self.name}{F.STATS}.{os.getpid()}"
        st_path.write_bytes(F.stats_bytes(stats))
        store.publish(self.tar_path, F.file_name(self.index, F.TAR))
        store.publish(pq_path, F.file_name(self.index, F.SIDECAR))
        store.publish(st_path, F.file_name(self.index, F.STATS))  # last: the shard is now complete
        return store.url_of(F.file_name(self.index, F.TAR))


def _done_inputs(store: ShardDir, complete: set[int]) -> dict:
    """(key, path) -> the shard URLs holding its rows, in shard order (one per occurrence)."""
    done: dict = {}
    for i in sorted(complete):
        name = F.file_name(i, F.SIDECAR)
        try:
            t = read_parquet_bytes(store.read_bytes(name), columns=["key", "path"])
        except Exception as e:  # noqa: BLE001
            raise ShardWriteError(f"{store.url_of(name)}: cannot read the sidecar of a complete shard ({e}); "
                                  "delete that shard's files or use --mode overwrite") from None
        url = store.url_of(F.file_name(i, F.TAR))
        for ident in zip(t.column("key").to_pylist(), t.column("path").to_pylist()):
            done.setdefault(ident, []).append(url)
    return done


def start_forkserver():
    """The forkserver context, its server started now (returns at once; it boots in the
    background) with the worker module preloaded, so each pool worker forks with PIL and numpy
    already imported (~15 ms a pool instead of ~200 ms). forkserver, not fork: the writer's parent
    may be threaded (Prefect, boto3). The preload list only counts if the server is not running."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "dart_core.data._worker"])
    forkserver.ensure_running()
    return ctx


def _ordered_map(records: Iterable[InputRecord], cfg: WriterConfig, reader: Storage):
    """Yield (record, result) in input order; result None for pre-failed records."""
    workers = cfg.workers or os.cpu_count() or 1

    def batches():
        buf: list[InputRecord] = []
        for rec in records:
            buf.append(rec)
            if len(buf) >= cfg.batch:
                yield buf
                buf = []
        if buf:
            yield buf

    def paths(batch):
        return [None if r.error else (r.path, r.key, r.labels, r.source) for r in batch]

    if workers == 1:
        _init_worker(reader, cfg.image_size, cfg.jpeg_quality, cfg.max_pixels)
        for b in batches():
            yield from zip(b, _encode_batch(paths(b)))
        return
    ctx = start_forkserver()
    window = 4 * workers
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(reader, cfg.image_size, cfg.jpeg_quality, cfg.max_pixels, storage_env()))
    try:
        pending: deque = deque()
        for b in batches():
            pending.append((b, pool.submit(_encode_batch, paths(b))))
            while len(pending) >= window:
                b0, fut = pending.popleft()
                yield from zip(b0, fut.result())
        while pending:
            b0, fut = pending.popleft()
            yield from zip(b0, fut.result())
    finally:
        # Ctrl-C or an error: drop the queued batches; waiting for the whole window first is
        # what made an interrupted run go on for a while (none is left on success)
        pool.shutdown(wait=True, cancel_futures=True)


def _clear_incomplete(store: ShardDir, mode: str) -> set:
    """Delete the shards this run redoes (overwrite: all of them; else the incomplete ones);
    returns the numbers of the complete shards that stay."""
    complete, present = _scan(store)
    if mode == "overwrite":
        for i in sorted(present):
            _delete_shard(store, i)
        complete = set()
    else:
        for i in sorted(present - complete):
            _delete_shard(store, i)  # incomplete: redone below
    return complete


def _shard_numbers(complete: set, mode: str):
    """The numbers of the shards to write, in order (an iterator)."""
    # incremental: an incomplete shard is redone under its own number (gaps are filled first);
    # extend: new shards are numbered after the last complete one.
    top = max(complete) + 1 if complete else 0
    free = [i for i in range(top) if i not in complete] if mode == "incremental" else []
    return itertools.chain(free, itertools.count(top))  # lazily: a list of 10**6 numbers cost ~80 ms a run


def _todo(records: Iterable[InputRecord], done: dict, report: ShardReport):
    """The records still to write: skips the rows of complete shards (counted in `report`) and
    marks a repeated id as a DUPLICATE_ID failure."""
    seen_keys = {k for k, _ in done}
    occurrences: Counter = Counter()
    for rec in records:
        report.inputs += 1
        ident = (rec.key, rec.path)
        n = occurrences[ident]
        occurrences[ident] += 1
        prior = done.get(ident, ())
        if n < len(prior):
            report.skipped += 1  # already a row of a complete shard
            if prior[n] not in report.resumed_shards:
                report.resumed_shards.append(prior[n])
            continue
        if rec.key in seen_keys and rec.error is None:
            rec.error = (R.DUPLICATE_ID, f"{rec.path}: id {rec.key!r} already used by an earlier input")
        seen_keys.add(rec.key)
        yield rec


def _fill_shards(results, cfg: WriterConfig, store: ShardDir, report: ShardReport, numbers, staging,
                 meta: dict, bar) -> None:
    """Put the decoded `results` (record, result) into shards, closing each when full."""
    shard: _Shard | None = None
    for rec, res in results:
        check_interrupt()  # the shard being filled is staged only: a rerun redoes it
        ok = rec.error is None and res[0] == "ok"
        # Rotate only when the next *sample* does not fit, so failed rows that follow the
        # last sample stay in its shard instead of making a shard with an empty tar.
        if ok and shard is not None and (shard.ok >= cfg.shard_size or shard.tar_bytes >= cfg.max_shard_bytes):
            _close(shard, store, report)
            shard = None
        if shard is None:
            shard = _Shard(_next_number(numbers), staging, meta, store)
        if rec.error is not None:
            shard.add_failed(rec, *rec.error)
        elif not ok:
            shard.add_failed(rec, res[1], res[2])
        else:
            shard.add_ok(rec, res[1])
        bar.update(1)
    if shard is not None:
        _close(shard, store, report)


def write_shards(records: Iterable[InputRecord], out: str | ShardDir, cfg: WriterConfig | None = None,
                 *, reader: Storage | None = None, meta: dict | None = None, log=None) -> ShardReport:
    """Write `records` as shards into `out` (a local dir, an s3:// prefix or a ShardDir). See the module doc.
    Progress (`cfg.progress`): a live bar on a terminal, else a line every 30 s through `log`."""
    cfg = cfg or WriterConfig()
    store = ShardDir(out) if isinstance(out, (str, os.PathLike)) else out
    reader = reader or Storage()
    t0 = time.time()
    report = ShardReport(out=store.url)
    if (cfg.workers or os.cpu_count() or 1) > 1:
        start_forkserver()  # boots while the store is scanned and the done inputs are read
    complete = _clear_incomplete(store, cfg.mode)
    done = _done_inputs(store, complete)
    numbers = _shard_numbers(complete, cfg.mode)
    staging = store.staging_dir()
    meta = {"image_size": cfg.image_size, "jpeg_quality": cfg.jpeg_quality, **(meta or {})}

    from dart_core.progress import progress_bar

    bar = progress_bar(desc=f"shard {store.url}", unit="img", log=log, enabled=cfg.progress)
    results = _ordered_map(_todo(records, done, report), cfg, reader)
    try:
        _fill_shards(results, cfg, store, report, numbers, staging, meta, bar)
    except Exception as e:
        from concurrent.futures.process import BrokenProcessPool
        if isinstance(e, BrokenProcessPool):
            raise ShardWriteError(f"a decoding worker died ({e}); rerun to resume") from None
        raise
    finally:
        results.close()  # stops the decoding pool now, not when the traceback is freed
        bar.close()
    import shutil

    shutil.rmtree(staging, ignore_errors=True)  # only on success: a crash leaves it for the next run to clear
    report.seconds = time.time() - t0
    report.totals = totals(store)
    return report


def _next_number(numbers) -> int:
    i = next(numbers)
    if i > F.MAX_SHARD:
        raise ShardWriteError(f"shard number {i} exceeds the format's {F.MAX_SHARD + 1} shards per split; "
                              "use a larger --shard-size or another --split")
    return i


def _close(shard: _Shard, store: ShardDir, report: ShardReport) -> None:
    report.new_shards.append(shard.finish(store))
    report.ok += shard.ok
    report.failed += sum(shard.failed.values())
    for k, v in shard.failed.items():
        report.failed_by_reason[k] = report.failed_by_reason.get(k, 0) + v
