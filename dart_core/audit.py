"""Label audit: which (image, class) labels look wrong, scored so that classes are comparable.

Raw DART scores are not comparable across classes: each class has its own scale and base rate (on
the demo an unseen class, `snowman`, scores high on images without one, and ranking pairs by raw
score or by rank filled the whole report with it). So every pair gets a *per-class calibrated*
probability p that the class is present, and a suspicion (1 - p for a positive label, p for a
negative or unknown one):

- method "sql" (default): entirely in DuckDB (sql/audit_calibrated.sql: per class, a two-Gaussian,
  pooled-variance model of the known positives' and negatives' scores, whose posterior is logistic
  in the score). No dense matrix in Python.
- method "cleanlab": per class, a logistic curve score -> p fitted on the class's known labels
  (Platt scaling, scikit-learn), then cleanlab's per-class label-quality score
  (`cleanlab.multilabel_classification.rank.get_label_quality_scores_per_class`, self-confidence);
  suspicion = 1 - that score. Needs the N x C scores in memory.

Both were measured on injected label errors (benchmarks/label_audit.py, docs/audit.md): at the top
1 % of the labels "sql" found 0.99 vs 0.95 real errors per flag (3 seeds), at 2 % and 5 % they tie,
so "sql" is the default. (On the same probabilities cleanlab's binary self-confidence is exactly
1 - p / p: what differs is the calibration curve.) The review
list (sql/audit_suspicious.sql) keeps at most `per_class_cap` pairs per class (default: 3 times a
class's fair share of the list), so one class cannot fill it. DuckDB does the joins, filters and
counts; Python only the per-class fit and cleanlab's scores. measure_label_noise measures both on
known errors injected into a copy of a shard folder (`dart demo --label-noise`, benchmarks/label_audit.py).
"""
from __future__ import annotations

import json
import math

import numpy as np

import sql as sqlfiles

METHODS = ("sql", "cleanlab")
CAP_FACTOR = 3  # default per-class cap: CAP_FACTOR x (rows of the list / classes)


def default_cap(max_rows: int, n_classes: int) -> int:
    """At most 3 times a class's fair share of the list (rows / classes), at least 1."""
    return max(1, math.ceil(CAP_FACTOR * max_rows / max(1, n_classes)))


# ---- per-class calibration ------------------------------------------------------------------------

