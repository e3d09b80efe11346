"""The `train` flow launching torchrun itself (`dart train --nproc N`): 2 gloo ranks on CPU give the
one-process run with the doubled batch; a rank's error fails the flow with that error; a killed rank
fails it cleanly (every process gone) and a rerun resumes; Ctrl-C stops every rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tests.annotate_fixtures import COLOURS, make_shards
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

DART = str(Path(sys.executable).with_name("dart"))


def shards_and_classes(root: Path, n_shards: int = 2, per_shard: int = 4) -> tuple[str, str]:
    from dart_core.vocab import Vocabulary

    Vocabulary.from_names(list(COLOURS), unseen={"yellow"}).write_csv(root / "classes.csv")
    make_shards(root / "shards", n_shards=n_shards, per_shard=per_shard)
    return str(root / "shards"), str(root / "classes.csv")


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if '"total"' in line]


def test_flow_on_two_gloo_ranks_matches_one_process_with_the_doubled_batch(tmp_path, tiny_clip_ckpt, prefect_harness):
    """2 shards of 4 samples: each rank reads one shard, so one step of 2 × 4 sees exactly the samples
    of the one-process step of 8 (in another order; every loss term is a mean over the batch)."""
    from dart_core.checkpoint import read_checkpoint
    from dart_core.options.train import TrainOptions
    from flows.train import train_flow

    shards, classes = shards_and_classes(tmp_path)
    run = TrainOptions(shards=shards, classes=classes, out=str(tmp_path / "one"), crg_source="similarity",
                       backbone="dart-tiny-vit", pretrained=tiny_clip_ckpt, top_k_share=0.25, epochs=3, lr=1e-3,
                       val_share=0, train_overrides={"min_lr": 1e-4, "warmup_epochs": 1})
    one = train_flow(run.model_copy(update={"batch_size": 8}))
    two = train_flow(run.model_copy(update={"out": str(tmp_path / "two"), "batch_size": 4, "nproc": 2}))
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3]
    np.testing.assert_allclose([h["total"] for h in b], [h["total"] for h in a], rtol=1e-4)
    np.testing.assert_allclose([h["rank_class"] for h in b], [h["rank_class"] for h in a], rtol=1e-4)
    wa, wb = read_checkpoint(one)["state_dict"], read_checkpoint(two)["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam divides by sqrt(v): a weight whose gradient is ~0 moves by up to ~lr either way, so the
        # float-order noise of another batch order shows as ~1e-5 there after 3 steps at lr 1e-3
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=5e-5)


def test_a_rank_error_fails_the_flow_with_that_ranks_message(tmp_path, tiny_clip_ckpt, prefect_harness):
    shards, classes = shards_and_classes(tmp_path)
    (tmp_path / "crg.json").write_text(json.dumps({"classes": [{"id": "red", "name": "red"}],
                                                   "neighbors": {"red": ["unicorn"]}}))
    base = ["train", "--shards", shards, "--classes", classes, "--out", str(tmp_path / "run"), "--backbone",
            "dart-tiny-vit", "--pretrained", tiny_clip_ckpt, "--top-k-share", "0.25", "--epochs", "1", "--nproc", "2"]
    # the CRG is read by every rank: the first rank's error ends the command, as one line, exit 2
    r = CliRunner().invoke(app, base + ["--batch-size", "4", "--crg", str(tmp_path / "crg.json")])
    assert r.exit_code == 2, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unknown neighbour 'unicorn'" in err[0], r.output
    assert err[0].startswith(("error: rank 0 of 2: ", "error: rank 1 of 2: ")), err[0]
    assert "Traceback" not in r.output
    # too few samples for one global batch: said before any rank starts
    r = CliRunner().invoke(app, base + ["--batch-size", "8"])
    assert r.exit_code == 2, r.output
    assert "error: " + shards + ": 8 samples are fewer than one global batch of 16 (--batch-size 8 per process × " \
           "--nproc 2); lower --batch-size" in r.output
    # settings that cannot work on this machine name the option
    r = CliRunner().invoke(app, base + ["--batch-size", "4", "--device", "cuda"])
    assert r.exit_code == 2 and "error: --device cuda but no CUDA device is available" in r.output


def test_ranks_need_one_gpu_each():
    from flows.train import check_ranks

    check_ranks(2, "cpu")
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU; with --nproc 2 pass --device cuda"):
        check_ranks(2, "cuda:1")
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match=r"--nproc 64 with --device cuda, but \d+ CUDA device\(s\) are visible"):
            check_ranks(64, "cuda")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Train:
    """`dart train --nproc 2` as a real process; its output is read as it comes."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([DART, *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 240) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = self.text()
            if needle in t:
                return t
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {needle!r}:\n{t[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {needle!r} in {timeout} s:\n{self.text()[-4000:]}")

    def rank_pids(self) -> dict[int, int]:
        import re

        return {int(r): int(p) for r, p in re.findall(r"rank (\d)/2: pid (\d+)", self.text())}

    def torchrun_pids(self) -> list[int]:
        """The `flows.ranks torchrun` processes started by this run (its session)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().split(b"\0")
                    if b"flows.ranks" in cmd and b"torchrun" in cmd and os.getsid(int(d.name)) == self.proc.pid:
                        out.append(int(d.name))
                except (OSError, ProcessLookupError):
                    pass
        return out


@pytest.mark.slow
def test_ctrl_c_stops_all_ranks_a_killed_rank_fails_cleanly_and_a_rerun_resumes(tmp_path, tiny_clip_ckpt,
                                                                                prefect_harness):
    from prefect.settings import PREFECT_API_URL

    shards, classes = shards_and_classes(tmp_path)
    run = tmp_path / "run"
    epochs = 150  # one step per epoch (8 samples, 2 ranks × 4): last.pt at every step
    args = ["train", "--shards", shards, "--classes", classes, "--out", str(run), "--backbone", "dart-tiny-vit",
            "--pretrained", tiny_clip_ckpt, "--top-k-share", "0.25", "--epochs", str(epochs), "--batch-size", "4",
            "--val-share", "0", "--nproc", "2"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}

    # Ctrl-C: exit 130 within seconds, no rank left
    t = Train(args, env, tmp_path / "a.log")
    t.wait_for("step 10/150")
    ranks, torchrun = t.rank_pids(), t.torchrun_pids()
    assert sorted(ranks) == [0, 1] and len(torchrun) == 1
    t0 = time.time()
    os.kill(t.proc.pid, signal.SIGINT)
    assert t.proc.wait(timeout=60) == 130, t.text()[-3000:]
    assert time.time() - t0 < 30
    assert "interrupted; rerun the same command to resume" in t.text()
    assert not any(_alive(p) for p in [*ranks.values(), *torchrun])

    # kill -9 of one rank: the flow fails with that rank named, the other rank and torchrun are gone
    t = Train(args, env, tmp_path / "b.log")
    text = t.wait_for("resumed from")
    assert f"resumed from {run / 'last.pt'} at step" in text
    t.wait_for("step 40/150")  # log_every 10: a line at step 40 (past the resume point)
    ranks, torchrun = t.rank_pids(), t.torchrun_pids()
    os.kill(ranks[1], signal.SIGKILL)
    assert t.proc.wait(timeout=90) == 1, t.text()[-3000:]
    errors = [line for line in t.text().splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped; rerun the same "
                      f"command to resume from {run / 'last.pt'}"], t.text()[-3000:]
    assert "Traceback" not in t.text()
    assert not any(_alive(p) for p in [*ranks.values(), *torchrun])

    # the rerun resumes from last.pt and finishes: every step once
    t = Train(args, env, tmp_path / "c.log")
    assert t.proc.wait(timeout=300) == 0, t.text()[-3000:]
    resumed = int(t.text().split(f"resumed from {run / 'last.pt'} at step ")[1].split("/")[0])
    assert 40 <= resumed < epochs
    assert [h["step"] for h in steps(run)] == list(range(1, epochs + 1))
    assert (run / "model.pt").exists() and f"checkpoint: {run / 'model.pt'}" in t.text()
