"""Annotate on real multi-process clusters — `dask scheduler` and two `dask worker` programs, or a
Ray head with two worker processes — with shards and predictions on the loopback S3 server; one
worker is killed with SIGKILL mid-run, and every sample still ends with exactly one `scores/` row."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dart_core import storage
from tests.annotate_fixtures import make_shards, world  # noqa: F401
from tests.conftest import REPO
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

DASK = str(Path(sys.executable).with_name("dask"))


def upload_tree(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.upload_file(p, storage.join(url, p.relative_to(local).as_posix()))


def done_markers(pred: str) -> list[str]:
    return [n for n in storage.list_names(storage.join(pred, "_done")) if n.endswith(".json")]


def scores_rows_per_image(pred: str) -> dict[str, int]:
    """image_id -> rows over every `scores/` part in PRED, finished shard or not."""
    counts: dict[str, int] = {}
    for o in storage.list_objects(storage.join(pred, "scores")):
        if o.key.endswith(".parquet"):
            for k in storage.read_parquet_bytes(storage.read_bytes(o.url), ["image_id"]).column("image_id").to_pylist():
                counts[k] = counts.get(k, 0) + 1
    return counts


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Cluster:
    """A scheduler and `n` single-process, single-thread workers, each in its own session so that
    killing one kills its nanny too (a nanny would restart the worker it watches)."""

    def __init__(self, tmp: Path, n: int, env: dict):
        self.file = tmp / "scheduler.json"
        common = dict(env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "dask.log", "ab"),
                      start_new_session=True)
        self.scheduler = subprocess.Popen([DASK, "scheduler", "--scheduler-file", str(self.file), "--port", "0",
                                           "--no-dashboard", "--host", "127.0.0.1"], **common)
        wait_for(self.file.exists, 60, "the scheduler file")
        self.address = json.loads(self.file.read_text())["address"]
        self.workers = [subprocess.Popen([DASK, "worker", "--scheduler-file", str(self.file), "--nworkers", "1",
                                          "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                                          "--memory-limit", "0"], **common) for _ in range(n)]
        from distributed import Client

        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(n, timeout=120)

    def kill_worker(self, i: int) -> None:
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


@pytest.mark.slow
def test_dask_cluster_kill_9_one_worker_every_sample_once(world, tmp_path, s3_bucket, prefect_harness):
    keys = make_shards(tmp_path / "shards" / "val", n_shards=8, per_shard=6)
    shards = f"s3://{s3_bucket}/shards"
    upload_tree(tmp_path / "shards", shards)
    out = f"s3://{s3_bucket}/pred"  # nothing shared but the S3 server
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cluster = Cluster(tmp_path, 2, env)
    try:
        cmd = [sys.executable, "-m", "flows.cli", "annotate", "--checkpoint", world["checkpoint"], "--shards",
               f"{shards}/val", "--classes", world["classes"], "--out", out, "--batch-size", "2",
               "--task-runner", "dask", "--dask-address", cluster.address]
        # mid-run: the killed worker's shard is lost with it and goes to the other worker
        code = run_until_killed_and_done(cmd, env, out, lambda: cluster.kill_worker(0))
        print(f"flow exit {code} after the kill")  # 0: Dask re-ran the lost shard; else a rerun did
    finally:
        cluster.close()
    rows = scores_rows_per_image(out)
    assert sorted(rows) == sorted(keys) and set(rows.values()) == {1}
    assert len(done_markers(out)) == 8


def run_until_killed_and_done(cmd: list[str], env: dict, out: str, kill) -> int:
    """Run `dart annotate`, call `kill()` once the first shard is done, let it finish (rerun it in
    append mode if it failed); returns the first run's exit status."""
    run = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(done_markers(out)) >= 1 or run.poll() is not None, 600,
             "the first finished shard")
    assert run.poll() is None, run.stdout.read()[-3000:]
    kill()
    output, _ = run.communicate(timeout=600)
    if run.returncode != 0:
        r = subprocess.run(cmd + ["--mode", "append"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (output + r.stdout + r.stderr)[-3000:]
    return run.returncode


def ray_task_workers() -> list:
    """Ray worker processes (process title `ray::<task>`) busy with an annotate task."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::") and "IDLE" not in title and "annotate" in title:
            out.append(p)
    return out


@pytest.mark.slow
def test_ray_cluster_kill_9_one_worker_every_sample_once(world, tmp_path, s3_bucket, prefect_harness):
    import tempfile

    keys = make_shards(tmp_path / "shards" / "val", n_shards=8, per_shard=6)
    shards = f"s3://{s3_bucket}/shards"
    upload_tree(tmp_path / "shards", shards)
    out = f"s3://{s3_bucket}/pred"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    from tests.conftest import free_port

    port = free_port()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--object-store-memory", str(200 * 2**20), "--temp-dir", ray_tmp,
                             "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ray.log", "ab"),
                            start_new_session=True)
    killed = []

    def kill_one_busy_worker():
        wait_for(lambda: bool(ray_task_workers()), 120, "a Ray worker running a shard")
        victim = ray_task_workers()[0]
        killed.append(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)

    try:
        cmd = [sys.executable, "-m", "flows.cli", "annotate", "--checkpoint", world["checkpoint"], "--shards",
               f"{shards}/val", "--classes", world["classes"], "--out", out, "--batch-size", "2",
               "--task-runner", "ray", "--dask-address", f"127.0.0.1:{port}"]
        code = run_until_killed_and_done(cmd, env, out, kill_one_busy_worker)
        print(f"flow exit {code} after killing Ray worker {killed}")
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
    assert killed
    rows = scores_rows_per_image(out)
    assert sorted(rows) == sorted(keys) and set(rows.values()) == {1}
    assert len(done_markers(out)) == 8
