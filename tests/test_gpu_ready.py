"""What the first GPU run depends on, checked on the CPU: fp32 scores under bf16 autocast, no host
sync in the loss, the process-group backend, resume state read by rank 0 and broadcast, and the
device each annotate worker takes."""
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from dart_core.devices import worker_device
from dart_core.losses import loss_terms, weighted_total
from dart_core.train import backend_for
from tests.conftest import free_port
from tests.model_fixtures import NAMES, fixed_batch, tiny_clip_ckpt, tiny_model, vocab  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def trained_like(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def test_scores_are_fp32_under_bf16_autocast(tiny_model):
    """CPU bf16 autocast gives the backbone the dtypes a GPU run has; the scores stay fp32 and
    within the backbone's bf16 error of the fp32 run, not on bf16's 0.125-step grid at scale 100."""
    model = trained_like(tiny_model)
    x, _ = fixed_batch(4)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    for name in ("logits", "patch_logits", "prior_logits", "zero_shot"):
        assert getattr(out, name).dtype == torch.float32, name
    assert torch.allclose(out.logits, ref.logits, atol=0.5)
    on_bf16_grid = (out.logits.to(torch.bfloat16).float() == out.logits).float().mean()
    assert on_bf16_grid < 0.5  # fp32 values, not bf16 ones widened


class HostSyncs(TorchFunctionMode):
    """Counts the tensor operations that make a GPU wait for the host: reading a value
    (item, tolist, bool/int/float) or a shape that depends on the data (nonzero, masked_select,
    indexing with a boolean mask)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select", "unique"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        bool_index = name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.READS or bool_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_loss_makes_no_host_sync(tiny_model):
    tiny_model.train()
    x, y = fixed_batch(6)
    out = tiny_model(x)
    with HostSyncs() as syncs:
        terms = loss_terms(out, y, 0.5, tiny_model.cfg)
        loss, stats = weighted_total(terms)
        loss.backward()
    assert list(terms) == ["rank", "rank_class", "penalty", "wps"]
    assert syncs.calls == []
    assert stats.shape == (len(terms) + 1,) and torch.isclose(stats[-1], loss.detach())


def test_the_backend_follows_the_device_not_the_machine():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == backend_for("cuda:1") == "nccl"


def test_resume_state_is_read_by_rank_0_and_broadcast(tmp_path):
    """Two gloo ranks: rank 0 reads last.pt, rank 1 (whose own path does not exist) gets the same
    state — so both resume at the same step even when their views of the file differ."""
    torch.save({"step": 7}, tmp_path / "last.pt")
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        from unittest import mock
        import torch
        import dart_core.train as T
        rank, world = T.init_distributed("cpu")
        path = Path({str(tmp_path)!r}) / ("last.pt" if rank == 0 else "missing-on-this-rank.pt")
        with mock.patch.object(T, "read_checkpoint", lambda p: torch.load(p)):
            doc = T.read_resume_state(path, rank, world)
        Path({str(tmp_path)!r}, f"rank{{rank}}.json").write_text(json.dumps(doc))
        T.shutdown_distributed()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), str(script)],
                   check=True, env=env, cwd=REPO, timeout=120)
    assert (tmp_path / "rank0.json").read_text() == (tmp_path / "rank1.json").read_text() == '{"step": 7}'


def test_annotate_workers_take_one_gpu_each():
    """Plain `cuda` is placed per worker; cpu and an explicit index are kept."""
    assert worker_device("cpu", n_gpus=4) == "cpu"
    assert worker_device("cuda:3", n_gpus=4) == "cuda:3"
    assert worker_device("cuda", n_gpus=1) == "cuda:0"
    # threads of one process: a GPU each, kept by the thread
    got = {}
    together = threading.Barrier(3)  # all three alive at once, as a thread pool's workers are

    def work(i):
        got[i] = (worker_device("cuda", n_gpus=3), worker_device("cuda", n_gpus=3))
        together.wait()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a == b for a, b in got.values())
    assert sorted(a for a, _ in got.values()) == ["cuda:0", "cuda:1", "cuda:2"]
    # Dask workers named 0 and 1 (a LocalCluster's names) take GPU 0 and GPU 1
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"].items(), key=lambda kv: str(kv[1]["name"]))
        placed = [client.submit(worker_device, "cuda", 2, workers=[addr], pure=False).result() for addr, _ in workers]
    assert placed == ["cuda:0", "cuda:1"]
