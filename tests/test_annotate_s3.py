"""PRED on s3:// (the moto server on loopback: real HTTP, real boto3, no patched clients):
annotate writes whole shards, `dart eval` / calibrate / audit read them without DuckDB's httpfs,
crash + rerun leaves exactly one `scores/` row per sample, the S3 lease lock, no secret anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pytest

from dart_core import storage
from dart_core.predictions import TABLES, AnnotateError
from tests.annotate_fixtures import world  # noqa: F401
from tests.conftest import REPO
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

SECRET = "testing-secret"  # tests/conftest.py's AWS_SECRET_ACCESS_KEY


def annotate(world, out, **kw):
    from dart_core.options.annotate import AnnotateOptions
    from flows.annotate import annotate_flow

    args = dict(checkpoint=world["checkpoint"], shards=world["shards"], classes=world["classes"], out=str(out),
                crg=world["crg"], batch_size=4)
    args.update(kw)
    return annotate_flow(AnnotateOptions(**args))


def cli(*args, cache: Path) -> subprocess.CompletedProcess:
    """`dart ...` as a real process, with the usual AWS environment (endpoint + credentials)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DART_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def copy_prefix(src: str, dst: str) -> None:
    for o in storage.list_objects(src):
        storage.write_bytes(storage.join(dst, o.key), storage.read_bytes(o.url))


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"pred-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def runs(world, bucket, tmp_path_factory, s3_server, prefect_harness):
    """The same run annotated twice, to a local folder and to s3://BUCKET/runs/pred, with the
    flow's summaries: every test of this module reads one or both."""
    local = tmp_path_factory.mktemp("pred_local") / "pred"
    s3 = f"s3://{bucket}/runs/pred"
    return {"local": local, "s3": s3, "summary_local": annotate(world, local), "summary_s3": annotate(world, s3)}


