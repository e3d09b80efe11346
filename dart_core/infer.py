"""Bulk inference: tag every sample of a shard and write the prediction tables (docs/annotate.md).

Per shard `S` — its id `<split>-<NNNNNN>` (dart_core.data.shard_format.shard_id), the same as in
the shard's sidecar and stats file — read whole, in order, by one DataLoader worker so decoding
overlaps compute:
    PRED/scores/shard=S/part.parquet   image_id, scores list<float16> (vocabulary order)
    PRED/tags/shard=S/part.parquet     image_id, class_id, class_name, score, rank, unseen,
                                       above_threshold, patches list<int16>, patch_scores list<float16>
    PRED/labels/shard=S/part.parquet   image_id, class_id, label int8 (the known ±1 labels)
    PRED/errors/shard=S/part.parquet   image_id, error (samples that could not be decoded)
    PRED/_done/S.json                  written last: the shard is finished
All files of a shard are staged under PRED/_staging/S and renamed into place, then the done
marker is written; a rerun skips finished shards and redoes the others from scratch, so after any
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


class AnnotateError(ValueError):
    """The run cannot proceed (missing shard, output holding another run, ...); names the item."""


@dataclass
class AnnotateConfig:
    top_m: int = 10  # tags per image (plus every class above its threshold)
    batch_size: int = 64
    num_workers: int = 1  # decoding runs in this many DataLoader workers, beside the model
    device: str = "cpu"
    # "dart": DART's scores and refined patch selections; "zero_shot": the frozen VLP's own
    # s·cos(global, t_c) and its raw patch scores S* (the baseline DART is compared with)
    score: str = "dart"



def done_marker(pred_dir: str | Path, sid: str) -> Path:
    """PRED/_done/<shard id>.json, written last: the shard's tables are all published."""
    return Path(pred_dir) / "_done" / f"{sid}.json"


# ---- reading a shard, tolerating bad samples ----------------------------------------------------

def _collate(batch):
    return batch  # decoded per sample in the worker; the model step stacks the good ones


