"""Bulk inference: tag every sample of a shard and write the prediction tables (docs/annotate.md).

Per shard `S` — its id `<split>-<NNNNNN>` (dart_core.data.shard_format.shard_id), the same as in
the shard's sidecar and stats file — read whole, in order, decoded in background threads so
decoding overlaps compute:
    PRED/scores/shard=S/part.parquet   image_id, scores list<float16> (vocabulary order), file (the
                                       original file, the sample json's source.file), source (that
                                       source object as JSON: dataset, row, ...); folders written
                                       before these two columns read as NULL (sql/views.sql)
    PRED/tags/shard=S/part.parquet     image_id, class_id, class_name, score, rank, unseen,
                                       above_threshold, patches list<int16>, patch_scores list<float16>
    PRED/labels/shard=S/part.parquet   image_id, class_id, label int8 (the known ±1 labels)
    PRED/errors/shard=S/part.parquet   image_id, error (samples that could not be decoded)
    PRED/_done/S.json                  written last: the shard is finished
PRED is a local folder or an s3:// prefix (dart_core.storage). All files of a shard are staged
(under PRED/_staging/S locally, in a local temp dir for s3://) and published whole at their fixed
keys (a rename; one PUT / multipart upload on S3), then the done marker is written. Readers
(dart_core.evaluate, sql/views.sql) count only shards with a done marker, and a rerun skips
finished shards and redoes the others from scratch, overwriting the same keys, so after any
crash/rerun sequence every sample has exactly one `scores/` row.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dart_core.data.shard_format import SampleDecoder, member_names, shard_id
from dart_core.interrupt import check as check_interrupt
from dart_core.metrics import ranked_known
from dart_core.vocab import Vocabulary

TABLES = ("scores", "tags", "labels", "errors")

SCHEMAS = {
    "scores": pa.schema([("image_id", pa.string()), ("scores", pa.list_(pa.float16()))]),
    "tags": pa.schema([("image_id", pa.string()), ("class_id", pa.string()), ("class_name", pa.string()),
                       ("score", pa.float32()), ("rank", pa.int16()), ("unseen", pa.bool_()),
                       ("above_threshold", pa.bool_()), ("patches", pa.list_(pa.int16())),
                       ("patch_scores", pa.list_(pa.float16()))]),
    "labels": pa.schema([("image_id", pa.string()), ("class_id", pa.string()), ("label", pa.int8())]),
    "errors": pa.schema([("image_id", pa.string()), ("error", pa.string())]),
}
# written after the columns above in scores/: where each sample came from (the shard sample json's
# `source`), so the audit can name the user's file; older prediction folders lack them
SOURCE_FIELDS = [pa.field("file", pa.string()), pa.field("source", pa.string())]
WRITTEN_SCHEMAS = {**SCHEMAS, "scores": pa.schema(list(SCHEMAS["scores"]) + SOURCE_FIELDS)}


class AnnotateError(ValueError):
    """The run cannot proceed (missing shard, output holding another run, ...); names the item."""


@dataclass
class AnnotateConfig:
    top_m: int = 10  # tags per image (plus every class above its threshold)
    batch_size: int = 64
    num_workers: int = 1  # decoding runs in this many threads, beside the model (0: inline)
    device: str = "cpu"
    # "dart": DART's scores and refined patch selections; "zero_shot": the frozen VLP's own
    # s·cos(global, t_c) and its raw patch scores S* (the baseline DART is compared with)
    score: str = "dart"



def done_marker(pred_dir: str | Path, sid: str) -> str:
    """PRED/_done/<shard id>.json (a path or an s3:// URL), written last: the shard's tables are
    all published. Readers (dart_core.evaluate, sql/views.sql) count only shards that have one."""
    from dart_core import storage

    return storage.join(pred_dir, "_done", f"{sid}.json")


def done_shards(pred_dir: str | Path) -> list[str]:
    """The ids of the finished shards of PRED (one listing of PRED/_done/), sorted."""
    from dart_core import storage

    return [n[:-len(".json")] for n in storage.list_names(storage.join(pred_dir, "_done")) if n.endswith(".json")]


def part_url(pred_dir: str | Path, table: str, sid: str) -> str:
    """PRED/<table>/shard=<sid>/part.parquet: deterministic, so a rerun overwrites, never adds."""
    from dart_core import storage

    return storage.join(pred_dir, table, f"shard={sid}", "part.parquet")


# ---- reading a shard, tolerating bad samples ----------------------------------------------------

def shard_batches(url: str, vocab: Vocabulary, preprocess, batch_size: int, num_workers: int):
    """Batches of decoded samples of ONE shard, in order. num_workers >= 1: the shard is read and
    decoded in background threads of this process, `num_workers` decoding, a few batches ahead of
    the model, so decoding overlaps compute (PIL's decoding and resizing and torch's ops release the
    GIL). Threads, not DataLoader worker processes: those took seconds to start for every shard
    (forkserver + imports + pickling the pipeline), and Dask's daemonic workers may not fork.
    num_workers 0: read and decode inline."""
    import webdataset as wds

    from dart_core.data.reader import opened_here

    samples = wds.DataPipeline(wds.SimpleShardList([str(url)]), opened_here, wds.tarfile_to_samples())
    # strict=False: a corrupt sample becomes an error row (image None) and the shard goes on
    decode = _WithSource(SampleDecoder(vocab.ids, preprocess, strict=False))
    if num_workers <= 0:
        return _batches(map(decode, samples), batch_size)
    return _ThreadPrefetch(_decoded_batches(samples, decode, batch_size, num_workers), depth=2)


class _WithSource:
    """Picklable: decode(sample) plus the sample json's `source` object ({} when absent or unreadable)."""

    def __init__(self, decode):
        self.decode = decode

    def __call__(self, sample: dict):
        out = self.decode(sample)
        try:
            src = json.loads(sample["json"]).get("source")
        except Exception:  # noqa: BLE001 - the decoder above already recorded a bad json
            src = None
        return (*out, src if isinstance(src, dict) else {})


def _source_columns(item) -> tuple[str | None, str | None]:
    """(file, source json) of a decoded item; (None, None) for items without a source."""
    src = item[4] if len(item) > 4 else {}
    if not src:
        return None, None
    f = src.get("file")
    return (None if f is None else str(f)), json.dumps(src, sort_keys=True, default=str)


def _batches(items, batch_size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded_batches(samples, decode, batch_size: int, num_workers: int):
    """Batches of decode(sample), in order; with num_workers > 1, `num_workers` threads decode
    (at most two batches in flight)."""
    if num_workers == 1:
        yield from _batches(map(decode, samples), batch_size)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="dart-decode")
    pending: deque = deque()

    def results():
        for s in samples:
            pending.append(pool.submit(decode, s))
            if len(pending) >= 2 * batch_size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield from _batches(results(), batch_size)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _ThreadPrefetch:
    """Iterate `source` in a background thread, `depth` batches ahead. The consumer waits in short
    slices and stops on Ctrl-C (dart_core.interrupt) even while `source` has not yielded yet; the
    thread then drops `source` at its next item."""

    def __init__(self, source, depth: int = 4):
        self.source, self.depth = source, depth

    def __iter__(self):
        import queue
        import threading

        q: queue.Queue = queue.Queue(self.depth)
        done = object()
        consumer_gone = threading.Event()

        def put(item) -> bool:
            while not consumer_gone.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            it = iter(self.source)
            try:
                for item in it:
                    if not put(item):
                        return
            except BaseException as e:  # noqa: BLE001 — re-raised in the consumer
                put(e)
                return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # a generator's `finally` (e.g. a decode pool's shutdown) runs now
            put(done)

        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.2)
                except queue.Empty:
                    check_interrupt()
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            consumer_gone.set()