def test_annotate_to_s3_then_dart_eval_equals_local(world, runs, prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from tests.conftest import every_page

    s_local, s_s3 = runs["summary_local"], runs["summary_s3"]
    assert {k: v for k, v in s_s3.items() if k != "out"} == {k: v for k, v in s_local.items() if k != "out"}
    assert s_s3 == {"shards": 4, "images": 24, "errors": 1, "skipped": 0, "out": runs["s3"]}
    keys = [o.key for o in storage.list_objects(runs["s3"])]
    sids = [f"val-00000{i}" for i in range(4)]
    assert sorted(keys) == sorted(["run.json", "summary.json", "vocab/vocab.parquet"]
                                  + [f"_done/{s}.json" for s in sids]
                                  + [f"{t}/shard={s}/part.parquet" for t in TABLES for s in sids])  # no lock left
    # `dart eval` (a real process) on s3:// prints the same table as on the local folder
    r_local = cli("eval", str(runs["local"]), "--k", "1", "--k", "3", cache=tmp_path / "cache")
    r_s3 = cli("eval", runs["s3"], "--k", "1", "--k", "3", "--json", f"{runs['s3']}/eval.json",
               cache=tmp_path / "cache")
    assert r_local.returncode == 0 and r_s3.returncode == 0, r_local.stderr[-2000:] + r_s3.stderr[-2000:]
    assert r_s3.stdout.splitlines()[:4] == r_local.stdout.splitlines()[:4]
    assert r_s3.stdout.splitlines()[2].startswith("GZSL")
    assert json.loads(storage.read_bytes(f"{runs['s3']}/eval.json"))["gzsl"]["images"] == 24
    assert storage.read_bytes(f"{runs['s3']}/eval.csv").startswith(b"setting,")
    # no secret in run.json, the parquet, the markers, the mirror, the output or the Prefect logs
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = "\n".join(entry.message for entry in every_page(client.read_logs))
        params = [json.dumps(fr.parameters) for fr in every_page(client.read_flow_runs)]
    assert "annotating 4 shards" in logs
    blobs = [storage.read_bytes(o.url) for o in storage.list_objects(f"s3://{runs['s3'].split('/')[2]}")]
    blobs += [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    blobs += [(r_s3.stdout + r_s3.stderr).encode(), logs.encode(), "".join(params).encode()]
    assert len(blobs) > 20 and not any(SECRET.encode() in b for b in blobs)


def test_eval_reads_s3_without_httpfs_and_only_finished_shards(world, runs, tmp_path, monkeypatch):
    from dart_core.evaluate import connect, evaluate

    monkeypatch.setenv("DART_CACHE_DIR", str(tmp_path / "cache"))
    assert evaluate(runs["s3"], ks=(1, 3)) == evaluate(runs["local"], ks=(1, 3))
    con = connect(runs["s3"])
    loaded = con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchall()
    assert loaded in ([], [(False,)])  # no extension downloaded or loaded: works with no internet
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 24


def test_crash_then_rerun_leaves_exactly_one_row_per_sample(world, runs, bucket, prefect_harness, tmp_path,
                                                            monkeypatch):
    from dart_core.evaluate import connect

    monkeypatch.setenv("DART_CACHE_DIR", str(tmp_path / "cache"))
    pred = f"s3://{bucket}/crash/pred"
    copy_prefix(runs["s3"], pred)
    # a crash in shard 1 after all its parts were uploaded, and in shard 2 after scores/ only, whose
    # part moreover holds the rows of an earlier attempt twice: no marker for either
    for sid in ("val-000001", "val-000002"):
        storage.delete(f"{pred}/_done/{sid}.json")
    for t in ("tags", "labels", "errors"):
        storage.delete(f"{pred}/{t}/shard=val-000002/part.parquet")
    scores2 = f"{pred}/scores/shard=val-000002/part.parquet"
    t2 = storage.read_parquet_bytes(storage.read_bytes(scores2))
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.concat_tables([t2, t2]), buf)
    storage.write_bytes(scores2, buf.getvalue())
    # readers count the finished shards only: 2 shards of 6 images
    con = connect(pred)
    assert con.execute("SELECT count(*), count(DISTINCT shard) FROM scores").fetchone() == (12, 2)
    assert con.execute("SELECT count(*) FROM labels WHERE shard = 'val-000001'").fetchone()[0] == 0
    # the rerun redoes exactly the shards without a marker, at the same keys
    s = annotate(world, pred, mode="append")
    assert s["skipped"] == 2 and s["images"] == 24
    con = connect(pred)
    per_image = con.execute("SELECT image_id, count(*) AS n FROM scores GROUP BY image_id").fetchall()
    assert sorted(i for i, _ in per_image) == sorted(world["keys"]) and {n for _, n in per_image} == {1}
    # ... and so does plain DuckDB over every part of the prefix, markers or not (a local copy)
    plain = tmp_path / "plain"
    for o in storage.list_objects(pred):
        storage.download_file(o.url, _mkparent(plain / o.key))
    dup = duckdb.sql(f"SELECT max(n), count(*) FROM (SELECT image_id, count(*) AS n FROM "
                     f"read_parquet('{plain}/scores/*/*.parquet') GROUP BY image_id)").fetchall()[0]
    assert dup == (1, 24)


def _mkparent(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_calibrate_and_audit_on_s3(world, runs, prefect_harness, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from dart_core.options.annotate import AuditOptions
    from flows.evaluate import audit_flow

    monkeypatch.setenv("DART_CACHE_DIR", str(tmp_path / "cache"))
    th_s3, th_local = f"{runs['s3'].rsplit('/', 1)[0]}/thresholds.csv", tmp_path / "thresholds.csv"
    for pred, out in ((runs["s3"], th_s3), (str(runs["local"]), str(th_local))):
        r = CliRunner().invoke(app, ["calibrate", pred, "--out", out])
        assert r.exit_code == 0, r.output
    assert storage.read_bytes(th_s3) == th_local.read_bytes()
    page = Path(audit_flow(AuditOptions(pred=runs["s3"], out=tmp_path / "report", limit=5, min_suspicion=0.0)))
    html = page.read_text()
    assert page.name == "index.html" and '"img":"img/00000.jpg"' in html  # thumbnails from the shards
    assert (tmp_path / "report" / "img" / "00000.jpg").stat().st_size > 0
    local_page = Path(audit_flow(AuditOptions(pred=runs["local"], out=tmp_path / "report_local", limit=5,
                                                min_suspicion=0.0)))

    def rows(page_html: str) -> list:  # the review list the page shows (the header names each run's paths)
        return json.loads(page_html.split('id="audit-data">', 1)[1].split("</script>", 1)[0])["rows"]

    assert rows(html) == rows(local_page.read_text()) and len(rows(html)) == 5


def test_s3_lease_lock(bucket, monkeypatch):
    from dart_core.predictions import output_lock

    pred = f"s3://{bucket}/locked/pred"
    lock = f"{pred}/.lock"
    with output_lock(pred):  # a live run holds the prefix ...
        assert json.loads(storage.read_bytes(lock))["holder"].startswith(f"pid {os.getpid()} on ")
        with pytest.raises(AnnotateError, match=rf"being written by another run \(pid {os.getpid()} on "):
            with output_lock(pred):
                pass
    assert not storage.exists(lock)  # ... and lets it go when it ends, error or not
    with pytest.raises(RuntimeError):
        with output_lock(pred):
            raise RuntimeError("boom")
    assert not storage.exists(lock)
    # a heartbeat keeps a long run's lease alive past the TTL
    monkeypatch.setenv("DART_S3_LOCK_TTL", "2")
    with output_lock(pred):
        time.sleep(3.5)
        with pytest.raises(AnnotateError, match="being written by another run"):
            with output_lock(pred):
                pass
    # a run killed with -9 left its lease: the next run is refused until the TTL passes, then takes it over
    storage.write_bytes(lock, json.dumps({"holder": "pid 1 on gone", "token": "x", "ttl_s": 2}).encode())
    with pytest.raises(AnnotateError, match=r"\(pid 1 on gone\)"):
        with output_lock(pred):
            pass
    time.sleep(3.5)
    with output_lock(pred):
        assert json.loads(storage.read_bytes(lock))["holder"] != "pid 1 on gone"
    assert not storage.exists(lock)


def test_prepare_output_on_s3_refuses_another_run_and_overwrite_clears(bucket):
    from dart_core.predictions import prepare_output
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.from_names(["a", "b"])
    meta = {"checkpoint_hash": "a" * 16, "vocab_hash": vocab.hash(), "crg_hash": None}
    pred = f"s3://{bucket}/prep/pred"
    prepare_output(pred, meta, vocab, None)
    assert json.loads(storage.read_bytes(f"{pred}/run.json")) == meta
    storage.write_bytes(f"{pred}/scores/shard=val-000000/part.parquet", b"x")
    storage.write_bytes(f"{pred}/_done/val-000000.json", b"{}")
    other = dict(meta, checkpoint_hash="b" * 16)
    with pytest.raises(AnnotateError, match="holds predictions of another run"):
        prepare_output(pred, other, vocab, None)
    prepare_output(pred, other, vocab, None, mode="overwrite")
    assert sorted(o.key for o in storage.list_objects(pred)) == ["run.json", "vocab/vocab.parquet"]
    # tables without run.json are refused unless overwrite
    storage.delete(f"{pred}/run.json")
    storage.write_bytes(f"{pred}/tags/shard=val-000000/part.parquet", b"x")
    with pytest.raises(AnnotateError, match="no run.json"):
        prepare_output(pred, meta, vocab, None)