def platt(S: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a logistic curve p = sigmoid(a * z + b) of the class's standardised scores z,
    fitted on its known labels (Y: 1, -1; 0 unknown, not used). Returns (P (N, C), calibrated (C,)
    bool); a class without both a positive and a negative label is not calibrated (its column NaN)."""
    from sklearn.linear_model import LogisticRegression

    N, C = S.shape
    P = np.full((N, C), np.nan)
    ok = np.zeros(C, dtype=bool)
    for c in range(C):
        known = Y[:, c] != 0
        y = Y[known, c] == 1
        if y.all() or not y.any():
            continue
        s = S[:, c].astype(np.float64)
        mu, sd = s[known].mean(), s[known].std() or 1.0
        z = ((s - mu) / sd)[:, None]
        lr = LogisticRegression(C=1.0).fit(z[known], y)
        P[:, c] = lr.predict_proba(z)[:, 1]
        ok[c] = True
    return P, ok


def cleanlab_suspicion(P: np.ndarray, Y: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """1 - cleanlab's per-class label-quality score (self-confidence) of every pair; unknown labels
    count as negatives, as in cleanlab; NaN for classes that are not calibrated."""
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    out = np.full(P.shape, np.nan)
    cols = np.flatnonzero(calibrated)
    if cols.size == 0:
        return out
    sub = np.clip(P[:, cols], 0.0, 1.0)
    labels = [np.flatnonzero(row == 1).tolist() for row in Y[:, cols]]
    q = get_label_quality_scores_per_class(labels=labels, pred_probs=sub, method="self_confidence")
    out[:, cols] = 1.0 - np.asarray(q, dtype=np.float64).reshape(sub.shape)
    return out


# ---- reading the prediction tables ----------------------------------------------------------------

def dense(con) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """(keys [(shard, image_id)], scores (N, C) float64, labels (N, C) int8) of a connection from
    dart_core.evaluate.connect (corrections applied when the connection has them)."""
    rows = con.execute(sqlfiles.load("audit_matrix")).fetchall()
    keys = [(r[0], r[1]) for r in rows]
    C = con.execute("SELECT count(*) FROM vocab").fetchone()[0]
    S = np.array([r[2] for r in rows], dtype=np.float64).reshape(len(rows), C)
    Y = np.zeros(S.shape, dtype=np.int8)
    index = {k: i for i, k in enumerate(keys)}
    for shard, image_id, c, label in con.execute(sqlfiles.load("audit_known_labels")).fetchall():
        i = index.get((shard, image_id))
        if i is not None:
            Y[i, c] = label
    return keys, S, Y


def score_pairs(con, method: str = "sql") -> dict:
    """Create the table `pair_scores(shard, image_id, class_index, label, p, suspicion)` on `con`
    (every pair of a calibrated class) and return {"method", "calibrated": n classes,
    "not_calibrated": [class names]}."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "sql":
        con.execute(sqlfiles.load("audit_calibrated"))  # creates pair_scores
    else:
        import pyarrow as pa

        keys, S, Y = dense(con)
        P, ok = platt(S, Y)
        susp = cleanlab_suspicion(P, Y, ok)
        cols = np.flatnonzero(ok)
        n = len(keys)
        rows_i = np.repeat(np.arange(n), cols.size)
        cols_i = np.tile(cols, n)
        table = pa.table({
            "shard": pa.array([keys[i][0] for i in rows_i], pa.string()),
            "image_id": pa.array([keys[i][1] for i in rows_i], pa.string()),
            "class_index": pa.array(cols_i.astype(np.int32)),
            "label": pa.array(Y[rows_i, cols_i].astype(np.int32)),
            "p": pa.array(P[rows_i, cols_i]),
            "suspicion": pa.array(susp[rows_i, cols_i]),
        })
        con.register("pair_scores_arrow", table)
        con.execute("CREATE OR REPLACE TABLE pair_scores AS SELECT * FROM pair_scores_arrow")
        con.unregister("pair_scores_arrow")
    names = [r[0] for r in con.execute(
        "SELECT class_name FROM vocab WHERE class_index NOT IN (SELECT DISTINCT class_index FROM pair_scores) "
        "ORDER BY class_index").fetchall()]
    n_classes = con.execute("SELECT count(*) FROM vocab").fetchone()[0]
    return {"method": method, "calibrated": n_classes - len(names), "not_calibrated": names}


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def suspicious(con, max_rows: int, per_class_cap: int | None = None, min_suspicion: float = 0.5) -> list[dict]:
    """The review list over `pair_scores` (sql/audit_suspicious.sql), most suspicious first."""
    from dart_core.evaluate import set_vars

    if per_class_cap is None:
        per_class_cap = default_cap(max_rows, con.execute("SELECT count(*) FROM vocab").fetchone()[0])
    set_vars(con, max_rows=int(max_rows), per_class_cap=int(per_class_cap), min_suspicion=float(min_suspicion))
    rows = _dicts(con.execute(sqlfiles.load("audit_suspicious")))
    for r in rows:
        r["source"] = json.loads(r["source"]) if r.get("source") else None
    return rows


def run_audit(pred_dir, method: str = "sql", max_rows: int = 2000, per_class_cap: int | None = None,
              min_suspicion: float = 0.5, images: int = 50, temperature: float = 0.1,
              corrections=None) -> dict:
    """The audit of a prediction folder: {"pairs": the review list, "classes": per-class summary,
    "images": lowest label-quality images, "meta": how it was made}. `corrections`: a
    dart_core.corrections.Corrections applied on top of the shard labels first."""
    from dart_core.evaluate import connect, set_vars

    con = connect(pred_dir)
    applied = None
    if corrections is not None:
        from dart_core.corrections import apply

        applied = apply(con, corrections)
    info = score_pairs(con, method)
    n_classes = con.execute("SELECT count(*) FROM vocab").fetchone()[0]
    cap = per_class_cap or default_cap(max_rows, n_classes)
    pairs = suspicious(con, max_rows, cap, min_suspicion)
    set_vars(con, min_suspicion=float(min_suspicion))
    classes = _dicts(con.execute(sqlfiles.load("audit_class_summary")))
    set_vars(con, temperature=float(temperature), max_rows=int(images))
    worst = _dicts(con.execute(sqlfiles.load("audit_image_scores")))
    n_candidates = con.execute(
        "SELECT count(*) FROM pair_scores WHERE suspicion >= ? AND (label <> 0 OR p >= 0.5)", [min_suspicion]).fetchone()[0]
    meta = {**info, "max_rows": max_rows, "per_class_cap": cap, "min_suspicion": min_suspicion,
            "candidates": int(n_candidates), "listed": len(pairs)}
    if corrections is not None:
        meta.update(corrections.meta(), corrections_applied=applied)
    return {"pairs": pairs, "classes": classes, "images": worst, "meta": meta}


# ---- the review file ------------------------------------------------------------------------------

def review_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as review-file rows (dart_core.corrections.REVIEW_COLUMNS); `path` is the original
    file (the sample key when the predictions do not record it)."""
    out = []
    for r in pairs:
        out.append({"path": r.get("file") or r["image_id"], "class": r["class_name"], "current_label": int(r["label"]),
                    "suggested_label": int(r["suggested_label"]), "score": f"{float(r['suspicion']):.4f}",
                    "reason": r["reason"], "kind": r["kind"], "decision": "", "shard": r["shard"],
                    "image_id": r["image_id"], "class_id": r["class_id"]})
    return out


def write_review(path, pairs: list[dict]) -> int:
    """Write the review CSV (local or s3://); returns the rows written."""
    import csv
    import io

    from dart_core import storage
    from dart_core.corrections import REVIEW_COLUMNS

    f = io.StringIO(newline="")
    w = csv.DictWriter(f, REVIEW_COLUMNS)
    w.writeheader()
    rows = review_rows(pairs)
    w.writerows(rows)
    storage.write_bytes(str(path), f.getvalue().encode())
    return len(rows)


# ---- known errors, for measuring -----------------------------------------------------------------

def inject_label_errors(src, dst, seed: int, pos_rate: float, neg_rate: float) -> set[tuple[str, str]]:
    """Copy the local shard folder `src` (NNNNNN.tar + sidecar + stats) to `dst` with known label
    errors: round(pos_rate x known positives) of them turned negative and round(neg_rate x known
    negatives) turned positive, chosen by `seed` among all (sample, class) labels of the folder in
    sorted order. Returns the flipped (sample key, class id) pairs: the truth an audit is scored on
    (benchmarks/label_audit.py, `dart demo --label-noise`)."""
    import shutil
    import tarfile
    from pathlib import Path

    from dart_core.data import shard_format as F

    src, dst = Path(src), Path(dst)

    tars = sorted(src.glob("*.tar"))
    samples = []  # (tar index, key, labels)
    for t, tar in enumerate(tars):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    samples.append((t, meta["id"], meta.get("labels") or {}))
    pos = sorted((k, c) for _, k, lab in samples for c, v in lab.items() if v == 1)
    neg = sorted((k, c) for _, k, lab in samples for c, v in lab.items() if v == -1)
    rng = np.random.default_rng(seed)
    flip_pos = {pos[i] for i in rng.choice(len(pos), int(round(pos_rate * len(pos))), replace=False)}
    flip_neg = {neg[i] for i in rng.choice(len(neg), int(round(neg_rate * len(neg))), replace=False)}
    flipped = flip_pos | flip_neg
    dst.mkdir(parents=True, exist_ok=True)
    for tar in tars:
        out = dst / tar.name
        size = 0
        with tarfile.open(tar) as tf, open(out, "wb") as f:
            for m in tf:
                data = tf.extractfile(m).read()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    key = meta["id"]
                    meta["labels"] = {c: (-v if (key, c) in flipped else v) for c, v in meta["labels"].items()}
                    data = F.sample_json(key, meta["labels"], meta.get("source") or {})
                chunk = F.tar_member(m.name, data)
                f.write(chunk)
                size += len(chunk)
            f.write(F.tar_end(size))
        for suffix in (F.SIDECAR, F.STATS):
            side = tar.with_name(tar.stem + suffix)
            if side.exists():
                shutil.copy(side, dst / side.name)
    return flipped


# the cuts the figures on known errors are given at: the top 1 / 2 / 5 % of the known labels
NOISE_SHARES = (0.01, 0.02, 0.05)


def precision_recall_at(is_error, n_known: int, n_errors: int,
                        shares=NOISE_SHARES) -> list[tuple[float | None, float | None]]:
    """(precision, recall) of the injected errors among the first round(share x n_known) entries of a
    ranking given as a 0/1 sequence ("is an injected error", most suspicious first), per share. The
    precision divides by the cut's size (a ranking shorter than the cut misses the rest); None where
    it is undefined (an empty cut; no errors for the recall)."""
    e = np.asarray(is_error, dtype=bool)
    out = []
    for q in shares:
        n = int(round(q * n_known))
        hits = int(e[:n].sum())
        out.append((hits / n if n else None, hits / n_errors if n_errors else None))
    return out


def noise_figures(pred_dir, flipped, methods=METHODS, shares=NOISE_SHARES, capped: bool = False,
                  pairs: bool = False) -> dict:
    """How well the audit finds known label errors: `flipped` are the (sample key, class id) pairs
    whose label in the prediction folder `pred_dir` is wrong (inject_label_errors). Every known label
    of a scored image is ranked by each method's suspicion (score_pairs, in the review list's order:
    sql/audit_suspicious.sql with min_suspicion 0, unlabelled pairs left out); per share q the first
    round(q x known labels) are flagged. Returns {"known_labels", "errors" (the flipped labels of
    scored images), "errors_now_present" / "errors_now_absent" (their wrong label), "shares",
    "rankings": {name: [{"share", "cut", "flagged", "hits", "precision", "recall",
    "max_class_share"(, "pairs": [[key, class id], ...])} per share]}}; with `capped` each method
    also as "<method> + per-class cap" (the report's cap: 3 x the cut / classes)."""
    import pyarrow as pa

    from dart_core.evaluate import connect

    con = connect(pred_dir)
    flipped = {(str(k), str(c)) for k, c in flipped}
    con.register("flipped_arrow", pa.table({"image_id": pa.array([k for k, _ in flipped], pa.string()),
                                             "class_id": pa.array([c for _, c in flipped], pa.string())}))
    known_sql = ("FROM labels l JOIN vocab v USING (class_id) JOIN (SELECT DISTINCT shard, image_id FROM scores) s "
                 "ON s.shard = l.shard AND s.image_id = l.image_id")
    n_known = con.execute(f"SELECT count(*) {known_sql}").fetchall()[0][0]
    n_err, n_now_pos = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE l.label = 1) {known_sql} "
        "JOIN flipped_arrow f ON f.image_id = l.image_id AND f.class_id = l.class_id").fetchall()[0]
    n_classes = con.execute("SELECT count(*) FROM vocab").fetchall()[0][0]
    con.unregister("flipped_arrow")
    out = {"known_labels": int(n_known), "errors": int(n_err), "errors_now_present": int(n_now_pos),
           "errors_now_absent": int(n_err - n_now_pos), "shares": list(shares), "rankings": {}}
    for method in methods:
        score_pairs(con, method)
        con.execute("DELETE FROM pair_scores WHERE label = 0")  # measured on the known labels only
        for cap_name in ("", " + per-class cap") if capped else ("",):
            cuts = []
            for q in shares:
                n = int(round(q * n_known))
                rows = suspicious(con, n, default_cap(n, n_classes) if cap_name else max(1, n), 0.0) if n else []
                flags = [(r["image_id"], r["class_id"]) for r in rows]
                hits = sum(f in flipped for f in flags)
                (p, r), = precision_recall_at([f in flipped for f in flags], n_known, n_err, (q,))
                cut = {"share": q, "cut": n, "flagged": len(flags), "hits": hits, "precision": p, "recall": r,
                       "max_class_share": _max_share([c for _, c in flags])}
                if pairs:
                    cut["pairs"] = [list(f) for f in flags]
                cuts.append(cut)
            out["rankings"][method + cap_name] = cuts
    return out


