"""The way users run it: a real `prefect server`, process work pools and a worker, `prefect deploy`
from infra/prefect.yaml, and `prefect deployment run annotate/nightly` / `pipeline/cpu`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.annotate_fixtures import world  # noqa: F401
from tests.conftest import REPO, free_port, wait_http
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def deployed(world, tmp_path_factory):
    """A Prefect server, the pools dart-process and dart-gpu, every deployment of infra/prefect.yaml
    and a worker on dart-process; yields the `prefect` CLI as a function and the paths used."""
    from dart_core.world.generator import write_folder_source

    tmp = tmp_path_factory.mktemp("deployment")
    for split, n, seed in (("train", 32, 0), ("test", 16, 1)):
        write_folder_source(tmp / "source" / split, n, seed=seed)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    paths = {"pred": tmp / "pred", "work": tmp / "work", "source": tmp / "source"}
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "DART_REPO": str(REPO), "DART_CHECKPOINT": world["checkpoint"], "DART_SHARDS": world["shards"],
           "DART_CLASSES": world["classes"], "DART_PREDICTIONS": str(paths["pred"]),
           "DART_RAW_PREFIX": "s3://unused/raw", "DART_SHARDS_URL": "s3://unused/shards",
           "DART_SOURCE": str(tmp / "source" / "train"), "DART_TEST_SOURCE": str(tmp / "source" / "test"),
           "DART_FORMAT": "folder", "DART_WORKDIR": str(paths["work"]), "DART_BACKBONE": "dart-tiny-vit",
           "DART_PRETRAINED": world["clip"], "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT,
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
        prefect("work-pool", "create", "dart-gpu", "--type", "process")
        prefect("deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "dart-process"], env=env, cwd=REPO,
                                  stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        def run_params(*args):
            """infra/run_params.py: the deployment's `options` with some fields changed, as --params JSON."""
            return subprocess.run([sys.executable, "infra/run_params.py", *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=60)

        yield {"prefect": prefect, "run_params": run_params, "worker_log": tmp / "worker.log", **paths}
    finally:
        for p in (worker, server):
            if p is not None:
                try:
                    os.killpg(p.pid, 15)
                    p.wait(timeout=20)
                except Exception:  # noqa: BLE001
                    os.killpg(p.pid, 9)


@pytest.mark.slow
def test_prefect_deployment_run_annotate_nightly(deployed, world):
    prefect = deployed["prefect"]
    listed = prefect("deployment", "ls")
    assert all(d in listed for d in ("annotate/nightly", "refresh/nightly", "pipeline/cpu", "pipeline/gpu"))
    bad = deployed["run_params"]("annotate/nightly", "batch=8")
    assert bad.returncode == 2 and bad.stderr.startswith("error: 'batch' is not an option of the annotate flow")
    params = deployed["run_params"]("annotate/nightly", "batch_size=8")
    assert params.returncode == 0, params.stderr
    options = json.loads(params.stdout)["options"]
    assert options["batch_size"] == 8 and options["mode"] == "append" and options["checkpoint"] == world["checkpoint"]
    out = prefect("deployment", "run", "annotate/nightly", "--params", params.stdout, "--watch",
                  "--watch-timeout", "400", timeout=450)
    assert "Completed" in out, out[-2000:] + deployed["worker_log"].read_text()[-3000:]
    scores = pq.read_table(deployed["pred"] / "scores").to_pandas()
    assert sorted(scores.image_id) == sorted(world["keys"])
    # the schedule is there for the nightly run
    assert "0 2 * * *" in prefect("deployment", "inspect", "annotate/nightly")


@pytest.mark.slow
def test_prefect_deployment_run_pipeline_on_a_folder_source(deployed):
    prefect = deployed["prefect"]
    # the GPU example is deployed as written: its pool, job variables and number of GPUs
    gpu = prefect("deployment", "inspect", "pipeline/gpu")
    assert "dart-gpu" in gpu and "CUDA_VISIBLE_DEVICES" in gpu and "'nproc': 8" in gpu and "'device': 'cuda'" in gpu
    params = deployed["run_params"]("pipeline/cpu", "epochs=1", "batch_size=8", "val_share=0", "shard_size=16",
                                    "shard_workers=1", "top_k_share=0.25")
    assert params.returncode == 0, params.stderr
    out = prefect("deployment", "run", "pipeline/cpu", "--params", params.stdout, "--watch", "--watch-timeout", "500",
                  timeout=560)
    assert "Completed" in out, out[-2000:] + deployed["worker_log"].read_text()[-4000:]
    work = deployed["work"]
    summary = json.loads((work / "summary.json").read_text())
    assert all(s["status"].startswith("ran") for s in summary["stages"].values()), summary["stages"]
    pred = Path(summary["paths"]["predictions"])
    ids = [r[0] for r in duckdb.sql(f"SELECT image_id FROM read_parquet('{pred}/scores/*/*.parquet')").fetchall()]
    assert len(ids) == len(set(ids)) == 16
    assert 0 <= summary["eval"]["zsl"]["mAP"] <= 1 and (work / "eval.json").exists()
    # the summary is an artifact of the run, visible in the UI
    art = prefect("artifact", "inspect", "pipeline-summary")
    assert "| ZSL |" in art and str(pred) in art
