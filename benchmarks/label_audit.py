"""How many real label errors does `dart audit` find? Inject known errors and measure.

    python benchmarks/label_audit.py --demo WORKDIR [--seed 0 --seed 1 --seed 2] [--split test]
        [--positive-rate 0.03] [--negative-rate 0.03] [--out DIR] [--json OUT.json]

WORKDIR is a finished `dart demo --workdir WORKDIR` (shards/, runs/dart/model.pt, predictions/dart/
run.json for its CRG); build one from scratch with `dart demo --workdir WORKDIR` (~17 min on 2 cores).
Per seed: copy the split's shards with a known share of the labels flipped (positive-rate of the
known positives dropped to negative, negative-rate of the known negatives turned positive, chosen
by the seed), run `annotate` (the flow, with the demo's trained DART) on them, then score every
known label with each ranking and report precision and recall of the injected errors among the top
1 %, 2 % and 5 % of the known labels:

- before (report order): the old report's lists (sql/audit_missing_labels.sql then
  sql/audit_wrong_labels.sql: rank in the image, raw score);
- percentile self-confidence: sql/audit_image_quality.sql's per-label score (the image's score
  percentile within the class: p for a positive, 1 - p for a negative);
- sql (ours): sql/audit_calibrated.sql, a per-class calibrated probability in DuckDB alone
  (dart audit's default);
- cleanlab: cleanlab's per-class label-quality score on per-class Platt-calibrated probabilities
  (dart audit --method cleanlab), and, to show what calibration does, on the uncalibrated
  sigmoid(score);
- each of sql / cleanlab also with the report's per-class cap (3 x the fair share of the cut);
- cleanlab find_multilabel_issues_per_class (confident learning) on the calibrated probabilities:
  its own flagged set (its size is its own choice), precision and recall.
The predictions do not depend on the labels, so every ranking sees the same scores. The injection,
the annotation and the sql / cleanlab rows are dart_core.audit.measure_label_noise, the same function
`dart demo --label-noise SHARE` runs; the other rankings are computed here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the library's measure (dart_core.audit.measure_label_noise, also `dart demo --label-noise`) gives the
# sql and cleanlab rows; this file adds the other rankings, scored at the same cuts
LIBRARY_ROWS = {"sql": "sql (ours; dart audit default)",
                "sql + per-class cap": "sql (ours; dart audit default) + per-class cap",
                "cleanlab": "cleanlab (Platt-calibrated p)",
                "cleanlab + per-class cap": "cleanlab (Platt-calibrated p) + per-class cap"}


def rankings(pred: str, flipped: set, measured: dict) -> dict:
    """The figures of every ranking: the library's (`measured`, from measure_label_noise) and the
    others computed here ({"pr": {name: [(P, R) per share]}, "top1_max_class_share", "find_issues",
    "known_labels", "errors"})."""
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class

    from dart_core import audit as A
    from dart_core.evaluate import audit as old_audit, connect

    con = connect(pred)
    keys, S, Y = A.dense(con)
    ids = [r[0] for r in con.execute("SELECT class_id FROM vocab ORDER BY class_index").fetchall()]
    known = Y != 0
    n_known = int(known.sum())
    err = np.zeros(Y.shape, dtype=bool)
    index = {k[1]: i for i, k in enumerate(keys)}
    col = {c: j for j, c in enumerate(ids)}
    for key, cid in flipped:
        err[index[key], col[cid]] = True
    n_err = int(err.sum())
    assert (n_known, n_err) == (measured["known_labels"], measured["errors"]), "library and benchmark count apart"
    pr, share = {}, {}
    top1 = int(round(A.NOISE_SHARES[0] * n_known))

    def from_matrix(name, susp):
        s = np.where(known, susp, -np.inf).ravel()
        order = np.argsort(-s, kind="stable")[:n_known]
        share[name] = A._max_share((order[:top1] % S.shape[1]).tolist())
        pr[name] = A.precision_recall_at(err.ravel()[order], n_known, n_err)

    # before: the old report's two lists, in page order, known labels only
    old = old_audit(pred, top=3, limit=n_known)
    rows = [r for r in old["missing"] + old["wrong"] if int(r["label"]) != 0]
    name = "before (report order)"
    share[name] = A._max_share([r["class_id"] for r in rows[:top1]])
    pr[name] = A.precision_recall_at([err[index[r["image_id"]], col[r["class_id"]]] for r in rows], n_known, n_err)
    # the old per-label self-confidence of audit_image_quality.sql (score percentile within the class)
    ranks = (np.argsort(np.argsort(S, axis=0, kind="stable"), axis=0)).astype(np.float64)
    pct = ranks / max(1, len(S) - 1)
    from_matrix("percentile self-confidence", np.where(Y == 1, 1 - pct, pct))
    for lib_name, name in LIBRARY_ROWS.items():  # each cut on its own list (the capped list depends on its length)
        cuts = measured["rankings"][lib_name]
        pr[name] = [(c["precision"], c["recall"]) for c in cuts]
        share[name] = cuts[0]["max_class_share"]
    P, ok = A.platt(S, Y)
    sig = 1 / (1 + np.exp(-S))
    from_matrix("cleanlab on sigmoid(score), uncalibrated", A.cleanlab_suspicion(sig, Y, np.ones(S.shape[1], bool)))
    labels = [np.flatnonzero(y == 1).tolist() for y in Y]
    issues = find_multilabel_issues_per_class(labels=labels, pred_probs=P)
    M = np.stack(issues, axis=1) if isinstance(issues, list) else np.asarray(issues)
    M &= known
    find = {"flagged": int(M.sum()), "precision": float((M & err).sum() / max(1, M.sum())),
            "recall": float((M & err).sum() / max(1, err.sum()))}
    return {"pr": pr, "top1_max_class_share": share, "find_issues": find, "known_labels": n_known, "errors": n_err}


def first_rows(pred: str, n: int = 100) -> dict:
    """The most frequent class among the n pairs of the report, before (the old page: n/2 rows of
    each of its two lists) and now (the first n rows of dart audit's default list)."""
    from collections import Counter

    from dart_core.audit import run_audit
    from dart_core.evaluate import audit as old_audit

    old = old_audit(pred, top=3, limit=n // 2)  # the old page: its defaults --top 3 --limit 50, two lists
    before = [r["class_name"] for r in old["missing"] + old["wrong"]]
    now = [r["class_name"] for r in run_audit(pred, max_rows=n)["pairs"]]
    out = {}
    for name, rows in (("before", before), ("now", now)):
        cls, k = Counter(rows).most_common(1)[0]
        out[name] = {"rows": len(rows), "class": cls, "share": k / len(rows)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, help="A finished `dart demo --workdir` folder.")
    ap.add_argument("--seed", type=int, action="append", help="Flip seeds (repeat; default 0).")
    ap.add_argument("--split", default="test")
    ap.add_argument("--positive-rate", type=float, default=0.03)
    ap.add_argument("--negative-rate", type=float, default=0.03)
    ap.add_argument("--out", default=None, help="Work folder (noisy shards, predictions, results.json; default: WORKDIR/label-audit).")
    ap.add_argument("--json", default=None, help="Write the figures here (default OUT/results.json).")
    a = ap.parse_args(argv)
    a.out = a.out or os.path.join(a.demo, "label-audit")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from dart_core.audit import NOISE_SHARES as SHARES, measure_label_noise
    from dart_core.options.annotate import AnnotateOptions
    from dart_core.options.demo import DEMO_ANNOTATE
    from flows.annotate import annotate_flow

    demo = Path(a.demo).resolve()
    run = json.loads((demo / "predictions" / "dart" / "run.json").read_text())
    ckpt, crg = run["checkpoint"], run.get("crg")
    classes = demo / "shards" / "classes.csv"
    seeds = a.seed or [0]
    out = Path(a.out)
    results = {"command": "python benchmarks/label_audit.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "demo": str(demo), "split": a.split, "positive_rate": a.positive_rate,
               "negative_rate": a.negative_rate, "seeds": {}}

    def annotate(noisy: str, pred: str) -> None:
        annotate_flow(AnnotateOptions(checkpoint=ckpt, shards=noisy, classes=classes, out=pred, crg=crg,
                                      **DEMO_ANNOTATE))

    for seed in seeds:
        t0 = time.time()
        m = measure_label_noise(demo / "shards" / a.split, out / f"seed{seed}", annotate, seed, a.positive_rate,
                                a.negative_rate, capped=True)
        r = rankings(m["pred"], m["flipped"], m)
        r["seconds"] = round(time.time() - t0, 1)
        results["seeds"][seed] = r
        print(f"\nseed {seed}: {r['errors']} injected errors among {r['known_labels']} known labels "
              f"({a.positive_rate:.0%} of positives, {a.negative_rate:.0%} of negatives flipped), {r['seconds']} s")
        print(f"{'ranking':<52}" + "".join(f"  top {q:.0%} P / R " for q in SHARES) + "  top-1% max class share")
        for name, prs in r["pr"].items():
            share = r.get("top1_max_class_share", {}).get(name)
            print(f"{name:<52}" + "".join(f"  {p:5.2f} / {rec:4.2f}" for p, rec in prs)
                  + (f"  {share:.2f}" if share is not None else ""))
        fi = r["find_issues"]
        print(f"{'cleanlab find_multilabel_issues_per_class':<52}  flags {fi['flagged']}: "
              f"P {fi['precision']:.2f} / R {fi['recall']:.2f}")
    results["unmodified"] = first_rows(str(demo / "predictions" / "dart"))
    u = results["unmodified"]
    print(f"\nthe demo's own predictions ({demo / 'predictions' / 'dart'}), 100 pairs of the report: "
          f"before {u['before']['rows']} rows, most frequent class {u['before']['class']} "
          f"({u['before']['share']:.0%}); now {u['now']['rows']} rows, {u['now']['class']} ({u['now']['share']:.0%})")
    names = list(next(iter(results["seeds"].values()))["pr"])
    mean = {n: [tuple(float(np.mean([results["seeds"][s]["pr"][n][i][j] for s in seeds])) for j in (0, 1))
                for i in range(len(SHARES))] for n in names}
    results["mean"] = mean
    if len(seeds) > 1:
        print(f"\nmean over seeds {seeds}")
        for name, prs in mean.items():
            print(f"{name:<52}" + "".join(f"  {p:5.2f} / {rec:4.2f}" for p, rec in prs))
    path = Path(a.json) if a.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nfigures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
