"""benchmarks/label_audit.py on a full demo (`dart demo --workdir W`): injected errors are found.
Slow (annotates 600 images); needs a finished demo in $DART_DEMO_WORKDIR (default /work/demo4)."""
import json
import os
from pathlib import Path

import pytest

DEMO = Path(os.environ.get("DART_DEMO_WORKDIR", "/work/demo4"))


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "predictions" / "dart" / "run.json").exists(),
                    reason=f"no finished demo at {DEMO} (set DART_DEMO_WORKDIR; build with `dart demo --workdir W`)")
def test_label_audit_benchmark_on_the_demo(tmp_path, prefect_harness):
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_audit", Path(__file__).parents[1] / "benchmarks" / "label_audit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--demo", str(DEMO), "--seed", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    r = res["seeds"]["0"]
    assert r["errors"] / r["known_labels"] == pytest.approx(0.03, abs=0.001)  # 3 % of positives and of negatives
    ours, before = r["pr"]["sql (ours; dart audit default)"], r["pr"]["before (report order)"]
    assert ours[0][0] >= 0.9 and ours[0][0] > before[0][0] + 0.5  # top 1 %: precision
    assert all(o[1] >= b[1] for o, b in zip(ours, before))  # recall at every cut
    assert r["top1_max_class_share"]["sql (ours; dart audit default) + per-class cap"] <= 0.1 + 1e-9
    assert res["unmodified"]["now"]["share"] <= 0.1 < res["unmodified"]["before"]["share"]
