"""Prefect flow `train`: DART on shards. The task receives the run's options and returns the checkpoint path."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from dart_core.options.train import TrainOptions
from dart_core.data.reader import count_samples
from dart_core.settings import settings


def checked_inputs(options: TrainOptions) -> int:
    """The vocabulary reads and the validation shards exist (a mistake shows before torch is even
    imported); returns the training samples, counted once from the shards' stats files."""
    from dart_core.data.reader import require_shards
    from dart_core.vocab import Vocabulary

    Vocabulary.read_csv(options.classes)
    n = count_samples(options.shards)
    if options.val_shards:
        require_shards(options.val_shards, "--val-shards")
    return n


@task(name="train-dart")
def train_task(options: TrainOptions) -> str:
    n = checked_inputs(options)
    from dart_core.train import train_from_options  # seconds of torch imports: after the checks

    return str(train_from_options(options, n, log=get_run_logger().info))


def check_ranks(nproc: int, device: str) -> None:
    """Where N > 1 ranks can run: CPU (gloo) or one GPU each (NCCL); bad settings name the option."""
    if settings().world_size > 1:
        raise ValueError(f"--nproc {nproc} inside a torchrun rank: launch either with torchrun or with --nproc, not both")
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} names one GPU; with --nproc {nproc} pass --device cuda "
                         "(rank r trains on GPU r of those CUDA_VISIBLE_DEVICES shows)")
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n < nproc:
            raise ValueError(f"--nproc {nproc} with --device cuda, but {n} CUDA device(s) are visible")


@task(name="train-dart-ranks")
def train_ranks_task(options: TrainOptions) -> str:
    """`options.nproc` ranks under torchrun (flows.ranks): their lines stream into this task's log, a
    rank's failure fails the task with that rank's error, a stop (Ctrl-C, cancel) stops every rank."""
    from flows.ranks import RanksFailedError, launch

    logger = get_run_logger()
    nproc, device = options.nproc, options.device
    check_ranks(nproc, device)
    n = checked_inputs(options)
    train_settings = options.train_settings()
    batch = train_settings["batch_size"]
    if n < batch * nproc:
        raise ValueError(f"{options.shards}: {n} samples are fewer than one global batch of {batch * nproc} "
                         f"(--batch-size {batch} per process × --nproc {nproc}); lower --batch-size")
    if train_settings["corrections"]:
        from dart_core.corrections import read as read_corrections

        read_corrections(train_settings["corrections"])  # a bad file: one error now, not one per rank
    out = Path(options.out).resolve()
    resume = out / "last.pt"
    logger.info(f"training on {nproc} processes under torchrun ({'NCCL, one GPU each' if device == 'cuda' else 'gloo'}); "
                + (f"resuming from {resume}" if resume.exists() else f"writing {out}"))
    spec = {"options": options.model_copy(update={"out": str(out)}).model_dump(), "n_samples": n}
    try:
        launch(spec, nproc, logger.info)
    except RanksFailedError as e:
        again = (f"rerun the same command to resume from {resume}" if resume.exists()
                 else "no epoch was finished: a rerun starts over")
        raise RanksFailedError(f"{e}; {again}") from None
    return str(out / "model.pt")


@flow(name="train")
def train_flow(options: TrainOptions) -> str:
    """DART on shards, in this process (nproc 1) or on `nproc` ranks under torchrun, launched and
    watched here (one per GPU with device "cuda"; gloo processes on CPU). Reruns resume from last.pt."""
    if options.nproc > 1:
        return train_ranks_task(options)
    return train_task(options)
