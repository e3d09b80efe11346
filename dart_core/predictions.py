"""The prediction folder PRED that `dart annotate` writes (docs/annotate.md): the tables' schemas and
keys, the done markers, claiming PRED for a run (the lock, run.json, vocab/) and reading back what is
there. No torch here: readers (dart_core.evaluate, the audit) use it without loading a model.

    PRED/scores/shard=S/part.parquet   image_id, scores list<float16> (vocabulary order), file (the
                                       original file, the sample json's source.file), source (that
                                       source object as JSON: dataset, row, ...); folders written
                                       before these two columns read as NULL (sql/views.sql)
    PRED/tags/shard=S/part.parquet     image_id, class_id, class_name, score, rank, unseen,
                                       above_threshold, patches list<int16>, patch_scores list<float16>
    PRED/labels/shard=S/part.parquet   image_id, class_id, label int8 (the known ±1 labels)
    PRED/errors/shard=S/part.parquet   image_id, error (samples that could not be decoded)
    PRED/_done/S.json                  written last: the shard is finished
    PRED/vocab/vocab.parquet, PRED/run.json   the run's vocabulary (with thresholds) and identity
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dart_core.settings import settings
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


# ---- claiming PRED for a run: the lock, run.json, vocab/ -----------------------------------------

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
    return settings().s3_lock_ttl


def _lease_refused(e) -> bool:
    """Whether a conditional PUT's ClientError says another writer won it."""
    from dart_core import storage

    return storage._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _s3_take_over(client, url: str, bucket: str, key: str, body: bytes, ttl: float, head: dict) -> str:
    """The lease object exists (`head` is its GET): raise `_locked` while it is fresh; once stale
    (its holder stopped renewing it) take it over with PUT If-Match on its ETag, exactly one taker
    wins. Returns the new lease's ETag."""
    from email.utils import parsedate_to_datetime

    from botocore.exceptions import ClientError

    from dart_core import storage

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
        return client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=head["ETag"])["ETag"]
    except ClientError as e3:
        if _lease_refused(e3) or storage._missing(e3):
            raise _locked(url.rsplit("/", 1)[0], "another process") from None
        raise


def _s3_acquire(client, url: str, bucket: str, key: str, body: bytes, ttl: float) -> str:
    """Create the lease object with a conditional PUT (If-None-Match: *), or take over a stale one;
    raises `_locked` when another run holds it. Returns the lease's ETag."""
    from botocore.exceptions import ClientError

    from dart_core import storage

    try:
        return client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except ClientError as e:
        if not _lease_refused(e):
            raise
    try:
        head = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e2:
        if not storage._missing(e2):
            raise
        head = None  # released in between: try once more, conditionally
    if head is not None:
        return _s3_take_over(client, url, bucket, key, body, ttl, head)
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except ClientError as e3:
        if _lease_refused(e3):
            raise _locked(url.rsplit("/", 1)[0], "another process") from None
        raise


def _s3_heartbeat(client, bucket: str, key: str, body: bytes, ttl: float, state: dict, stop) -> None:
    """Renew the lease every TTL/4 (PUT If-Match: its ETag) until `stop` is set; sets
    state["lost"] and returns when another run took it over."""
    from botocore.exceptions import ClientError

    from dart_core import storage

    while not stop.wait(ttl / 4):
        try:
            state["etag"] = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=state["etag"])["ETag"]
        except ClientError as e:
            if _lease_refused(e) or storage._missing(e):
                state["lost"] = True
                return
        except Exception:  # noqa: BLE001 - a network blip: the next beat tries again
            pass


def _s3_release(client, bucket: str, key: str, etag: str) -> None:
    """Delete the lease object if it is still this run's (its ETag is the last one written)."""
    from botocore.exceptions import ClientError

    try:
        if client.head_object(Bucket=bucket, Key=key)["ETag"] == etag:
            client.delete_object(Bucket=bucket, Key=key)
    except ClientError:
        pass


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

    from dart_core import storage

    ttl = lock_ttl()
    bucket, key = storage.split_s3(url)
    body = json.dumps({"holder": holder, "token": uuid.uuid4().hex, "ttl_s": ttl}).encode()
    client = storage.s3_client()
    state = {"etag": _s3_acquire(client, url, bucket, key, body, ttl), "lost": False}
    stop = threading.Event()
    beat = threading.Thread(target=_s3_heartbeat, args=(client, bucket, key, body, ttl, state, stop),
                            name="dart-s3-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if not state["lost"]:
            _s3_release(client, bucket, key, state["etag"])
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
    """The short content hash run.json records for an input (None: no such input)."""
    from dart_core import storage

    return None if path is None else storage.sha256(path)[:16]  # local or s3://