def shard_batches(url: str, vocab: Vocabulary, preprocess, batch_size: int, num_workers: int):
    """Batches of decoded samples of ONE shard, in order; decoding in `num_workers` workers."""
    import webdataset as wds

    from dart_core.data.reader import opened_here

    # strict=False: a corrupt sample becomes an error row (image None) and the shard goes on
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(url)]),
        opened_here,
        wds.tarfile_to_samples(),
        wds.map(SampleDecoder(vocab.ids, preprocess, strict=False)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    if num_workers <= 0:
        return pipeline
    import multiprocessing

    if multiprocessing.current_process().daemon:
        # a Dask/multiprocessing worker may not fork children: prefetch in a thread instead
        # (PIL decoding and resizing release the GIL, so this still overlaps the model step)
        return _ThreadPrefetch(pipeline, depth=4)
    # one shard -> only one worker can read it: more would idle, so cap at 1 (overlap, not split)
    # forkserver: shard tasks run in threads, and fork() from a threaded process can deadlock
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=1, prefetch_factor=4,
                                         multiprocessing_context="forkserver")
    # waited on through a thread: the worker takes seconds to start, and Ctrl-C must not wait for it
    return _ThreadPrefetch(loader, depth=1)


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
            try:
                for item in self.source:
                    if not put(item):
                        return
            except BaseException as e:  # noqa: BLE001 — re-raised in the consumer
                put(e)
                return
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
    table = pa.Table.from_pydict(rows, schema=SCHEMAS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table.num_rows


def annotate_shard(model, vocab: Vocabulary, url: str, pred_dir: str | Path, cfg: AnnotateConfig,
                   thresholds: np.ndarray | None = None) -> dict:
    """Score one shard and publish its four tables atomically. Returns the shard's stats."""
    pred_dir = Path(pred_dir)
    sid = shard_id(url)
    done = done_marker(pred_dir, sid)
    if done.exists():
        return json.loads(done.read_text()) | {"skipped": True}
    check_interrupt()  # a shard task that starts after Ctrl-C stops before starting its reader
    t0 = time.time()
    stage = pred_dir / "_staging" / sid
    shutil.rmtree(stage, ignore_errors=True)
    rows = {name: {f: [] for f in SCHEMAS[name].names} for name in TABLES}
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
        for _, _, key, err in batch:
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
        patch_logits = (out.prior_logits if zero_shot else out.patch_logits).float().cpu()
        if zero_shot:
            topk = patch_logits.topk(out.topk.shape[2], dim=1).indices.transpose(1, 2)
        else:
            topk = out.topk.cpu()  # (B, C, K), best patch first
        # every table carries the same float16-rounded score, so thresholds calibrated on scores/
        # and the tags' above_threshold / rank agree exactly
        scores = logits.float().cpu().numpy().astype(np.float16).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        for b, (_, labels, key, _) in enumerate(good):
            n_ok += 1
            rows["scores"]["image_id"].append(key)
            rows["scores"]["scores"].append(scores[b].astype(np.float16))  # exact: already rounded
            lab = labels.numpy()
            for c in np.flatnonzero(lab):
                rows["labels"]["image_id"].append(key)
                rows["labels"]["class_id"].append(ids[c])
                rows["labels"]["label"].append(int(lab[c]))
            chosen = list(order[b, :M])
            if thresholds is not None:  # ... and every class above its threshold, best first
                above = scores[b] >= np.nan_to_num(thresholds, nan=np.inf)
                chosen += [c for c in order[b, M:] if above[c]]
            ranks = np.empty(C, dtype=np.int64)
            ranks[order[b]] = np.arange(1, C + 1)
            for c in chosen:
                p = topk[b, c]
                t = rows["tags"]
                t["image_id"].append(key)
                t["class_id"].append(ids[c])
                t["class_name"].append(names[c])
                t["score"].append(float(scores[b, c]))
                t["rank"].append(int(ranks[c]))
                t["unseen"].append(bool(unseen[c]))
                t["above_threshold"].append(None if thresholds is None or np.isnan(thresholds[c])
                                            else bool(scores[b, c] >= thresholds[c]))
                t["patches"].append(p.numpy().astype(np.int16))
                t["patch_scores"].append(patch_logits[b, p, c].numpy().astype(np.float16))
    counts = {name: _write_table(rows[name], name, stage / name / "part.parquet") for name in TABLES}
    for name in TABLES:  # publish: rename each staged file into its partition
        final = pred_dir / name / f"shard={sid}" / "part.parquet"
        final.parent.mkdir(parents=True, exist_ok=True)
        (stage / name / "part.parquet").replace(final)
    stats = {"shard": sid, "url": str(url), "images": n_ok, "errors": counts["errors"], "tags": counts["tags"],
             "seconds": round(time.time() - t0, 3)}
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(done)  # last: the shard is finished
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.parent.rmdir()  # _staging/ goes when the last shard in flight is done
    except OSError:
        pass
    return stats


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
    """Hold PRED for one run at a time. An flock, so the kernel releases it however the holder
    ends (error, Ctrl-C, kill -9): a dead run never blocks the next, a live one always does."""
    import fcntl
    import os
    import socket

    pred_dir = Path(pred_dir)
    pred_dir.mkdir(parents=True, exist_ok=True)
    with open(pred_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise AnnotateError(f"{pred_dir} is being written by another run ({holder}); wait for it to end "
                                "or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # for that message only
        f.flush()
        yield


def prepare_output(pred_dir: str | Path, run_meta: dict, vocab: Vocabulary, thresholds: np.ndarray | None,
                   mode: str = "new") -> None:
    """Claim PRED for this run (call it under `output_lock`). mode: new (refuse a folder holding
    another run's predictions), append (same run identity: continue / add shards), overwrite
    (delete what is there). A run.json whose run finished no shard holds no predictions: a run
    that failed or was stopped early never blocks the next, whatever its inputs were."""
    pred_dir = Path(pred_dir)
    run_file = pred_dir / "run.json"
    identity = {k: run_meta[k] for k in IDENTITY}
    if run_file.exists():
        old = json.loads(run_file.read_text())
        differs = identity_differences(old, identity)
        finished_any = any((pred_dir / "_done").glob("*.json"))
        if mode == "overwrite" or (differs and not finished_any):
            for name in (*TABLES, "vocab", "_done", "_staging"):
                shutil.rmtree(pred_dir / name, ignore_errors=True)
            run_file.unlink()
        elif differs and mode != "append":
            raise AnnotateError(f"{pred_dir} holds predictions of another run ({differs}); pass --mode overwrite "
                                "or use another --out")
        elif differs:
            raise AnnotateError(f"{pred_dir}: cannot append to the predictions there ({differs}): the tables "
                                "would mix two models")
    elif pred_dir.exists() and any(p.name in TABLES for p in pred_dir.iterdir()) and mode != "overwrite":
        raise AnnotateError(f"{pred_dir} already holds prediction tables but no run.json; use --mode overwrite")
    pred_dir.mkdir(parents=True, exist_ok=True)
    (pred_dir / "vocab").mkdir(exist_ok=True)
    pq.write_table(vocab_table(vocab, thresholds), pred_dir / "vocab" / "vocab.parquet")
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_meta, indent=1))
    tmp.replace(run_file)


def file_hash(path: str | Path | None) -> str | None:
    import hashlib

    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
    with open(path, newline="") as f:
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
