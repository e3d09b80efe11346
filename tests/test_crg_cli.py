"""`dart crg mine` / `dart crg show` / `dart crg tokens` exactly as documented, against the loopback stub."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dart_core.crg.graph import CRG
from dart_core.vocab import Vocabulary
from flows.cli import app
from tests.openai_stub import OpenAIStub, answer
from tests.test_crg_mine import EXPECTED, KEY, SEEN, script, vocab

runner = CliRunner()


def write_classes(tmp_path, v: Vocabulary | None = None):
    p = tmp_path / "classes.csv"
    (v or vocab()).write_csv(p)
    return p


def test_mine_cli_llm_then_rerun_free_then_show(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    classes, out, cache = write_classes(tmp_path), tmp_path / "crg.json", tmp_path / "cache"
    with OpenAIStub() as stub:
        script(stub)
        args = ["crg", "mine", "--classes", str(classes), "--out", str(out), "--source", "llm",
                "--base-url", stub.base_url, "--model", "gpt-4o", "--queries", "3", "--top-p", "0.3",
                "--neighbors", "4", "--shortlist", "0", "--cache", str(cache), "--concurrency", "3"]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert stub.chat_calls() == 30
        crg = CRG.read(out)
        for cid, (nbrs, _) in EXPECTED.items():
            assert crg.neighbors[cid] == nbrs
        assert "prompt tokens, full list (--shortlist 0)" in r.output
        assert "unparseable answers (cached raw, no edges): 1: dog#3" in r.output
        assert KEY not in r.output and KEY not in out.read_text()
        # rerun with the same inputs: zero API calls
        stub.reset_log()
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and stub.chat_calls() == 0, r.output
        # batch mode on a fresh cache gives the same graph (the stub replays its script from the start)
        stub.served.clear()
        r = runner.invoke(app, args[:-4] + ["--cache", str(tmp_path / "c2"), "--batch", "--poll-interval", "0.02",
                                            "--out", str(tmp_path / "b.json")])
        assert r.exit_code == 0, r.output
        assert CRG.read(tmp_path / "b.json").neighbors == crg.neighbors and stub.batch_lines() == 30
    # the model loads the graph as the ATM will
    ei = CRG.read(out).edge_index(Vocabulary.read_csv(classes))
    assert ei.shape[1] == sum(len(v) for v in crg.neighbors.values()) + len(crg.class_ids)
    png = tmp_path / "dog.png"
    r = runner.invoke(app, ["crg", "show", "dog", "--crg", str(out), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "dog with 4 neighbours: leash, cat, bone, kennel" in r.output


def test_no_endpoint_falls_back_to_similarity_and_random(tmp_path, monkeypatch):
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    classes, out = write_classes(tmp_path), tmp_path / "crg.json"
    r = runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(out), "--backbone", "hash",
                            "--neighbors", "3"])
    assert r.exit_code == 0, r.output
    assert "no LLM endpoint configured" in r.output and "using --source similarity" in r.output
    crg = CRG.read(out)
    assert crg.source == "similarity" and all(len(n) == 3 for n in crg.neighbors.values())
    assert all(set(n) <= set(SEEN) for n in crg.neighbors.values())  # neighbours are seen classes
    r = runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(out), "--source", "random"])
    assert r.exit_code == 0 and CRG.read(out).source == "random"


def test_bad_input_one_line_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name,split\na,dog,seen\nb,cat,sideways\n")
    r = runner.invoke(app, ["crg", "mine", "--classes", str(bad), "--out", str(tmp_path / "o.json"), "--source", "random"])
    assert r.exit_code == 2 and r.output.strip() == f"error: {bad} line 3: split 'sideways' for 'cat' is not one of ('seen', 'unseen')"
    r = runner.invoke(app, ["crg", "mine", "--classes", str(tmp_path / "none.csv"), "--out", "o.json"])
    assert r.exit_code == 2 and "none.csv: vocabulary file not found" in r.output and "Traceback" not in r.output
    classes = write_classes(tmp_path)
    r = runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", "o.json", "--top-p", "1.5", "--source", "random"])
    assert r.exit_code == 2 and r.output.strip().startswith(
        "error: Invalid value for '--top-p': 1.5 is not a share in (0, 1]")  # refused while parsing the options
    crg_path = tmp_path / "crg.json"
    crg_path.write_text(json.dumps({"classes": [{"id": "a", "name": "dog"}], "neighbors": {"a": ["zz"]}}))
    r = runner.invoke(app, ["crg", "show", "dog", "--crg", str(crg_path), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.output.strip() == f"error: {crg_path}: class 'a' names unknown neighbour 'zz'"
    runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(crg_path), "--source", "random"])
    r = runner.invoke(app, ["crg", "show", "dgo", "--crg", str(crg_path), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.output.strip() == "error: class 'dgo' is not in the CRG (did you mean 'dog'?)"


def test_tokens_command_prints_both_modes(tmp_path):
    classes = write_classes(tmp_path)
    r = runner.invoke(app, ["crg", "tokens", "--classes", str(classes), "--shortlist", "3", "--backbone", "hash",
                            "--approx"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("prompt tokens, shortlist 3: ") and "approx:cl100k-pieces" in lines[0]
    assert lines[1].startswith("prompt tokens, full list (--shortlist 0): ")
    assert "for 3 queries x 10 classes" in lines[1] and "all 10 prompts" in lines[1]


def test_similarity_through_the_real_frozen_backbone(tmp_path, monkeypatch):
    # the CLIP wiring of --backbone/--pretrained, on a tiny random-weight open_clip checkpoint
    from tests.model_fixtures import TINY, make_clip_checkpoint

    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    ckpt = make_clip_checkpoint(tmp_path / "tiny.pt", seed=0)
    classes, out = write_classes(tmp_path), tmp_path / "crg.json"
    r = runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(out), "--source", "similarity",
                            "--backbone", TINY, "--pretrained", str(ckpt), "--neighbors", "2"])
    assert r.exit_code == 0, r.output
    crg = CRG.read(out)
    assert crg.meta["embedder"] == f"{TINY}/{ckpt}" and all(len(n) == 2 for n in crg.neighbors.values())
    r = runner.invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(out), "--source", "similarity",
                            "--backbone", "no-such-model"])
    assert r.exit_code == 2 and "unknown open_clip model 'no-such-model'" in r.output