def _max_share(items: list) -> float:
    """The largest share one value has of `items` (0 for none)."""
    from collections import Counter

    return max(Counter(items).values()) / len(items) if items else 0.0


def measure_label_noise(shards, out, annotate, seed: int = 0, pos_rate: float = 0.03, neg_rate: float | None = None,
                        methods=METHODS, shares=NOISE_SHARES, capped: bool = False, pairs: bool = False) -> dict:
    """Inject known label errors into a copy of the local shard folder `shards` (OUT/shards/<its
    name>, replaced: inject_label_errors with `seed`, `pos_rate` of the known positives dropped,
    `neg_rate` (default: pos_rate) of the known negatives turned positive), annotate the copy into
    OUT/pred with `annotate(noisy_shards, pred_dir)` (the caller's: the `annotate` flow with a trained
    checkpoint), and measure the audit on the known errors (noise_figures). Returns noise_figures'
    dict plus "seed", "positive_rate", "negative_rate", "injected" (pairs flipped; "errors" counts
    those of scored images), "shards", "pred", "seconds", and "flipped" (the set of (sample key,
    class id) pairs: not JSON). Used by `dart demo --label-noise` and benchmarks/label_audit.py."""
    import shutil
    import time
    from pathlib import Path

    t0 = time.time()
    neg_rate = pos_rate if neg_rate is None else neg_rate
    out = Path(out)
    noisy = out / "shards" / Path(shards).name
    shutil.rmtree(noisy, ignore_errors=True)
    flipped = inject_label_errors(shards, noisy, seed, pos_rate, neg_rate)
    pred = out / "pred"
    annotate(str(noisy), str(pred))
    res = noise_figures(str(pred), flipped, methods, shares, capped, pairs)
    return {"seed": seed, "positive_rate": pos_rate, "negative_rate": neg_rate, "injected": len(flipped),
            **res, "shards": str(noisy), "pred": str(pred), "seconds": round(time.time() - t0, 1),
            "flipped": flipped}


