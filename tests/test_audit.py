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
from dart_core.predictions import SCHEMAS, vocab_table
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


def test_calibrated_sql_scores_hand_computed(tmp_path):
    """sql/audit_calibrated.sql on hand-made scores: per class, the two-Gaussian (pooled variance)
    posterior; class b scores high on every image (a miscalibrated class, like the demo's snowman)."""
    from dart_core.audit import run_audit

    vocab = Vocabulary.from_names(["a", "b"], unseen={"b"})
    a = [6, 4, 5, 0, 1]
    b = [14, 13, 12.5, 12, 11]
    scores = {f"i{k}": [a[k], b[k]] for k in range(5)}
    labels = {"i0": {"a": 1, "b": -1}, "i1": {"a": 1, "b": -1}, "i2": {"a": -1, "b": 1},
              "i3": {"a": -1, "b": -1}, "i4": {"a": -1, "b": 1}}
    write_predictions(tmp_path, vocab, scores, labels)

    def p_of(pos, neg, s):  # the hand formula of sql/audit_calibrated.sql
        m1, m0 = np.mean(pos), np.mean(neg)
        var = (np.var(pos) * len(pos) + np.var(neg) * len(neg)) / (len(pos) + len(neg) - 2)
        return 1 / (1 + math.exp(-((m1 - m0) / var * (s - (m1 + m0) / 2) + math.log(len(pos) / len(neg)))))

    # class a: m1 = 5, m0 = 2, pooled var = 16/3, slope 9/16, mid 3.5, prior ln(2/3)
    assert p_of([6, 4], [5, 0, 1], 5) == pytest.approx(1 / (1 + math.exp(-(9 / 16 * 1.5 + math.log(2 / 3)))))
    res = run_audit(tmp_path, method="sql", max_rows=100, min_suspicion=0.0)
    got = {(r["image_id"], r["class_id"]): r for r in res["pairs"]}
    assert len(got) == 10  # every known label, ranked
    for k in range(5):
        for c, xs in (("a", a), ("b", b)):
            lab = labels[f"i{k}"][c]
            pos = [x for j, x in enumerate(xs) if labels[f"i{j}"][c] == 1]
            neg = [x for j, x in enumerate(xs) if labels[f"i{j}"][c] == -1]
            p = p_of(pos, neg, xs[k])
            r = got[(f"i{k}", c)]
            assert r["p"] == pytest.approx(p, rel=1e-6)
            assert r["suspicion"] == pytest.approx(1 - p if lab == 1 else p, rel=1e-6)
            assert r["kind"] == ("likely wrong" if lab == 1 else "likely missing")
            assert r["suggested_label"] == -lab
    order = [(r["image_id"], r["class_id"]) for r in res["pairs"]]
    assert order == sorted(order, key=lambda k: -got[k]["suspicion"])
    # by hand: suspicion (i2,b) 0.6354 > (i2,a) 0.6079 > (i1,a) 0.5310 > (i3,b) 0.5111 > (i0,a) 0.2688 ...
    assert order[:4] == [("i2", "b"), ("i2", "a"), ("i1", "a"), ("i3", "b")]
    assert got[("i2", "b")]["suspicion"] == pytest.approx(0.6354, abs=1e-4)
    # the old rank-based list: class b is first in every image, so its negatives fill it
    assert {r["class_id"] for r in audit(tmp_path, top=1)["missing"]} == {"b"}
    # per-class cap: 2 rows, at most 1 per class -> the worst of b, then the worst of a
    capped = run_audit(tmp_path, method="sql", max_rows=2, per_class_cap=1, min_suspicion=0.0)["pairs"]
    assert [(r["image_id"], r["class_id"]) for r in capped] == [("i2", "b"), ("i2", "a")]
    capped = run_audit(tmp_path, method="sql", max_rows=3, per_class_cap=1, min_suspicion=0.0)["pairs"]
    assert len(capped) == 2  # the cap holds even when the list could be longer
    # the default list: suspicion >= 0.5 only
    default = run_audit(tmp_path, method="sql")["pairs"]
    assert {(r["image_id"], r["class_id"]) for r in default} == set(order[:4])
    summary = {r["class_id"]: r for r in res["classes"]}
    assert (summary["a"]["positives"], summary["a"]["negatives"]) == (2, 3)
    assert res["meta"]["not_calibrated"] == [] and res["meta"]["per_class_cap"] == 150  # 3 x 100 / 2


def test_cleanlab_scores_are_one_minus_self_confidence(tmp_path):
    """--method cleanlab: cleanlab's per-class self-confidence on the calibrated p, hand-checked; a
    class without a negative label is not calibrated (no rows, named in meta)."""
    from dart_core.audit import cleanlab_suspicion, platt, run_audit

    P = np.array([[0.9, 0.2], [0.3, 0.6], [0.7, 0.1]])
    Y = np.array([[1, -1], [-1, 1], [-1, 0]], dtype=np.int8)
    assert np.allclose(cleanlab_suspicion(P, Y, np.array([True, True])), [[0.1, 0.2], [0.3, 0.4], [0.7, 0.1]])
    S = np.array([[3.0, 1.0], [1.0, 2.0], [2.0, 0.0]])
    Pc, ok = platt(S, np.array([[1, 1], [-1, 1], [-1, 1]], dtype=np.int8))
    assert ok.tolist() == [True, False] and np.isnan(Pc[:, 1]).all()
    assert Pc[0, 0] > Pc[2, 0] > Pc[1, 0]  # monotone in the score

    vocab = Vocabulary.from_names(["a", "b", "c"], unseen={"c"})
    scores = {"x": [5, 1, 0], "y": [0, 4, 3], "z": [2, 0, 6], "w": [4, 3, 1]}
    labels = {"x": {"a": 1, "c": 1}, "y": {"a": -1, "b": -1, "c": 1}, "z": {"a": -1, "b": 1, "c": 1},
              "w": {"a": 1, "b": -1}}
    write_predictions(tmp_path, vocab, scores, labels)
    res = run_audit(tmp_path, method="cleanlab", max_rows=50, min_suspicion=0.0)
    assert res["meta"]["not_calibrated"] == ["c"]  # only positive labels: nothing to calibrate on
    assert {r["class_id"] for r in res["pairs"]} == {"a", "b"}
    assert all(r["suspicion"] == pytest.approx(1 - r["p"] if r["label"] == 1 else r["p"]) for r in res["pairs"])
    # b: its positive z scores 0, below both negatives (4, 3): the most suspicious label of b
    b = [r for r in res["pairs"] if r["class_id"] == "b"]
    assert b[0]["image_id"] == "z" and b[0]["kind"] == "likely wrong"


def test_old_prediction_folders_stay_readable(tmp_path):
    """A folder written before annotate recorded file/source: the views give NULL, the audit runs."""
    from dart_core.evaluate import connect

    vocab = Vocabulary.from_names(["a", "b"])
    write_predictions(tmp_path, vocab, {"x": [2, 1], "y": [0, 3]}, {"x": {"a": 1, "b": -1}, "y": {"a": 1, "b": 1}})
    con = connect(tmp_path)
    assert con.execute("SELECT image_id, file, source FROM scores ORDER BY image_id").fetchall() == \
        [("x", None, None), ("y", None, None)]
