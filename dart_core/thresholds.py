"""Per-class score thresholds: calibrated on a labelled split (max F1) and read from thresholds.csv
(`dart annotate --thresholds`); annotate marks each tag above its class's threshold."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dart_core.metrics import ranked_known
from dart_core.predictions import AnnotateError
from dart_core.vocab import Vocabulary


def calibrate_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the score threshold maximising F1 on a labelled split (unknown labels ignored).

    Returns (thresholds, best F1); NaN for a class without a positive. The threshold is the score of
    the last positive kept, so `score >= threshold` reproduces the best F1 exactly."""
    N, C = scores.shape
    th = np.full(C, np.nan)
    best = np.full(C, np.nan)
    for c in range(C):
        s_sorted, hits, n_pos = ranked_known(scores, labels, c)
        if n_pos == 0:
            continue
        tp = np.cumsum(hits)
        k = np.arange(1, len(s_sorted) + 1)
        # cut only where the next score differs (a threshold cannot split tied scores)
        cut = np.r_[s_sorted[1:] != s_sorted[:-1], True]
        f1 = np.where(cut, 2 * tp / (k + n_pos), -1.0)
        i = int(np.argmax(f1))
        th[c], best[c] = s_sorted[i], f1[i]
    return th, best


def read_thresholds(path: str | Path, vocab: Vocabulary) -> np.ndarray:
    """thresholds.csv (class_id,threshold[,f1]) -> (C,) array aligned with `vocab` (NaN where absent)."""
    import csv

    th = np.full(len(vocab), np.nan)
    index = {cid: i for i, cid in enumerate(vocab.ids)}
    import io

    from dart_core import storage

    with io.StringIO(storage.read_bytes(path).decode("utf-8-sig"), newline="") as f:  # local or s3://
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            cid = row.get("class_id", "")
            if cid not in index:
                continue  # a class of another vocabulary version: not used here
            try:
                th[index[cid]] = float(row["threshold"]) if row["threshold"] not in ("", "nan") else np.nan
            except (KeyError, ValueError):
                raise AnnotateError(f"{path} line {lineno}: threshold {row.get('threshold')!r} is not a number") from None
    return th


def calibrate_predictions(pred: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`dart calibrate`: per-class thresholds (max F1) from a prediction folder of a labelled split,
    local or s3://. Returns (class ids in vocabulary order, thresholds, best F1)."""
    from dart_core.audit import dense
    from dart_core.evaluate import connect

    con = connect(pred)
    ids = [r[0] for r in con.execute("SELECT class_id FROM vocab ORDER BY class_index").fetchall()]
    _, scores, labels = dense(con)  # the (images x classes) scores and known labels the audit ranks too
    th, f1 = calibrate_thresholds(scores, labels)
    return ids, th, f1


def write_thresholds(out: str | Path, ids: list[str], th: np.ndarray, f1: np.ndarray) -> None:
    """thresholds.csv (class_id,threshold,f1; empty where a class has no positive), local or s3://."""
    import csv
    import io

    from dart_core import storage

    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["class_id", "threshold", "f1"])
    for cid, t, b in zip(ids, th, f1):
        w.writerow([cid, "" if np.isnan(t) else f"{t:.6g}", "" if np.isnan(b) else f"{b:.4f}"])
    storage.write_bytes(out, f.getvalue().encode())  # local (atomic) or s3://


def default_thresholds(classes: str) -> str | None:
    """thresholds.csv beside classes.csv, when there is one (`dart calibrate` writes it there)."""
    from dart_core import storage

    beside = storage.join(str(classes).rstrip("/").rsplit("/", 1)[0] if "/" in str(classes) else ".",
                          "thresholds.csv")
    return beside if storage.exists(beside) else None