# ---- the samples behind the rows: original files and pictures -------------------------------------

def _shard_urls(run: dict) -> dict[str, str]:
    from dart_core.data.shard_format import shard_id

    return {shard_id(url): url for url in run.get("shards", [])}


def fill_sources(pairs: list[dict], run: dict) -> int:
    """For rows without `file` (predictions written before annotate recorded it), read the original
    file and source from the shard sidecars (NNNNNN.parquet beside each tar, local or s3://).
    Returns the rows filled; a sidecar that cannot be read leaves its rows as they are."""
    import io

    import pyarrow.parquet as pq

    from dart_core import storage
    from dart_core.data.shard_format import SIDECAR, TAR

    need: dict[str, set[str]] = {}
    for r in pairs:
        if not r.get("file"):
            need.setdefault(r["shard"], set()).add(r["image_id"])
    found: dict[tuple[str, str], tuple[str | None, dict | None]] = {}
    urls = _shard_urls(run)
    for shard, keys in need.items():
        url = urls.get(shard)
        if url is None or not str(url).endswith(TAR):
            continue
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(str(url)[:-len(TAR)] + SIDECAR)),
                                  columns=["key", "path", "source"])
        except Exception:  # noqa: BLE001 - optional: the row keeps its sample key
            continue
        for key, path, src in zip(*(table.column(c).to_pylist() for c in ("key", "path", "source"))):
            if key in keys:
                try:
                    s = json.loads(src) if src else None
                except ValueError:
                    s = None
                found[(shard, key)] = ((s or {}).get("file") or path, s)
    n = 0
    for r in pairs:
        hit = None if r.get("file") else found.get((r["shard"], r["image_id"]))
        if hit:
            r["file"], r["source"] = hit[0], hit[1] or r.get("source")
            n += 1
    return n


