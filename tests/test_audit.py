"""Label audit: the SQL on hand-made predictions, and the HTML report rendered in headless Chromium."""
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dart_core.evaluate import audit
from dart_core.infer import SCHEMAS, vocab_table
from dart_core.vocab import Vocabulary
from tests.annotate_fixtures import world  # noqa: F401
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def write_predictions(pred: Path, vocab: Vocabulary, scores: dict, labels: dict) -> None:
    """A prediction folder from hand-written scores {image: [..]} and labels {image: {class: ±1}}."""
    shard = "val-000000"
    ids = list(vocab.ids)
    rows = {n: {f: [] for f in SCHEMAS[n].names} for n in SCHEMAS}
    for img, s in scores.items():
        rows["scores"]["image_id"].append(img)
        rows["scores"]["scores"].append(np.asarray(s, np.float16))
        order = np.argsort(-np.asarray(s), kind="stable")
        for rank, c in enumerate(order, start=1):
            t = rows["tags"]
            for k, v in (("image_id", img), ("class_id", ids[c]), ("class_name", vocab.names[c]),
                         ("score", float(s[c])), ("rank", rank), ("unseen", bool(vocab.unseen_mask[c])),
                         ("above_threshold", None), ("patches", [0]), ("patch_scores", [1.0])):
                t[k].append(v)
        for cid, lab in labels[img].items():
            rows["labels"]["image_id"].append(img)
            rows["labels"]["class_id"].append(cid)
            rows["labels"]["label"].append(lab)
    for name in SCHEMAS:
        p = pred / name / f"shard={shard}" / "part.parquet"
        p.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pydict(rows[name], schema=SCHEMAS[name]), p)
    (pred / "_done").mkdir()  # the shard is finished: readers count only shards with a done marker
    (pred / "_done" / f"{shard}.json").write_text(json.dumps({"shard": shard, "images": len(scores)}))
    (pred / "vocab").mkdir()
    pq.write_table(vocab_table(vocab, None), pred / "vocab" / "vocab.parquet")


def test_audit_queries_hand_computed(tmp_path):
    vocab = Vocabulary.from_names(["a", "b", "c"], unseen={"c"})
    scores = {"img1": [5, 1, 0], "img2": [0, 4, 3], "img3": [2, 0, 6]}
    labels = {"img1": {"a": 1, "c": -1}, "img2": {"a": 1, "b": -1}, "img3": {"a": -1, "b": 1}}
    write_predictions(tmp_path, vocab, scores, labels)
    res = audit(tmp_path, top=1)
    missing = {(r["image_id"], r["class_id"], r["issue"]) for r in res["missing"]}
    assert missing == {("img2", "b", "labelled negative"), ("img3", "c", "not labelled")}
    assert {(r["image_id"], r["class_id"], r["rank"]) for r in res["wrong"]} == {("img2", "a", 3), ("img3", "b", 3)}
    rates = {r["class_id"]: r["disagreement_rate"] for r in res["classes"]}
    assert rates == {"a": pytest.approx(1 / 3), "b": pytest.approx(1.0), "c": pytest.approx(0.0)}
    # self-confidences (percentile within the class): img1 {1, 1}, img2 {0, 0}, img3 {0.5, 0}
    q = {r["image_id"]: r["label_quality"] for r in res["images"]}
    assert q["img1"] == pytest.approx(1.0) and q["img2"] == pytest.approx(0.0)
    assert q["img3"] == pytest.approx(0.5 * math.exp(-5) / (math.exp(-5) + 1))
    assert [r["image_id"] for r in res["images"]] == ["img2", "img3", "img1"]
    assert {r["image_id"]: r["worst_class"] for r in res["images"]}["img3"] == "b"


def test_audit_report_renders_in_headless_chromium(world, tmp_path, prefect_harness):
    from flows.annotate import annotate_flow
    from flows.evaluate import audit_flow

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test (make test installs Debian's chromium: infra/ensure-chromium.sh)"
    pred = tmp_path / "pred"
    annotate_flow(world["checkpoint"], world["shards"], world["classes"], str(pred), world["crg"], batch_size=8)
    page = Path(audit_flow(str(pred), str(tmp_path / "report"), top=1, limit=10))
    expected = audit(pred, top=1, limit=10)
    n_pairs = len(expected["missing"]) + len(expected["wrong"])
    assert n_pairs > 0
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert loaded == total == n_pairs  # every suspicious pair shows its decoded heatmap thumbnail
    assert dom.count("<tr class=\"pair\">") == n_pairs
    assert dom.count("<tr class=\"class\">") == 4
    for name in ("red", "green", "blue", "yellow"):
        assert f"<td>{name}</td>" in dom
    first = expected["missing"][0] if expected["missing"] else expected["wrong"][0]
    assert f"<td>{first['image_id']}</td>" in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome2'}", "--window-size=1000,800",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    run = json.loads((pred / "run.json").read_text())
    assert run["vocab_hash"] in dom
