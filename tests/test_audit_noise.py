"""The audit measured on known label errors (dart_core.audit.measure_label_noise: what
`dart demo --label-noise` and benchmarks/label_audit.py run), on the tiny fixtures: exact counts of
the injected errors, the flagged labels at each cut, precision and recall."""
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dart_core.audit import noise_figures, precision_recall_at, score_pairs
from tests.annotate_fixtures import make_shards, world  # noqa: F401
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401


def shard_labels(folder: Path) -> dict[tuple[str, str], int]:
    """{(sample key, class id): label} of every known label of a shard folder."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    out.update({(meta["id"], c): v for c, v in meta["labels"].items() if v != 0})
    return out


def test_precision_recall_by_hand():
    ranking = [1, 1, 0, 1, 0, 0, 0, 0, 0, 1]  # 5 errors in all (one is never ranked), 100 known labels
    got = precision_recall_at(ranking, 100, 5, shares=(0.02, 0.05, 0.10, 0.20, 0.001))
    # cuts of 2, 5, 10, 20 (the ranking holds 10: the other 10 are misses) and 0 labels
    assert got == [(1.0, 0.4), (0.6, 0.6), (0.4, 0.8), (0.2, 0.8), (None, 0.0)]
    assert precision_recall_at([0, 0], 100, 0, shares=(0.02,)) == [(0.0, None)]


@pytest.fixture(scope="module")
def noisy(world, tmp_path_factory, prefect_harness):  # noqa: F811
    from dart_core.audit import measure_label_noise
    from dart_core.options.annotate import AnnotateOptions
    from flows.annotate import annotate_flow

    root = tmp_path_factory.mktemp("noise")
    make_shards(root / "clean" / "val", n_shards=2, per_shard=6)  # 12 images: 2 positives, 1 negative, 1 unknown each

    def annotate(shards: str, pred: str) -> None:
        annotate_flow(AnnotateOptions(checkpoint=world["checkpoint"], shards=shards, classes=world["classes"], out=pred,
                                      crg=world["crg"], batch_size=8, top_m=4, mode="overwrite"))

    res = measure_label_noise(root / "clean" / "val", root / "out", annotate, seed=0, pos_rate=0.25, neg_rate=0.25,
                              shares=(0.25, 0.5, 1.0), capped=True, pairs=True)
    return {"res": res, "root": root, "clean": shard_labels(root / "clean" / "val"),
            "noisy": shard_labels(root / "out" / "shards" / "val")}


def test_injected_errors_are_counted_exactly(noisy):
    res, clean, flipped = noisy["res"], noisy["clean"], noisy["res"]["flipped"]
    assert len(clean) == 36 and sum(v == 1 for v in clean.values()) == 24  # 24 positives, 12 negatives
    # round(0.25 x 24) = 6 positives dropped, round(0.25 x 12) = 3 negatives turned positive
    assert res["injected"] == res["errors"] == len(flipped) == 9 and res["known_labels"] == 36
    assert sum(clean[p] == 1 for p in flipped) == 6 == res["errors_now_absent"] and res["errors_now_present"] == 3
    # the copy differs from the clean shards exactly on the flipped labels, and the clean ones are untouched
    assert {p for p in clean if noisy["noisy"][p] != clean[p]} == flipped and set(noisy["noisy"]) == set(clean)
    assert res["pred"] == str(noisy["root"] / "out" / "pred") and Path(res["shards"]).name == "val"


def test_flagged_labels_and_their_precision_recall(noisy):
    res, known, flipped = noisy["res"], noisy["noisy"], noisy["res"]["flipped"]
    # only classes with both a positive and a negative label are calibrated, hence ranked
    classes = {c for _, c in known}
    rankable = sum(1 for _, c in known if {known[p] for p in known if p[1] == c} == {1, -1})
    errors_rankable = sum(1 for p in flipped if {known[q] for q in known if q[1] == p[1]} == {1, -1})
    assert set(res["rankings"]) == {"sql", "sql + per-class cap", "cleanlab", "cleanlab + per-class cap"}
    for name, cuts in res["rankings"].items():
        assert [c["cut"] for c in cuts] == [9, 18, 36] and [c["share"] for c in cuts] == [0.25, 0.5, 1.0]
        for c in cuts:
            flags = [tuple(p) for p in c["pairs"]]
            assert len(flags) == len(set(flags)) == c["flagged"]
            assert set(flags) <= set(known)  # known labels of scored images only, never an unlabelled pair
            if "cap" not in name:
                assert c["flagged"] == min(c["cut"], rankable)
            else:  # the report's cap: 3 x the cut / 4 classes, at least 1
                per = max(1, -(-3 * c["cut"] // len(classes)))
                assert all(sum(f[1] == k for f in flags) <= per for k in classes)
            assert c["hits"] == len(set(flags) & flipped)
            assert c["precision"] == c["hits"] / c["cut"] and c["recall"] == c["hits"] / 9
        if "cap" not in name:  # one ranking: each cut is a prefix of the next
            assert cuts[0]["pairs"] == cuts[1]["pairs"][:len(cuts[0]["pairs"])]
            # all known labels flagged (every class has both labels here): every error found, P = 9 / 36
            assert rankable == 36 and cuts[2]["hits"] == errors_rankable == 9
            assert (cuts[2]["precision"], cuts[2]["recall"]) == (0.25, 1.0)


def test_sql_ranking_is_pair_scores_by_suspicion(noisy):
    """The sql cuts are the known labels in pair_scores' order (suspicion, then shard, image, class)."""
    from dart_core.evaluate import connect

    con = connect(noisy["res"]["pred"])
    score_pairs(con, "sql")
    order = con.execute("SELECT p.image_id, v.class_id FROM pair_scores p JOIN vocab v USING (class_index) "
                        "WHERE label <> 0 ORDER BY suspicion DESC, shard, image_id, class_index").fetchall()
    for c in noisy["res"]["rankings"]["sql"]:
        assert [tuple(p) for p in c["pairs"]] == [tuple(r) for r in order[:c["cut"]]]
    # the same folder measured again (no injection, no annotation): the same figures
    again = noise_figures(noisy["res"]["pred"], noisy["res"]["flipped"], methods=("sql",), shares=(0.25, 0.5, 1.0))
    first = [{k: v for k, v in c.items() if k != "pairs"} for c in noisy["res"]["rankings"]["sql"]]
    assert first == again["rankings"]["sql"]