# ---- scoring ------------------------------------------------------------------------------------

def _write_table(rows: dict[str, list], name: str, path: Path) -> int:
    table = pa.Table.from_pydict(rows, schema=WRITTEN_SCHEMAS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table.num_rows


def annotate_shard(model, vocab: Vocabulary, url: str, pred_dir: str | Path, cfg: AnnotateConfig,
                   thresholds: np.ndarray | None = None) -> dict:
    """Score one shard and publish its four tables atomically. Returns the shard's stats."""
    from dart_core import storage

    sid = shard_id(url)
    done = done_marker(pred_dir, sid)
    try:
        return json.loads(storage.read_bytes(done)) | {"skipped": True}
    except FileNotFoundError:
        pass
    check_interrupt()  # a shard task that starts after Ctrl-C stops before starting its reader
    t0 = time.time()
    stage = _staging_dir(pred_dir, sid)
    rows = {name: {f: [] for f in WRITTEN_SCHEMAS[name].names} for name in TABLES}
    unseen = vocab.unseen_mask
    ids, names = vocab.ids, vocab.names
    C = len(vocab)
    M = min(cfg.top_m, C)
    device = torch.device(cfg.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_ok = 0
    for batch in shard_batches(url, vocab, model.backbone.preprocess, cfg.batch_size, cfg.num_workers):
        check_interrupt()  # Ctrl-C: drop this shard's staged rows; a rerun redoes the shard whole
        good = [b for b in batch if b[3] is None]
        for b in batch:
            key, err = b[2], b[3]
            if err is not None:
                rows["errors"]["image_id"].append(key)
                rows["errors"]["error"].append(err)
        if not good:
            continue
        images = torch.stack([g[0] for g in good]).to(device, non_blocking=True)
        zero_shot = cfg.score == "zero_shot"
        with torch.inference_mode(), autocast:
            out = model(images, with_priors=zero_shot)
        logits = out.zero_shot if zero_shot else out.logits
        patch_logits = out.prior_logits if zero_shot else out.patch_logits  # (B, P, C), stays on the device
        # every table carries the same float16-rounded score, so thresholds calibrated on scores/
        # and the tags' above_threshold / rank agree exactly
        scores = logits.float().cpu().numpy().astype(np.float16).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        # the whole batch at once; only the chosen tags' patches are gathered
        keys = [g[2] for g in good]
        n_ok += len(good)
        rows["scores"]["image_id"] += keys
        rows["scores"]["scores"] += list(scores.astype(np.float16))  # exact: already rounded
        for g in good:
            f, src = _source_columns(g)
            rows["scores"]["file"].append(f)
            rows["scores"]["source"].append(src)
        lab = torch.stack([g[1] for g in good]).numpy()
        lb, lc = np.nonzero(lab)  # per image, in vocabulary order
        rows["labels"]["image_id"] += [keys[b] for b in lb]
        rows["labels"]["class_id"] += [ids[c] for c in lc]
        rows["labels"]["label"] += lab[lb, lc].tolist()
        # each image's top-M, and every class above its threshold, best first: by position j in
        # `order` (rank j + 1)
        chosen = np.zeros(order.shape, dtype=bool)
        chosen[:, :M] = True
        if thresholds is not None:
            chosen |= np.take_along_axis(scores >= np.nan_to_num(thresholds, nan=np.inf), order, axis=1)
        tb, j = np.nonzero(chosen)
        tc = order[tb, j]
        tag_scores = scores[tb, tc]
        patches, patch_scores = tag_patches(out, patch_logits, tb, tc, zero_shot)
        t = rows["tags"]
        t["image_id"] += [keys[b] for b in tb]
        t["class_id"] += [ids[c] for c in tc]
        t["class_name"] += [names[c] for c in tc]
        t["score"] += tag_scores.tolist()
        t["rank"] += (j + 1).tolist()
        t["unseen"] += unseen[tc].tolist()
        if thresholds is None:
            t["above_threshold"] += [None] * len(tc)
        else:
            th = thresholds[tc]
            t["above_threshold"] += [None if np.isnan(x) else bool(a) for x, a in zip(th, tag_scores >= th)]
        t["patches"] += list(patches.astype(np.int16))
        t["patch_scores"] += list(patch_scores.astype(np.float16))
    counts = {name: _write_table(rows[name], name, stage / name / "part.parquet") for name in TABLES}
    for name in TABLES:  # publish each part whole at its fixed key: a rename locally, one upload on S3
        check_interrupt()
        storage.move_file(stage / name / "part.parquet", part_url(pred_dir, name, sid))
    stats = {"shard": sid, "url": str(url), "images": n_ok, "errors": counts["errors"], "tags": counts["tags"],
             "seconds": round(time.time() - t0, 3)}
    storage.write_bytes(done, json.dumps(stats).encode())  # last: the shard is finished
    _drop_staging(pred_dir, stage)
    return stats


def tag_patches(out, patch_logits: torch.Tensor, tb: np.ndarray, tc: np.ndarray,
                zero_shot: bool) -> tuple[np.ndarray, np.ndarray]:
    """The chosen tags' (image tb, class tc) top-K patches, best first, and their patch scores,
    (tags, K) each. Chosen on the model's device: only these leave it, not the (B, P, C) patch
    scores (381 MB per batch of 64 at 7,586 classes)."""
    dev = patch_logits.device
    b, c = torch.from_numpy(tb).to(dev), torch.from_numpy(tc).to(dev)
    if zero_shot:  # the VLP's own evidence: each tag's top-K patches by S*
        patches = patch_logits[b, :, c].topk(out.topk.shape[2], dim=1).indices
    else:
        patches = out.topk[b, c]  # the patches DART aggregated for the class
    scores = patch_logits[b.unsqueeze(1), patches, c.unsqueeze(1)]
    return patches.cpu().numpy(), scores.float().cpu().numpy()


def _staging_dir(pred_dir: str | Path, sid: str) -> Path:
    """Where a shard's tables are written before they are published, emptied first: PRED/_staging/S
    for a local PRED (same file system: publishing is a rename), a local temp dir for s3://."""
    from dart_core import storage

    if storage.is_s3(pred_dir):
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"dart-annotate-{sid}-"))  # a killed run leaves it in the temp dir
    stage = Path(pred_dir) / "_staging" / sid
    shutil.rmtree(stage, ignore_errors=True)
    return stage


