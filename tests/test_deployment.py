"""The way users run it: a real `prefect server`, a process work pool and worker, `prefect deploy`
from infra/prefect.yaml, and `prefect deployment run annotate/nightly`."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.annotate_fixtures import world  # noqa: F401
from tests.conftest import REPO, free_port, wait_http
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.mark.slow
def test_prefect_deployment_run_annotate_nightly(world, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    pred = tmp_path / "pred"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "DART_REPO": str(REPO), "DART_CHECKPOINT": world["checkpoint"], "DART_SHARDS": world["shards"],
           "DART_CLASSES": world["classes"], "DART_PREDICTIONS": str(pred),
           "DART_RAW_PREFIX": "s3://unused/raw", "DART_SHARDS_URL": "s3://unused/shards"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    worker = None
    try:
        wait_http(f"{api}/health", timeout=120)

        def prefect(*args, timeout=180):
            r = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=timeout)
            assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            return r.stdout

        prefect("work-pool", "create", "dart-process", "--type", "process")
        prefect("deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        listed = prefect("deployment", "ls")
        assert "annotate/nightly" in listed and "refresh/nightly" in listed
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "dart-process"], env=env, cwd=REPO,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        out = prefect("deployment", "run", "annotate/nightly", "--param", "batch_size=8", "--watch",
                      "--watch-timeout", "400", timeout=450)
        assert "Completed" in out, out[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        scores = pq.read_table(pred / "scores").to_pandas()
        assert sorted(scores.image_id) == sorted(world["keys"])
        # the schedule is there for the nightly run
        assert "0 2 * * *" in prefect("deployment", "inspect", "annotate/nightly")
    finally:
        for p in (worker, server):
            if p is not None:
                try:
                    os.killpg(p.pid, 15)
                    p.wait(timeout=20)
                except Exception:  # noqa: BLE001
                    os.killpg(p.pid, 9)
