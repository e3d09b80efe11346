"""Bulk inference: tag every sample of a shard and write the prediction tables (docs/annotate.md).

Per shard `S` — its id `<split>-<NNNNNN>` (dart_core.data.shard_format.shard_id), the same as in
the shard's sidecar and stats file — read whole, in order, decoded in background threads so
decoding overlaps compute, into PRED/<table>/shard=S/part.parquet for the tables scores, tags,
labels and errors, then PRED/_done/S.json, written last: the shard is finished (the folder's
layout and schemas: dart_core.predictions).
PRED is a local folder or an s3:// prefix (dart_core.storage). All files of a shard are staged
(under PRED/_staging/S locally, in a local temp dir for s3://) and published whole at their fixed
keys (a rename; one PUT / multipart upload on S3), then the done marker is written. Readers
(dart_core.evaluate, sql/views.sql) count only shards with a done marker, and a rerun skips
finished shards and redoes the others from scratch, overwriting the same keys, so after any
crash/rerun sequence every sample has exactly one `scores/` row.

The prediction folder (schemas, keys, claiming it for a run) lives in dart_core.predictions and the
thresholds in dart_core.thresholds; their names are re-exported here, where callers import them.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dart_core.data.shard_format import SampleDecoder, shard_id
from dart_core.interrupt import check as check_interrupt
from dart_core.options.annotate import AnnotateOptions
from dart_core.predictions import TABLES, WRITTEN_SCHEMAS, AnnotateError, done_marker, file_hash, part_url
from dart_core.vocab import Vocabulary


# ---- the model of this process ------------------------------------------------------------------

_models: dict = {}
_models_lock = threading.Lock()


def load_annotator(options: AnnotateOptions, crg: str | None) -> tuple:
    """(model, vocab) for `options` in this process: loaded by the first shard task, reused by the
    next ones (threads of this process, or the tasks a long-lived Dask worker runs, run after run).
    Keyed by the files' contents, not only their paths: a checkpoint, vocabulary or CRG rewritten in
    place is loaded anew. One model per device is kept: a worker that moves to another model frees
    the last one. `crg`: the CRG to use (the run's extended copy of options.crg)."""
    from dart_core.backbone import file_sha256
    from dart_core.checkpoint import check_vocabulary, load_model, read_checkpoint
    from dart_core.crg.graph import CRG

    checkpoint, classes = options.checkpoint, options.classes
    # file_sha256 is memoised per (path, size, mtime): the checkpoint is hashed once per version
    ck = file_sha256(checkpoint) if Path(checkpoint).is_file() else None  # (missing: read_checkpoint says so)
    key = (checkpoint, ck, classes, file_hash(classes), crg, file_hash(crg), options.device, options.mm_candidates)
    with _models_lock:
        if key not in _models:
            # one model per device: threads placed on different GPUs each keep theirs
            for old in [k for k in _models if k[6] == options.device]:
                del _models[old]
            vocab = Vocabulary.read_csv(classes)
            doc = read_checkpoint(checkpoint)
            check_vocabulary(doc, vocab, checkpoint)
            model, _ = load_model(checkpoint, device=options.device, doc=doc)
            edges = CRG.read(crg).edge_index(vocab) if crg else None
            model.set_classes(list(vocab.names), edges)
            model.mm_candidates = options.mm_candidates
            model.eval()
            _models[key] = (model, vocab)
        return _models[key]


def resolve_shards(shards: str | list[str]) -> list[str]:
    """A folder / s3 prefix of shards (all complete ones below it, one level of split folders
    included) or an explicit list; a named shard that does not exist is an error."""
    from dart_core import storage
    from dart_core.data.reader import list_shards

    if isinstance(shards, (list, tuple)):
        for s in shards:
            if not storage.exists(s):
                raise AnnotateError(f"shard {s} does not exist")
        return list(shards)
    if str(shards).endswith(".tar"):
        if not storage.exists(shards):
            raise AnnotateError(f"shard {shards} does not exist")
        return [shards]
    found = list_shards(shards)
    if not found:
        for sub in storage.list_dirs(shards):
            found += list_shards(storage.join(shards, sub))
    if not found:
        raise AnnotateError(f"no complete shards under {shards}")
    return found


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


def annotate_shard(model, vocab: Vocabulary, url: str, pred_dir: str | Path, options: AnnotateOptions,
                   thresholds: np.ndarray | None = None) -> dict:
    """Score one shard and publish its four tables atomically. Returns the shard's stats. Reads
    options.batch_size, top_m, device, decode_threads (None: 1) and score."""
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
    rows = _ShardRows(vocab, options.top_m, thresholds)
    device = torch.device(options.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    zero_shot = options.score == "zero_shot"
    threads = 1 if options.decode_threads is None else options.decode_threads
    for batch in shard_batches(url, vocab, model.backbone.preprocess, options.batch_size, threads):
        check_interrupt()  # Ctrl-C: drop this shard's staged rows; a rerun redoes the shard whole
        good = rows.add_errors(batch)
        if not good:
            continue
        images = torch.stack([g[0] for g in good]).to(device, non_blocking=True)
        with torch.inference_mode(), autocast:
            out = model(images, with_priors=zero_shot)
        rows.add_batch(good, out, zero_shot)
    counts = {name: _write_table(rows.rows[name], name, stage / name / "part.parquet") for name in TABLES}
    for name in TABLES:  # publish each part whole at its fixed key: a rename locally, one upload on S3
        check_interrupt()
        storage.move_file(stage / name / "part.parquet", part_url(pred_dir, name, sid))
    stats = {"shard": sid, "url": str(url), "images": rows.images, "errors": counts["errors"],
             "tags": counts["tags"], "seconds": round(time.time() - t0, 3)}
    storage.write_bytes(done, json.dumps(stats).encode())  # last: the shard is finished
    _drop_staging(pred_dir, stage)
    return stats


class _ShardRows:
    """The rows of one shard's four tables, column by column, added batch by batch."""

    def __init__(self, vocab: Vocabulary, top_m: int, thresholds: np.ndarray | None):
        self.rows = {name: {f: [] for f in WRITTEN_SCHEMAS[name].names} for name in TABLES}
        self.ids, self.names, self.unseen = vocab.ids, vocab.names, vocab.unseen_mask
        self.top_m, self.thresholds = min(top_m, len(vocab)), thresholds
        self.images = 0  # the samples scored (the others are error rows)

    def add_errors(self, batch: list) -> list:
        """The batch's undecodable samples into errors/; the decoded ones are returned."""
        errors = self.rows["errors"]
        for b in batch:
            key, err = b[2], b[3]
            if err is not None:
                errors["image_id"].append(key)
                errors["error"].append(err)
        return [b for b in batch if b[3] is None]

    def add_batch(self, good: list, out, zero_shot: bool) -> None:
        """The model's output `out` for the decoded samples `good` into scores/, labels/ and tags/."""
        logits = out.zero_shot if zero_shot else out.logits
        patch_logits = out.prior_logits if zero_shot else out.patch_logits  # (B, P, C), stays on the device
        # every table carries the same float16-rounded score, so thresholds calibrated on scores/
        # and the tags' above_threshold / rank agree exactly
        scores = logits.float().cpu().numpy().astype(np.float16).astype(np.float32)
        keys = [g[2] for g in good]
        self.images += len(good)
        s = self.rows["scores"]
        s["image_id"] += keys
        s["scores"] += list(scores.astype(np.float16))  # exact: already rounded
        for g in good:
            f, src = _source_columns(g)
            s["file"].append(f)
            s["source"].append(src)
        lab = torch.stack([g[1] for g in good]).numpy()
        lb, lc = np.nonzero(lab)  # per image, in vocabulary order
        self.rows["labels"]["image_id"] += [keys[b] for b in lb]
        self.rows["labels"]["class_id"] += [self.ids[c] for c in lc]
        self.rows["labels"]["label"] += lab[lb, lc].tolist()
        self.add_tags(keys, scores, out, patch_logits, zero_shot)

    def add_tags(self, keys: list[str], scores: np.ndarray, out, patch_logits: torch.Tensor, zero_shot: bool) -> None:
        """Each image's top-M, and every class above its threshold, best first: by position j in
        `order` (rank j + 1); the whole batch at once, only the chosen tags' patches gathered."""
        thresholds = self.thresholds
        order = np.argsort(-scores, axis=1, kind="stable")
        chosen = np.zeros(order.shape, dtype=bool)
        chosen[:, :self.top_m] = True
        if thresholds is not None:
            chosen |= np.take_along_axis(scores >= np.nan_to_num(thresholds, nan=np.inf), order, axis=1)
        tb, j = np.nonzero(chosen)
        tc = order[tb, j]
        tag_scores = scores[tb, tc]
        patches, patch_scores = tag_patches(out, patch_logits, tb, tc, zero_shot)
        t = self.rows["tags"]
        t["image_id"] += [keys[b] for b in tb]
        t["class_id"] += [self.ids[c] for c in tc]
        t["class_name"] += [self.names[c] for c in tc]
        t["score"] += tag_scores.tolist()
        t["rank"] += (j + 1).tolist()
        t["unseen"] += self.unseen[tc].tolist()
        if thresholds is None:
            t["above_threshold"] += [None] * len(tc)
        else:
            th = thresholds[tc]
            t["above_threshold"] += [None if np.isnan(x) else bool(a) for x, a in zip(th, tag_scores >= th)]
        t["patches"] += list(patches.astype(np.int16))
        t["patch_scores"] += list(patch_scores.astype(np.float16))


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