def _drop_staging(pred_dir: str | Path, stage: Path) -> None:
    from dart_core import storage

    shutil.rmtree(stage, ignore_errors=True)
    if not storage.is_s3(pred_dir):
        try:
            stage.parent.rmdir()  # _staging/ goes when the last shard in flight is done
        except OSError:
            pass


# ---- run-level files ----------------------------------------------------------------------------

def vocab_table(vocab: Vocabulary, thresholds: np.ndarray | None) -> pa.Table:
    return pa.table({
        "class_index": pa.array(range(len(vocab)), pa.int32()),
        "class_id": list(vocab.ids), "class_name": list(vocab.names), "split": list(vocab.splits),
        "unseen": pa.array(vocab.unseen_mask),
        "threshold": pa.array(thresholds if thresholds is not None else [None] * len(vocab), pa.float32()),
    })


# the inputs that make a run's predictions comparable, as named in messages
IDENTITY = {"checkpoint_hash": "checkpoint", "vocab_hash": "vocabulary", "crg_hash": "CRG"}


def identity_differences(old: dict, new: dict) -> str:
    """'its CRG was 9b0d4e77, this run's is 3f2a9c1e' for each identity input that differs ('' if
    none); hashes cut to the shortest prefix (8 characters at least) that tells the two apart."""
    parts = []
    for key, what in IDENTITY.items():
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        n = 8
        while a and b and n < max(len(a), len(b)) and a[:n] == b[:n]:
            n += 4
        parts.append(f"its {what} was {a[:n] if a else 'none'}, this run's is {b[:n] if b else 'none'}")
    return "; ".join(parts)


