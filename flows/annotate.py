"""Prefect flow `annotate`: tag every sample of every shard with a trained DART checkpoint.

One task per shard (the shard is read whole by that task), on a task runner chosen by a
parameter: `threads` (default, ThreadPoolTaskRunner), `dask` (prefect-dask: a LocalCluster, or any
`distributed` scheduler given by `dask_address`), `ray` (prefect-ray). Tasks get
paths and return small stats dicts; the model is loaded once per worker process and reused.

GPU placement: run one task per GPU — a Dask cluster with one single-threaded worker per GPU
(`dask-cuda`'s LocalCUDACluster, or `dask worker --nthreads 1` with CUDA_VISIBLE_DEVICES set per
worker) and `device=cuda`; each worker then holds one model on its own GPU.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage
from flows.retry import retry_if_transient
from flows.train import shard_sample_counts

_models: dict = {}
_models_lock = threading.Lock()


def load_for_annotation(checkpoint: str, classes_csv: str, crg: str | None, device: str, mm_candidates: int):
    """(model, vocab) for this process: loaded by the first shard task, reused by the next ones
    (threads of this process, or the tasks a long-lived Dask worker runs, run after run). Keyed by
    the files' contents, not only their paths: a checkpoint, vocabulary or CRG rewritten in place
    is loaded anew. One model is kept: a worker that moves to another model frees the last one."""
    from dart_core.backbone import file_sha256
    from dart_core.checkpoint import check_vocabulary, load_model, read_checkpoint
    from dart_core.crg.graph import CRG
    from dart_core.infer import file_hash
    from dart_core.vocab import Vocabulary

    # file_sha256 is memoised per (path, size, mtime): the checkpoint is hashed once per version
    ck = file_sha256(checkpoint) if Path(checkpoint).is_file() else None  # (missing: read_checkpoint says so)
    key = (checkpoint, ck, classes_csv, file_hash(classes_csv), crg, file_hash(crg), device, mm_candidates)
    with _models_lock:
        if key not in _models:
            # one model per device: threads placed on different GPUs each keep theirs
            for old in [k for k in _models if k[6] == device]:
                del _models[old]
            vocab = Vocabulary.read_csv(classes_csv)
            doc = read_checkpoint(checkpoint)
            check_vocabulary(doc, vocab, checkpoint)
            model, _ = load_model(checkpoint, device=device, doc=doc)
            edges = CRG.read(crg).edge_index(vocab) if crg else None
            model.set_classes(list(vocab.names), edges)
            model.mm_candidates = mm_candidates
            model.eval()
            _models[key] = (model, vocab)
        return _models[key]


@task(name="annotate-shard", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def annotate_shard_task(checkpoint: str, classes_csv: str, crg: str | None, shard_url: str, pred_dir: str,
                        cfg: dict, thresholds_csv: str | None, mm_candidates: int) -> dict:
    from dart_core.infer import AnnotateConfig, annotate_shard, read_thresholds

    from dart_core.devices import worker_device

    # plain "cuda": this worker's own GPU (its Dask worker number, or round-robin over threads)
    cfg = {**cfg, "device": worker_device(cfg.get("device", "cpu"))}
    model, vocab = load_for_annotation(checkpoint, classes_csv, crg, cfg["device"], mm_candidates)
    th = read_thresholds(thresholds_csv, vocab) if thresholds_csv else None
    return annotate_shard(model, vocab, shard_url, pred_dir, AnnotateConfig(**cfg), th)


def make_task_runner(kind: str, dask_address: str | None = None, workers: int | None = None, device: str = "cpu"):
    """The task runner for `kind`; on `cuda`, one worker per visible GPU unless `workers` says."""
    import torch

    if workers is None and device.startswith("cuda") and torch.cuda.device_count() > 0:
        workers = torch.cuda.device_count() if device == "cuda" else 1
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers or 2)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        # workers are named 0, 1, ...: dart_core.devices.worker_device gives worker i GPU i
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ValueError("--task-runner ray needs the prefect-ray package (pip install prefect-ray)") from None
        return RayTaskRunner(address=dask_address) if dask_address else RayTaskRunner()
    raise ValueError(f"unknown task runner {kind!r} (threads, dask, ray)")


def ray_gpus(task_runner: str, device: str):
    """On Ray with a CUDA device, each shard task asks Ray for one GPU (Ray then sets the task's
    CUDA_VISIBLE_DEVICES, so plain `cuda` is that GPU); elsewhere nothing."""
    import contextlib

    if task_runner != "ray" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1)


@flow(name="annotate-shards")
def _annotate_shards(checkpoint, classes_csv, crg, shards, pred_dir, cfg, thresholds_csv, mm_candidates) -> list:
    from prefect import unmapped

    from prefect.futures import as_completed

    from dart_core.progress import progress_bar

    futures = annotate_shard_task.map(unmapped(checkpoint), unmapped(classes_csv), unmapped(crg), shards,
                                      unmapped(pred_dir), unmapped(cfg), unmapped(thresholds_csv),
                                      unmapped(mm_candidates))
    sizes = shard_sample_counts(shards)
    size_of = {id(f): n for f, n in zip(futures, sizes)}
    bar = progress_bar(total=sum(sizes), desc="annotate", unit="img", log=get_run_logger().info)
    try:
        for done, f in enumerate(as_completed(futures), 1):
            r = f.result()
            if r.get("skipped"):  # finished by an earlier run: not part of this run's pace
                bar.total -= size_of[id(f)]
                bar.refresh()
            else:
                bar.update(size_of[id(f)])
            bar.set_postfix_str(f"{done}/{len(futures)} shards", refresh=False)
    finally:
        bar.close()
    return [f.result() for f in futures]


def resolve_shards(shards: str | list[str]) -> list[str]:
    """A folder / s3 prefix of shards (all complete ones below it, one level of split folders
    included) or an explicit list; a named shard that does not exist is an error."""
    from dart_core.data.reader import list_shards
    from dart_core.infer import AnnotateError

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


def add_new_classes_to_crg(crg: str, classes_csv: str, pred_dir: str, backbone: str, pretrained: str | None,
                           log, device: str = "cpu") -> str:
    """Vocabulary classes the CRG does not know get edges (dart_core.crg.extend.add_new_classes):
    mined incrementally from the LLM when an endpoint is configured (the CRG flow's mining, which
    only asks about new classes), else by text similarity for the new classes only. Returns the CRG
    path to use (a copy under PRED)."""
    from dart_core.crg.extend import add_new_classes
    from flows.crg import MineOptions, endpoint_configured, resolve_api_key, run_mining

    def mine_llm(classes: str, out: str) -> None:
        run_mining(MineOptions(classes=classes, out=out, source="llm", backbone=backbone,
                               pretrained=pretrained or "openai", estimate=False), log=log)

    mine = None
    if endpoint_configured(None, resolve_api_key(None)):  # None: OPENAI_BASE_URL, via dart_core.settings
        mine = mine_llm
    return add_new_classes(crg, classes_csv, pred_dir, backbone, pretrained, log=log, device=device, mine=mine)


@task(name="extend-crg", cache_policy=NO_CACHE)  # writes PRED/crg.json; must look at the vocabulary every time
def extend_crg_task(crg: str, classes_csv: str, pred_dir: str, backbone: str, pretrained: str | None,
                    device: str = "cpu") -> str:
    return add_new_classes_to_crg(crg, classes_csv, pred_dir, backbone, pretrained, get_run_logger().info, device)


@flow(name="annotate")
def annotate_flow(checkpoint: str, shards: str, classes_csv: str, out: str, crg: str | None = None,
                  task_runner: str = "threads", dask_address: str | None = None, workers: int | None = None,
                  batch_size: int = 64, top_m: int = 10, device: str = "cpu", mode: str = "new",
                  thresholds_csv: str | None = None, mm_candidates: int = 0, num_workers: int | None = None,
                  score: str = "dart") -> dict:
    """Score every shard; returns {"shards": n, "images": n, "errors": n, "skipped": n}."""
    from dart_core import __version__
    from dart_core.backbone import patch_grid
    from dart_core.checkpoint import check_vocabulary, read_checkpoint
    from dart_core.infer import file_hash, output_lock, prepare_output
    from dart_core.vocab import Vocabulary

    logger = get_run_logger()
    vocab = Vocabulary.read_csv(classes_csv)
    doc = read_checkpoint(checkpoint)
    check_vocabulary(doc, vocab, checkpoint)
    shard_list = resolve_shards(shards)
    with output_lock(out):  # released however the run ends: a failed run never blocks the next
        if crg:
            crg = extend_crg_task(crg, str(classes_csv), str(out), doc["backbone"]["name"],
                                  doc["backbone"]["pretrained"], device)
        beside = storage.join(str(classes_csv).rstrip("/").rsplit("/", 1)[0] if "/" in str(classes_csv) else ".",
                              "thresholds.csv")
        if thresholds_csv is None and storage.exists(beside):
            thresholds_csv = beside
        from dart_core.infer import read_thresholds

        th = read_thresholds(thresholds_csv, vocab) if thresholds_csv else None
        what = "DART" if score == "dart" else "frozen VLP zero-shot"
        meta = {"model": f"{what} on {doc['backbone']['name']}/{doc['backbone']['pretrained']}",
                "checkpoint": str(checkpoint), "checkpoint_hash": file_hash(checkpoint),
                "crg": crg, "crg_hash": file_hash(crg), "vocab_hash": vocab.hash(), "classes": len(vocab),
                "unseen_classes": int(vocab.unseen_mask.sum()), "trained_classes": len(doc["vocab"]["ids"]),
                "code_version": __version__, "shards_root": str(shards), "shards": shard_list,
                "thresholds": thresholds_csv, "top_m": top_m, "mm_candidates": mm_candidates,
                "grid": list(patch_grid(doc["backbone"]["name"])), "score": score,
                "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # shown in the audit report
        prepare_output(out, meta, vocab, th, mode)
        if score not in ("dart", "zero_shot"):
            raise ValueError(f"score must be 'dart' or 'zero_shot', not {score!r}")
        runner = make_task_runner(task_runner, dask_address, workers, device)
        if num_workers is None:  # decoding threads per shard task: a GPU eats images faster than one thread decodes
            parallel = workers or getattr(runner, "_max_workers", None) or 1
            num_workers = 1 if device == "cpu" else max(2, min(8, (os.cpu_count() or 2) // parallel))
        cfg = {"batch_size": batch_size, "top_m": top_m, "device": device, "num_workers": num_workers, "score": score}
        logger.info(f"annotating {len(shard_list)} shards with {len(vocab)} classes on the {task_runner} task runner")
        from dart_core.devices import unused_gpu_note

        note = unused_gpu_note(device)
        if note:
            logger.warning(note)
        with ray_gpus(task_runner, device):
            stats = _annotate_shards.with_options(task_runner=runner)(
                str(checkpoint), str(classes_csv), crg, shard_list, str(out), cfg, thresholds_csv, mm_candidates)
        summary = {"shards": len(stats), "images": sum(s["images"] for s in stats),
                   "errors": sum(s["errors"] for s in stats), "skipped": sum(1 for s in stats if s.get("skipped")),
                   "out": str(out)}
        storage.write_bytes(storage.join(out, "summary.json"),
                            json.dumps({"summary": summary, "shards": stats}, indent=1).encode())
        logger.info(f"annotated {summary}")
        return summary
