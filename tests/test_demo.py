"""A short end-to-end run of the demo pipeline (smaller sizes than `dart demo`)."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, prefect_harness, monkeypatch):
    from dart_core.options.demo import DemoOptions
    from flows.demo import demo_flow, format_label_noise, format_results

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    res = demo_flow(DemoOptions(workdir=tmp_path / "demo", n_train=160, n_test=60, vlp_steps=10, epochs=2,
                                batch_size=32, train_seeds=[0, 1], label_noise=0.05))
    assert res["crg_source"] == "world"  # no endpoint: the world's relations stand in for the LLM's
    st = res["dart_seeds"]
    assert st["runs"] == 2 and set(st["mean"]) == set(st["spread"]) and 0 <= st["spread"]["zsl_mAP"] <= 1
    assert 0 <= res["dart"]["seen"]["mAP"] <= 1 and res["zero_shot"]["seen"]["classes"] == 23
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
    table = format_results(res)
    assert "DART, mean of 2 seeds" in table and "seen mAP" in table
    # --label-noise: 5 % of the test split's 60 x 30 labels flipped in a copy, annotated and audited
    noise = res["label_noise"]
    assert noise["known_labels"] == 1800 and noise["errors"] == noise["injected"] in (89, 90, 91)  # rounded per sign
    assert set(noise["rankings"]) == {"sql", "cleanlab"}
    assert [c["cut"] for c in noise["rankings"]["sql"]] == [18, 36, 90]
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["label_noise"]["errors"] == noise["errors"]
    assert "best possible" in format_label_noise(noise)


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


def test_training_code_hash_follows_code_not_prose(tmp_path, monkeypatch):
    import shutil

    import dart_core
    from dart_core.stages import training_code_hash

    pkg = tmp_path / "dart_core"
    shutil.copytree(Path(dart_core.__file__).parent, pkg, ignore=shutil.ignore_patterns("data", "world", "__pycache__"))
    monkeypatch.setattr(dart_core, "__file__", str(pkg / "__init__.py"))
    before = training_code_hash()
    losses = pkg / "losses.py"
    src = losses.read_text()
    doc = '"""'
    head = src.index(doc)
    losses.write_text(src[:head + 3] + "Reworded. " + src[head + 3:] + "\n# a new comment\n")
    assert training_code_hash() == before  # docstrings and comments retrain nothing
    losses.write_text(src.replace("def ", "def _unused():\n    return 1\n\n\ndef ", 1))
    assert training_code_hash() != before  # code does


def test_code_hash_reads_python_as_code_and_other_files_as_bytes(tmp_path):
    """What keys the cached VLP (flows.vlp.world_code_hash) and the trained variants."""
    from dart_core.stages import code_hash

    py, cfg = tmp_path / "gen.py", tmp_path / "model.json"
    py.write_text('"""Module doc."""\n\n\ndef draw(n):\n    """Draw."""\n    return n + 1\n')
    cfg.write_text('{"width": 64}')
    before = code_hash([py, cfg])
    py.write_text('"""Reworded doc."""\n# a comment\n\ndef draw(n):  # why\n    """Other words."""\n    return n + 1\n')
    assert code_hash([py, cfg]) == before  # prose: the same cached artefact
    py.write_text('def draw(n):\n    return n + 2\n')
    assert code_hash([py, cfg]) != before  # code: another one
    py.write_text('def draw(n):\n    return n + 1\n')
    assert code_hash([py, cfg]) == before
    cfg.write_text('{"width": 65}')
    assert code_hash([py, cfg]) != before  # a config file counts byte for byte
    assert code_hash([tmp_path / "missing.json"]) == code_hash([tmp_path / "other" / "missing.json"])  # empty
