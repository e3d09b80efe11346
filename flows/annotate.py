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
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage
from dart_core.options.annotate import AnnotateOptions
from flows.retry import retry_if_transient

@task(name="annotate-shard", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def annotate_shard_task(options: AnnotateOptions, crg: str | None, thresholds: str | None, shard_url: str) -> dict:
    """`crg` and `thresholds`: the run's resolved files (the extended CRG copy, the default thresholds)."""
    from dart_core.devices import worker_device
    from dart_core.infer import annotate_shard, load_annotator
    from dart_core.thresholds import read_thresholds

    # plain "cuda": this worker's own GPU (its Dask worker number, or round-robin over threads)
    options = options.model_copy(update={"device": worker_device(options.device)})
    model, vocab = load_annotator(options, crg)
    th = read_thresholds(thresholds, vocab) if thresholds else None
    return annotate_shard(model, vocab, shard_url, options.out, options, th)


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
def _annotate_shards(options: AnnotateOptions, crg: str | None, thresholds: str | None, shards: list[str]) -> list:
    from prefect import unmapped

    from prefect.futures import as_completed

    from dart_core.data.reader import shard_sample_counts
    from dart_core.progress import progress_bar

    futures = annotate_shard_task.map(unmapped(options), unmapped(crg), unmapped(thresholds), shards)
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


def add_new_classes_to_crg(crg: str, classes_csv: str, pred_dir: str, backbone: str, pretrained: str | None,
                           log, device: str = "cpu") -> str:
    """Vocabulary classes the CRG does not know get edges (dart_core.crg.extend.add_new_classes):
    mined incrementally from the LLM when an endpoint is configured (the CRG flow's mining, which
    only asks about new classes), else by text similarity for the new classes only. Returns the CRG
    path to use (a copy under PRED)."""
    from dart_core.crg.extend import add_new_classes
    from dart_core.options.crg import MineOptions
    from flows.crg import endpoint_configured, resolve_api_key, run_mining

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


def decode_threads(options: AnnotateOptions, runner) -> int:
    """Decoding threads per shard task: a GPU eats images faster than one thread decodes."""
    if options.decode_threads is not None:
        return options.decode_threads
    parallel = options.workers or getattr(runner, "_max_workers", None) or 1
    return 1 if options.device == "cpu" else max(2, min(8, (os.cpu_count() or 2) // parallel))


@flow(name="annotate")
def annotate_flow(options: AnnotateOptions) -> dict:
    """Score every shard; returns {"shards": n, "images": n, "errors": n, "skipped": n, "out": OUT}."""
    from dart_core import __version__
    from dart_core.backbone import patch_grid
    from dart_core.checkpoint import check_vocabulary, read_checkpoint
    from dart_core.devices import unused_gpu_note
    from dart_core.infer import resolve_shards
    from dart_core.predictions import file_hash, output_lock, prepare_output
    from dart_core.thresholds import read_thresholds
    from dart_core.thresholds import default_thresholds
    from dart_core.vocab import Vocabulary

    o, logger = options, get_run_logger()
    vocab = Vocabulary.read_csv(o.classes)
    doc = read_checkpoint(o.checkpoint)
    check_vocabulary(doc, vocab, o.checkpoint)
    shard_list = resolve_shards(o.shards)
    with output_lock(o.out):  # released however the run ends: a failed run never blocks the next
        crg = None
        if o.crg:
            crg = extend_crg_task(o.crg, o.classes, o.out, doc["backbone"]["name"], doc["backbone"]["pretrained"],
                                  o.device)
        thresholds = o.thresholds or default_thresholds(o.classes)
        th = read_thresholds(thresholds, vocab) if thresholds else None
        what = "DART" if o.score == "dart" else "frozen VLP zero-shot"
        meta = {"model": f"{what} on {doc['backbone']['name']}/{doc['backbone']['pretrained']}",
                "checkpoint": o.checkpoint, "checkpoint_hash": file_hash(o.checkpoint),
                "crg": crg, "crg_hash": file_hash(crg), "vocab_hash": vocab.hash(), "classes": len(vocab),
                "unseen_classes": int(vocab.unseen_mask.sum()), "trained_classes": len(doc["vocab"]["ids"]),
                "code_version": __version__, "shards_root": o.shards, "shards": shard_list,
                "thresholds": thresholds, "top_m": o.top_m, "mm_candidates": o.mm_candidates,
                "grid": list(patch_grid(doc["backbone"]["name"])), "score": o.score,
                "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # shown in the audit report
        prepare_output(o.out, meta, vocab, th, o.mode)
        runner = make_task_runner(o.task_runner, o.dask_address, o.workers, o.device)
        run_options = o.model_copy(update={"decode_threads": decode_threads(o, runner)})
        logger.info(f"annotating {len(shard_list)} shards with {len(vocab)} classes on the {o.task_runner} task runner")
        note = unused_gpu_note(o.device)
        if note:
            logger.warning(note)
        with ray_gpus(o.task_runner, o.device):
            stats = _annotate_shards.with_options(task_runner=runner)(run_options, crg, thresholds, shard_list)
        summary = {"shards": len(stats), "images": sum(s["images"] for s in stats),
                   "errors": sum(s["errors"] for s in stats), "skipped": sum(1 for s in stats if s.get("skipped")),
                   "out": o.out}
        storage.write_bytes(storage.join(o.out, "summary.json"),
                            json.dumps({"summary": summary, "shards": stats}, indent=1).encode())
        logger.info(f"annotated {summary}")
        return summary
