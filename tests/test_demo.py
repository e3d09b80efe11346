"""A short end-to-end run of the demo pipeline (smaller sizes than `dart demo`)."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, prefect_harness, monkeypatch):
    from flows.demo import demo_flow, format_results

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    res = demo_flow(str(tmp_path / "demo"), n_train=160, n_test=60, vlp_steps=10, epochs=2)
    assert res["crg_source"] == "similarity"
    for name in ("zero_shot", "dart"):
        pred = Path(res[name]["pred"]) if name == "dart" else tmp_path / "demo" / "predictions" / "zero_shot"
        for table in ("scores", "tags", "labels", "errors"):
            assert pq.read_table(pred / table).num_rows >= (0 if table == "errors" else 60), (name, table)
        assert len(pq.read_table(pred / "scores")) == 60
        assert (pred / "vocab" / "vocab.parquet").exists() and (pred / "run.json").exists()
        for setting in ("zsl", "gzsl"):
            assert 0.0 <= res[name][setting]["mAP"] <= 1.0
            assert 0.0 <= res[name]["localization"][setting] <= 1.0
    assert Path(res["report"]).read_text().count("<tr class='class'>") == 30
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["dart"]["checkpoint"].endswith("model.pt")
    assert "DART" in format_results(res)


def test_demo_variant_is_retrained_when_its_inputs_change(tmp_path):
    from flows.demo import reuse_run_dir

    run = tmp_path / "runs" / "dart"
    spec = {"model": {"wps_tau": 100.0, "pretrained": "/v.pt"}, "train": {"epochs": 12}, "crg_sha256": "ab"}
    reuse_run_dir(run, spec)
    (run / "model.pt").write_bytes(b"weights")
    (run / "last.pt").write_bytes(b"state")
    reuse_run_dir(run, json.loads(json.dumps(spec)))  # same inputs (also after a JSON round trip): kept
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "model.pt", "spec.json"]
    changed = {**spec, "model": {"wps_tau": None, "pretrained": "/v.pt"}}
    reuse_run_dir(run, changed)  # another config: the old model must not be reported under it
    assert sorted(p.name for p in run.iterdir()) == ["spec.json"]
    assert json.loads((run / "spec.json").read_text()) == changed
    (run / "model.pt").write_bytes(b"weights")
    (run / "spec.json").unlink()  # a folder from before spec.json existed: not trusted
    reuse_run_dir(run, changed)
    assert sorted(p.name for p in run.iterdir()) == ["spec.json"]