def fake_results(**extra) -> dict:
    row = {"zsl": {"mAP": 0.5, "F1@3": 0.4, "F1@5": 0.3}, "gzsl": {"mAP": 0.6, "F1@3": 0.4, "F1@5": 0.5},
           "localization": {"zsl": 0.4, "gzsl": 0.4}, "seen": {"mAP": 0.7}}
    return {"crg_source": "world", "vlp": "vlp.pt", "train_seeds": [0], "zero_shot": row, "dart": row,
            "report": "r/index.html", "seconds": 1.0, **extra}


NOISE = {"seed": 0, "positive_rate": 0.03, "negative_rate": 0.03, "known_labels": 1000, "errors": 30,
         "shares": [0.01, 0.02, 0.05],
         "rankings": {name: [{"cut": n, "precision": p, "recall": r} for n, p, r in cuts] for name, cuts in {
             "sql": [(10, 1.0, 1 / 3), (20, 0.75, 0.5), (50, 0.4, 2 / 3)],
             "cleanlab": [(10, 0.9, 0.3), (20, 0.7, 14 / 30), (50, 0.4, 2 / 3)]}.items()}}


def test_demo_label_noise_option(monkeypatch):
    """`dart demo --label-noise SHARE` passes the share to the flow and prints the table after the
    demo's; without it the flow gets 0 (off) and the output is the demo's table alone."""
    import flows.demo
    from flows.cli import app
    from flows.demo import format_label_noise, format_results

    calls = []

    def fake_flow(options):
        calls.append(options.label_noise)
        return fake_results(label_noise=NOISE) if options.label_noise else fake_results()

    monkeypatch.setattr(flows.demo, "demo_flow", fake_flow)
    plain = CliRunner().invoke(app, ["demo", "--workdir", "W"])
    assert plain.exit_code == 0, plain.output
    assert calls == [0.0] and format_results(fake_results()) in plain.output and "label noise" not in plain.output
    noisy = CliRunner().invoke(app, ["demo", "--workdir", "W", "--label-noise", "0.03"])
    assert noisy.exit_code == 0, noisy.output
    assert calls[-1] == 0.03  # the demo's output, then the table, before the report line
    assert noisy.output == plain.output.replace("\naudit report", f"\n{format_label_noise(NOISE)}\n\naudit report")
    table = format_label_noise(NOISE).splitlines()
    assert table[0].endswith("30 errors among 1,000 known labels")
    assert table[2].split()[3:] == ["default)", "1.00", "/", "0.33", "0.75", "/", "0.50", "0.40", "/", "0.67"]
    assert table[-1].split() == ["best", "possible", "1.00", "/", "0.33", "1.00", "/", "0.67", "0.60", "/", "1.00"]
    bad = CliRunner().invoke(app, ["demo", "--label-noise", "1.5"])
    assert bad.exit_code == 2 and len(calls) == 2
