"""Which device a process (a training rank, an annotate worker) computes on.

Rules (README, "GPUs"): a training rank under torchrun uses cuda:LOCAL_RANK (dart_core.train.
rank_device); an annotate worker asked for plain `cuda` uses its own GPU — the one its launcher made
visible (CUDA_VISIBLE_DEVICES set per worker by dask-cuda, Ray's `num_gpus`, or by hand), else one
chosen from its Dask worker name or, for threads of one process, the GPU the fewest live threads hold.
"""
from __future__ import annotations

import threading

import torch

_thread_gpus: dict[int, int] = {}
_lock = threading.Lock()


def _dask_worker_index() -> int | None:
    """This process's Dask worker number when its name is one (LocalCluster names them 0, 1, ...)."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
    try:
        return int(name)
    except (TypeError, ValueError):
        return None


def worker_device(device: str, n_gpus: int | None = None) -> str:
    """The device this worker should use for `device`. Only plain "cuda" is placed; "cpu" and an
    explicit "cuda:N" are kept as given. `n_gpus` defaults to the GPUs this process can see."""
    if device != "cuda":
        return device
    n = torch.cuda.device_count() if n_gpus is None else n_gpus
    if n <= 1:
        return "cuda:0"
    index = _dask_worker_index()
    if index is None:
        index = _thread_gpu(n)
    return f"cuda:{index % n}"


def _thread_gpu(n: int) -> int:
    """Threads of one process: each thread keeps the GPU it was given first, a new thread gets the
    GPU that the fewest live threads hold."""
    me = threading.get_ident()
    with _lock:
        if me not in _thread_gpus:
            live = {t.ident for t in threading.enumerate()}
            for ident in [i for i in _thread_gpus if i not in live]:
                del _thread_gpus[ident]
            held = [0] * n
            for gpu in _thread_gpus.values():
                held[gpu % n] += 1
            _thread_gpus[me] = held.index(min(held))
        return _thread_gpus[me]


def unused_gpu_note(device: str) -> str | None:
    """A warning line when work is asked to run on the CPU of a machine that has a GPU."""
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        return (f"--device {device} on a machine with {torch.cuda.device_count()} CUDA device(s): "
                "running on the CPU (pass --device cuda to use them)")
    return None


def require_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one (ValueError naming --device): what a command
    checks before its flow starts. A deployment's flow run skips this: its worker is elsewhere."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is available")
