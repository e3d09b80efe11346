"""The `mine_crg` Prefect flow on a real (temporary) Prefect server: key from a Secret block,
task cached across runs by INPUTS + TASK_SOURCE, and the key nowhere in Prefect."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dart_core.crg.graph import CRG
from tests.openai_stub import OpenAIStub
from tests.conftest import every_page
from tests.test_crg_mine import EXPECTED, KEY, script, vocab


@pytest.mark.slow  # ~35 s: a temporary Prefect server and three flow runs
def test_mine_crg_flow_secret_block_cache_and_no_leak(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from dart_core.options.crg import MineOptions
    from flows.crg import mine_crg

    Secret(value=KEY).save("crg-test-openai-key", overwrite=True)
    classes, out = tmp_path / "classes.csv", tmp_path / "crg.json"
    vocab().write_csv(classes)
    with OpenAIStub() as stub:
        script(stub)
        options = MineOptions(classes=str(classes), out=str(out), base_url=stub.base_url, neighbors=4, shortlist=0,
                              cache=str(tmp_path / "cache"), concurrency=4, api_key_block="crg-test-openai-key")
        state = mine_crg(options, return_state=True)
        assert state.is_completed(), state
        res = state.result()
        assert res["source"] == "llm" and res["report"]["answers_fetched"] == 30
        assert stub.chat_calls() == 30 and {r["authorization"] for r in stub.log} == {f"Bearer {KEY}"}
        crg = CRG.read(out)
        assert {c: crg.neighbors[c] for c in EXPECTED} == {c: n for c, (n, _) in EXPECTED.items()}
        # same inputs again: the Prefect task is served from its cache, the endpoint sees nothing
        state2 = mine_crg(options, return_state=True)
        assert state2.is_completed() and state2.result() == res and stub.chat_calls() == 30
        # crg.json deleted: the task runs again, every answer comes from the answer cache
        out.unlink()
        res3 = mine_crg(options)
        assert stub.chat_calls() == 30 and res3["report"]["answers_cached"] == 30 and out.exists()
    APILogHandler().flush()  # send the queued log lines before reading them back
    with get_client(sync_client=True) as client:
        flow_runs = every_page(client.read_flow_runs)
        task_runs = every_page(client.read_task_runs)
        logs = every_page(client.read_logs)
    ours = [fr for fr in flow_runs if fr.parameters.get("options", {}).get("out") == str(out)]
    assert len(ours) == 3
    states = sorted(tr.state.name for tr in task_runs if tr.flow_run_id in {fr.id for fr in ours})
    assert states == ["Cached", "Completed", "Completed"]
    log_text = "\n".join(l.message for l in logs)
    assert "wrote " in log_text and "prompt tokens, full list" in log_text  # the logs are there...
    for blob in [log_text] + [json.dumps(fr.parameters) for fr in ours] + [out.read_text()]:
        assert KEY not in blob  # ...and the key is not
    home = Path(os.environ["PREFECT_HOME"])
    stored = [p.read_bytes() for p in home.rglob("*") if p.is_file() and p.stat().st_size < 5_000_000]
    assert stored and not any(KEY.encode() in b for b in stored if not _is_db(b))


def _is_db(b: bytes) -> bool:
    # the server's SQLite database holds the Secret block itself, by design (that is where
    # Prefect keeps secrets); results, logs and parameters are checked above
    return b.startswith(b"SQLite format 3")