def shard_images(url: str, keys: set[str]) -> dict[str, bytes]:
    """The jpg bytes of the samples `keys` of one shard (local or s3://), in one pass over the tar."""
    import tarfile

    from dart_core import storage
    from dart_core.data.shard_format import member_names

    wanted = {member_names(k)[0]: k for k in keys}
    out: dict[str, bytes] = {}
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            k = wanted.get(m.name)
            if k is not None:
                out[k] = tar.extractfile(m).read()
                if len(out) == len(wanted):
                    break
    return out


def pictures(pairs: list[dict], run: dict, most: int | None = None) -> dict[tuple[str, str], bytes | None]:
    """{(shard, image_id): jpg bytes} for the images of the first `most` rows (all: None); an
    unreadable shard gives no pictures for its rows."""
    need: dict[str, set[str]] = {}
    for r in pairs[:most] if most is not None else pairs:
        need.setdefault(r["shard"], set()).add(r["image_id"])
    urls = _shard_urls(run)
    out: dict[tuple[str, str], bytes | None] = {}
    for shard, keys in need.items():
        url = urls.get(shard)
        if url is None:
            continue
        try:
            got = shard_images(url, keys)
        except Exception:  # noqa: BLE001 - thumbnails are optional: the report goes on without them
            continue
        out.update({(shard, k): v for k, v in got.items()})
    return out