@contextmanager
def output_lock(pred_dir: str | Path):
    """Hold PRED for one run at a time; a dead run never blocks the next for long, a live one always
    does. Local: an flock, released by the kernel however the holder ends (error, Ctrl-C, kill -9).
    s3://: a lease object PRED/.lock (see `_s3_lease`)."""
    import os
    import socket

    from dart_core import storage

    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    if storage.is_s3(pred_dir):
        with _s3_lease(storage.join(pred_dir, ".lock"), holder):
            yield
        return
    import fcntl

    pred_dir = Path(pred_dir)
    pred_dir.mkdir(parents=True, exist_ok=True)
    with open(pred_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise _locked(pred_dir, f.read().strip()) from None
        f.seek(0)
        f.truncate()
        f.write(holder + "\n")  # for that message only
        f.flush()
        yield


def _locked(pred_dir, holder: str) -> AnnotateError:
    return AnnotateError(f"{pred_dir} is being written by another run ({holder or 'another process'}); wait for "
                         "it to end or use another --out")


def lock_ttl() -> float:
    """Seconds an s3:// lease lives without a heartbeat (DART_S3_LOCK_TTL, default 120)."""
    import os

    return float(os.environ.get("DART_S3_LOCK_TTL", "120"))


@contextmanager
def _s3_lease(url: str, holder: str):
    """A lease on an s3:// PRED: the object PRED/.lock, created with a conditional PUT
    (If-None-Match: *, so of two runs starting at once exactly one gets it), renewed every TTL/4 by
    a heartbeat thread (PUT If-Match: the lease's ETag), deleted at the end. A lease not renewed for
    DART_S3_LOCK_TTL seconds (its holder was killed) is taken over with a PUT If-Match on the stale
    ETag, so again only one run wins. Ages are measured on the server's clock (its Date header
    minus the object's Last-Modified). Needs conditional writes: AWS S3 (since 2024), MinIO, moto."""
    import threading
    import uuid
    from email.utils import parsedate_to_datetime

    from botocore.exceptions import ClientError

    from dart_core import storage

    ttl = lock_ttl()
    bucket, key = storage.split_s3(url)
    body = json.dumps({"holder": holder, "token": uuid.uuid4().hex, "ttl_s": ttl}).encode()
    client = storage.s3_client()

    def refused(e: ClientError) -> bool:  # another writer won the conditional PUT
        return storage._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    try:
        etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except ClientError as e:
        if not refused(e):
            raise
        try:
            head = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e2:
            if storage._missing(e2):  # released in between: try once more, conditionally
                head = None
            else:
                raise
        if head is None:
            try:
                etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            except ClientError as e3:
                if refused(e3):
                    raise _locked(url.rsplit("/", 1)[0], "another process") from None
                raise
        else:
            try:
                old = json.loads(head["Body"].read())
            except ValueError:
                old = {}
            date = head["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
            now = parsedate_to_datetime(date) if date else None
            age = (now - head["LastModified"]).total_seconds() if now else 0.0
            if age <= float(old.get("ttl_s", ttl)):
                raise _locked(url.rsplit("/", 1)[0], str(old.get("holder", ""))) from None
            try:  # stale: its holder stopped renewing it; take it over, exactly one taker wins
                etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=head["ETag"])["ETag"]
            except ClientError as e3:
                if refused(e3) or storage._missing(e3):
                    raise _locked(url.rsplit("/", 1)[0], "another process") from None
                raise
    state = {"etag": etag, "lost": False}
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(ttl / 4):
            try:
                state["etag"] = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=state["etag"])["ETag"]
            except ClientError as e:
                if refused(e) or storage._missing(e):
                    state["lost"] = True
                    return
            except Exception:  # noqa: BLE001 - a network blip: the next beat tries again
                pass

    beat = threading.Thread(target=heartbeat, name="dart-s3-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if not state["lost"]:
            try:
                if client.head_object(Bucket=bucket, Key=key)["ETag"] == state["etag"]:
                    client.delete_object(Bucket=bucket, Key=key)
            except ClientError:
                pass
        else:
            import warnings

            warnings.warn(f"{url}: this run's lease was taken over by another run while it ran", stacklevel=2)


def _remove_outputs(pred_dir: str | Path) -> None:
    """Delete a PRED's predictions: the done markers first (readers stop counting those shards),
    then the tables, vocab/ and run.json."""
    from dart_core import storage

    names = ("_done", *TABLES, "vocab", "_staging")
    if storage.is_s3(pred_dir):
        for name in names:
            for o in storage.list_objects(storage.join(pred_dir, name)):
                storage.delete(o.url)
    else:
        for name in names:
            shutil.rmtree(Path(pred_dir) / name, ignore_errors=True)
    storage.delete(storage.join(pred_dir, "run.json"))


def prepare_output(pred_dir: str | Path, run_meta: dict, vocab: Vocabulary, thresholds: np.ndarray | None,
                   mode: str = "new") -> None:
    """Claim PRED (a folder or an s3:// prefix) for this run (call it under `output_lock`). mode:
    new (refuse a folder holding another run's predictions), append (same run identity: continue /
    add shards), overwrite (delete what is there). A run.json whose run finished no shard holds no
    predictions: a run that failed or was stopped early never blocks the next, whatever its inputs were."""
    import io

    from dart_core import storage

    run_file = storage.join(pred_dir, "run.json")
    identity = {k: run_meta[k] for k in IDENTITY}
    try:
        old = json.loads(storage.read_bytes(run_file))
    except FileNotFoundError:
        old = None
    if old is not None:
        differs = identity_differences(old, identity)
        if mode == "overwrite" or (differs and not done_shards(pred_dir)):
            _remove_outputs(pred_dir)
        elif differs and mode != "append":
            raise AnnotateError(f"{pred_dir} holds predictions of another run ({differs}); pass --mode overwrite "
                                "or use another --out")
        elif differs:
            raise AnnotateError(f"{pred_dir}: cannot append to the predictions there ({differs}): the tables "
                                "would mix two models")
    elif any(d in TABLES or d == "_done" for d in storage.list_dirs(pred_dir)):
        if mode != "overwrite":
            raise AnnotateError(f"{pred_dir} already holds prediction tables but no run.json; use --mode overwrite")
        _remove_outputs(pred_dir)
    buf = io.BytesIO()
    pq.write_table(vocab_table(vocab, thresholds), buf)
    storage.write_bytes(storage.join(pred_dir, "vocab", "vocab.parquet"), buf.getvalue())
    storage.write_bytes(run_file, json.dumps(run_meta, indent=1).encode())


def file_hash(path: str | Path | None) -> str | None:
    import hashlib

    if path is None:
        return None
    from dart_core import storage

    h = hashlib.sha256()
    with storage.open_read(path) as f:  # local or s3://
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---- thresholds -------------------------------------------------------------------------------------

def calibrate_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the score threshold maximising F1 on a labelled split (unknown labels ignored).

    Returns (thresholds, best F1); NaN for a class without a positive. The threshold is the score of
    the last positive kept, so `score >= threshold` reproduces the best F1 exactly."""
    N, C = scores.shape
    th = np.full(C, np.nan)
    best = np.full(C, np.nan)
    for c in range(C):
        s_sorted, hits, n_pos = ranked_known(scores, labels, c)
        if n_pos == 0:
            continue
        tp = np.cumsum(hits)
        k = np.arange(1, len(s_sorted) + 1)
        # cut only where the next score differs (a threshold cannot split tied scores)
        cut = np.r_[s_sorted[1:] != s_sorted[:-1], True]
        f1 = np.where(cut, 2 * tp / (k + n_pos), -1.0)
        i = int(np.argmax(f1))
        th[c], best[c] = s_sorted[i], f1[i]
    return th, best


def read_thresholds(path: str | Path, vocab: Vocabulary) -> np.ndarray:
    """thresholds.csv (class_id,threshold[,f1]) -> (C,) array aligned with `vocab` (NaN where absent)."""
    import csv

    th = np.full(len(vocab), np.nan)
    index = {cid: i for i, cid in enumerate(vocab.ids)}
    import io

    from dart_core import storage

    with io.StringIO(storage.read_bytes(path).decode("utf-8-sig"), newline="") as f:  # local or s3://
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            cid = row.get("class_id", "")
            if cid not in index:
                continue  # a class of another vocabulary version: not used here
            try:
                th[index[cid]] = float(row["threshold"]) if row["threshold"] not in ("", "nan") else np.nan
            except (KeyError, ValueError):
                raise AnnotateError(f"{path} line {lineno}: threshold {row.get('threshold')!r} is not a number") from None
    return th


def read_shard_image(url: str, key: str) -> bytes:
    """The jpg bytes of one sample of a shard, local or s3:// (for the audit report's thumbnails)."""
    from dart_core import storage

    jpg = member_names(key)[0]
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if m.name == jpg:
                return tar.extractfile(m).read()
    raise KeyError(f"{key} not in {url}")
