"""`pipeline`: a folder source to predictions, eval and audit in one flow; reruns skip what has not
changed, new images are sharded, trained on and annotated exactly once."""
import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

TINY = dict(backbone="dart-tiny-vit", model_cfg={"top_k_share": 0.25}, epochs=2, batch_size=8, val_share=0, shard_size=16,
            shard_workers=1, annotate_batch_size=16)


def world_folders(root: Path, n_train: int, n_test: int) -> dict:
    """Two folder sources of the synthetic world (same classes.csv); labels.csv lists only the
    first rows, so that images can 'arrive' later by restoring the full file."""
    from dart_core.world.generator import write_folder_source

    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        d = root / split
        write_folder_source(d, n + 8, seed=seed)
        full = (d / "labels.csv").read_text().splitlines(keepends=True)
        (d / "labels.full.csv").write_text("".join(full))
        (d / "labels.csv").write_text("".join(full[:n + 1]))
        out[split] = d
    return out


def arrive(folder: Path) -> None:
    (folder / "labels.csv").write_text((folder / "labels.full.csv").read_text())


def image_ids(pred: Path) -> list[str]:
    return [r[0] for r in duckdb.sql(f"SELECT image_id FROM read_parquet('{pred}/scores/*/*.parquet')").fetchall()]


def statuses(summary: dict) -> dict[str, str]:
    return {k: v["status"].split(" ")[0].rstrip(":") for k, v in summary["stages"].items()}


@pytest.mark.slow
def test_pipeline_folder_source_runs_then_skips_then_takes_new_images(tmp_path, tiny_clip_ckpt, prefect_harness,
                                                                      monkeypatch):
    from prefect.artifacts import Artifact

    from dart_core.options.pipeline import PipelineOptions
    from flows.pipeline import pipeline_flow

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    src = world_folders(tmp_path / "src", 40, 20)
    work = tmp_path / "work"

    def run():
        return pipeline_flow(PipelineOptions(source=src["train"], format="folder", out=work, test_source=src["test"],
                                             pretrained=tiny_clip_ckpt, checkpoint_every=1, **TINY))

    s = run()
    assert statuses(s) == {k: "ran" for k in ("shard", "crg", "train", "annotate", "evaluate", "audit")}
    from dart_core.checkpoint import read_checkpoint

    assert read_checkpoint(Path(s["paths"]["checkpoint"]).with_name("last.pt"))["train_config"]["checkpoint_every"] == 1
    assert "similarity" in s["stages"]["crg"]["status"]  # no LLM endpoint configured: said so
    pred = Path(s["paths"]["predictions"])
    assert sorted(image_ids(pred)) == sorted(set(image_ids(pred))) and len(image_ids(pred)) == 20
    ev = json.loads((work / "eval.json").read_text())
    assert 0 <= ev["zsl"]["mAP"] <= 1 and ev["gzsl"]["classes"] == 30 and (work / "eval.csv").exists()
    assert Path(s["paths"]["report"]).exists() and Path(s["paths"]["checkpoint"]).exists()
    art = Artifact.get("pipeline-summary")
    assert art is not None and "| ZSL |" in art.data and s["paths"]["checkpoint"] in art.data
    assert (work / "summary.md").read_text() == art.data

    # nothing changed: every stage but the source check is skipped, the same model is kept
    again = run()
    assert statuses(again) == {"shard": "ran", **{k: "skipped" for k in ("crg", "train", "annotate", "evaluate",
                                                                          "audit")}}
    assert again["stages"]["shard"]["status"] == "ran: nothing new in the source"
    assert again["paths"]["checkpoint"] == s["paths"]["checkpoint"] and again["eval"] == s["eval"]

    # new test images: sharded, annotated with the same model (append: done shards skipped), once each
    arrive(src["test"])
    more = run()
    assert statuses(more)["train"] == "skipped" and statuses(more)["annotate"] == "ran"
    assert "mode append" in more["stages"]["annotate"]["status"]
    ids = image_ids(pred)
    assert len(ids) == len(set(ids)) == 28

    # new training images: a new run folder, the predictions redone with the new model
    arrive(src["train"])
    new = run()
    assert statuses(new)["train"] == "ran" and new["paths"]["checkpoint"] != s["paths"]["checkpoint"]
    assert Path(s["paths"]["checkpoint"]).exists()  # the earlier model is kept
    assert "mode overwrite" in new["stages"]["annotate"]["status"]
    ids = image_ids(pred)
    assert len(ids) == len(set(ids)) == 28
    run_json = json.loads((pred / "run.json").read_text())
    assert run_json["checkpoint"] == new["paths"]["checkpoint"]


def test_pipeline_bad_options_are_one_line(tmp_path, tiny_clip_ckpt):
    (tmp_path / "src").mkdir()
    base = ["pipeline", str(tmp_path / "src"), "--out", str(tmp_path / "work"), "--backbone", "dart-tiny-vit"]
    cases = [
        (["--format", "folder", "--pretrained", tiny_clip_ckpt], "--format folder: --test-source is required"),
        (["--format", "nuswide", "--pretrained", "none"], "--pretrained none: a random backbone"),
        (["--format", "nuswide", "--pretrained", str(tmp_path / "gone.pt")], f"--pretrained {tmp_path / 'gone.pt'}: no such weights file"),
        (["--format", "nuswide", "--pretrained", tiny_clip_ckpt, "--out", "s3://bucket/work"], "--out s3://bucket/work: the work folder must be local"),
        (["--format", "nuswide", "--pretrained", tiny_clip_ckpt, "--nproc", "0"], "--nproc"),
    ]
    for extra, message in cases:
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2, (extra, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, r.output)
    assert not (tmp_path / "work").exists()


def test_pipeline_bad_input_fails_the_flow_run_with_the_message(tmp_path, tiny_clip_ckpt, prefect_harness):
    """Inside Prefect (a deployment run): the same message, on a Failed flow run."""
    from dart_core.options.pipeline import PipelineError, PipelineOptions
    from flows.pipeline import pipeline_flow

    (tmp_path / "src").mkdir()
    state = pipeline_flow(PipelineOptions(source=tmp_path / "src", format="folder", out=tmp_path / "work",
                                          pretrained=tiny_clip_ckpt, backbone="dart-tiny-vit"), return_state=True)
    assert state.is_failed() and "--test-source is required" in state.message
    with pytest.raises(PipelineError, match="--test-source is required"):
        state.result()
    # a source that is not there: the shard stage names it
    state = pipeline_flow(PipelineOptions(source=tmp_path / "nowhere", format="folder", out=tmp_path / "work",
                                          test_source=tmp_path / "src", pretrained=tiny_clip_ckpt,
                                          backbone="dart-tiny-vit"), return_state=True)
    assert state.is_failed() and "nowhere" in state.message
