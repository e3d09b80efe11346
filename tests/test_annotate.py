"""Bulk annotation: exact rows per sample, crash/rerun, bad input, new classes, thresholds, runners,
and the SQL evaluation equal to dart_core.metrics."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dart_core.predictions import AnnotateError
from tests.annotate_fixtures import COLOURS, make_shards, world  # noqa: F401
from tests.conftest import REPO
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401


def table(pred, name):
    return pq.read_table(Path(pred) / name).to_pandas()


def annotate(world, out, **kw):
    from dart_core.options.annotate import AnnotateOptions
    from flows.annotate import annotate_flow

    args = dict(checkpoint=world["checkpoint"], shards=world["shards"], classes=world["classes"], out=str(out),
                crg=world["crg"], batch_size=4)
    args.update(kw)
    return annotate_flow(AnnotateOptions(**args))


def test_annotate_writes_every_table_exactly_once(world, tmp_path, prefect_harness):
    out = tmp_path / "pred"
    s = annotate(world, out)
    assert s == {"shards": 4, "images": 24, "errors": 1, "skipped": 0, "out": str(out)}
    scores = table(out, "scores")
    assert sorted(scores.image_id) == sorted(world["keys"])  # exactly the valid samples, once
    assert all(len(v) == 4 for v in scores.scores)
    assert sorted(scores.shard.unique()) == [f"val-00000{i}" for i in range(4)]
    errors = table(out, "errors")
    assert list(errors.image_id) == ["broken01"] and "undecodable image" in errors.error[0]
    tags = table(out, "tags")
    assert len(tags) == 24 * 4  # top_m=10 > 4 classes: every class, ranked
    assert set(tags["rank"]) == {1, 2, 3, 4}
    assert all(len(p) == 4 and len(ps) == 4 for p, ps in zip(tags.patches, tags.patch_scores))  # top_k=4
    assert set(tags.class_name[tags.unseen]) == {"yellow"}
    labels = table(out, "labels")
    assert len(labels) == 24 * 3 and set(labels.label) == {1, -1}  # 2 positives + 1 negative each
    vocab = table(out, "vocab")
    assert list(vocab.class_name) == list(COLOURS) and list(vocab.unseen) == [False, False, False, True]
    run = json.loads((out / "run.json").read_text())
    assert run["vocab_hash"] == world["vocab"].hash() and run["grid"] == [4, 4]
    assert not (out / "_staging").exists()
    # a rerun skips every finished shard and adds nothing
    s2 = annotate(world, out, mode="append")
    assert s2["skipped"] == 4 and len(table(out, "scores")) == 24


def test_sql_evaluation_equals_dart_core_metrics(world, tmp_path, prefect_harness):
    from dart_core import metrics
    from dart_core.evaluate import evaluate

    out = tmp_path / "pred"
    annotate(world, out)
    scores = table(out, "scores").sort_values(["shard", "image_id"])
    S = np.array([np.asarray(v, dtype=np.float64) for v in scores.scores])
    row = {(sh, i): r for r, (sh, i) in enumerate(zip(scores.shard, scores.image_id))}
    col = {n: j for j, n in enumerate(COLOURS)}
    Y = np.zeros(S.shape, dtype=np.int8)
    for sh, i, c, lab in table(out, "labels")[["shard", "image_id", "class_id", "label"]].itertuples(index=False):
        Y[row[(sh, i)], col[c]] = lab
    unseen = np.array([False, False, False, True])
    ref = metrics.evaluate(S, Y, unseen, ks=(1, 2))
    got = evaluate(out, ks=(1, 2))
    for setting in ("zsl", "gzsl"):
        for key, value in ref[setting].items():
            assert got[setting][key] == pytest.approx(value, abs=1e-9), (setting, key)
    # the seen classes' mAP (what training optimises) beside the two settings
    assert got["seen"]["mAP"] == pytest.approx(metrics.mean_average_precision(S[:, :3], Y[:, :3]), abs=1e-9)
    assert got["seen"]["classes"] == 3
    legacy_ref = metrics.mean_average_precision(S, Y, empty_as_zero=True)
    assert evaluate(out, ks=(1,), legacy=True)["gzsl"]["mAP"] == pytest.approx(legacy_ref)


def test_cli_parameters_are_bound_not_pasted(world, tmp_path, prefect_harness):
    from dart_core.evaluate import evaluate

    odd = tmp_path / "it's'; DROP TABLE scores; --"
    annotate(world, odd)
    assert evaluate(odd, ks=(2,))["gzsl"]["images"] == 24


def test_output_holding_another_run_is_refused(world, tmp_path, prefect_harness):
    out = tmp_path / "pred"
    annotate(world, out)
    other = dict(world, checkpoint=str(tmp_path / "other.pt"))
    shutil.copy(world["checkpoint"], other["checkpoint"])
    with open(other["checkpoint"], "ab") as f:
        f.write(b"\0")  # same weights, different file: another run's identity
    with pytest.raises(AnnotateError, match="holds predictions of another run"):
        annotate(other, out)
    with pytest.raises(AnnotateError, match="cannot append"):
        annotate(other, out, mode="append")
    s = annotate(other, out, mode="overwrite")
    assert s["skipped"] == 0 and len(table(out, "scores")) == 24


def test_bad_inputs_are_named(world, tmp_path, prefect_harness):
    from dart_core.checkpoint import CheckpointError
    from dart_core.vocab import Vocabulary

    with pytest.raises(AnnotateError, match="does not exist"):
        annotate(world, tmp_path / "p1", shards=str(tmp_path / "nope" / "000000.tar"))
    with pytest.raises(AnnotateError, match="no complete shards"):
        annotate(world, tmp_path / "p2", shards=str(tmp_path))
    small = tmp_path / "small.csv"
    Vocabulary.from_names(["red", "green", "yellow"], unseen={"yellow"}).write_csv(small)
    with pytest.raises(CheckpointError, match="trained class 'blue'"):
        annotate(world, tmp_path / "p3", classes=str(small))


def test_new_classes_join_the_graph_without_retraining(world, tmp_path, prefect_harness, monkeypatch):
    from dart_core.crg.graph import CRG
    from dart_core.vocab import Vocabulary

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    bigger = tmp_path / "classes.csv"
    Vocabulary.from_names(list(COLOURS) + ["purple", "orange"], unseen={"yellow", "purple", "orange"}).write_csv(bigger)
    out = tmp_path / "pred"
    s = annotate(world, out, classes=str(bigger))
    assert s["images"] == 24
    crg = CRG.read(out / "crg.json")
    assert set(crg.neighbors) >= {"purple", "orange"}  # similarity edges for the new classes
    assert crg.neighbors["red"] == CRG.read(world["crg"]).neighbors["red"]  # old edges untouched
    tags = table(out, "tags")
    assert set(tags.class_name) == set(COLOURS) | {"purple", "orange"}
    assert json.loads((out / "run.json").read_text())["crg"] == str(out / "crg.json")


def test_calibrated_thresholds_mark_tags(world, tmp_path, prefect_harness):
    from typer.testing import CliRunner

    from dart_core.thresholds import calibrate_thresholds
    from flows.cli import app

    # hand-computed: scores 3,2,1,0 with labels + - + -: cut after 1 -> F1 2/3, after 3 -> 2*2/(3+2)=0.8
    th, f1 = calibrate_thresholds(np.array([[3.0], [2.0], [1.0], [0.0]]), np.array([[1], [-1], [1], [-1]]))
    assert th[0] == 1.0 and f1[0] == pytest.approx(0.8)
    out = tmp_path / "pred"
    annotate(world, out)
    th_csv = tmp_path / "thresholds.csv"
    r = CliRunner().invoke(app, ["calibrate", str(out), "--out", str(th_csv)])
    assert r.exit_code == 0, r.output
    rows = th_csv.read_text().splitlines()
    assert rows[0] == "class_id,threshold,f1" and len(rows) == 5
    out2 = tmp_path / "pred2"
    annotate(world, out2, thresholds=str(th_csv), top_m=1)
    tags = table(out2, "tags")
    th_by = {line.split(",")[0]: float(line.split(",")[1]) for line in rows[1:] if line.split(",")[1]}
    for cid, score, above in tags[["class_id", "score", "above_threshold"]].itertuples(index=False):
        assert above == (score >= th_by[cid])
    # every class above its threshold is tagged, beyond the top-1
    n_above = sum(1 for s in table(out2, "scores").scores for j, c in enumerate(COLOURS)
                  if c in th_by and float(s[j]) >= th_by[c])
    assert tags.above_threshold.sum() == n_above


def test_dask_task_runner_on_a_local_cluster(world, tmp_path, prefect_harness):
    out = tmp_path / "pred"
    s = annotate(world, out, task_runner="dask", workers=2)
    assert s["images"] == 24 and s["errors"] == 1
    assert sorted(table(out, "scores").image_id) == sorted(world["keys"])


@pytest.mark.slow
def test_kill_9_and_rerun_leaves_exactly_one_row_per_sample(world, tmp_path):
    """kill -9 the whole `dart annotate` process group mid-run, rerun, count rows."""
    shards = tmp_path / "many"
    keys = make_shards(shards / "val", n_shards=10, per_shard=6)
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "flows.cli", "annotate", "--checkpoint", world["checkpoint"], "--shards",
           str(shards), "--classes", world["classes"], "--out", str(out), "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on a loaded 2-core machine the first shards are slow
    while time.time() < deadline and len(list((out / "_done").glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "_done").glob("*.json")))
    assert 3 <= done_before < 10
    r = subprocess.run(cmd + ["--mode", "append"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{done_before} already done" in r.stdout
    ids = table(out, "scores").image_id
    assert len(ids) == len(keys) and sorted(ids) == sorted(keys)
