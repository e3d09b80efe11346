"""Evaluation and label audit over the prediction tables, with the SQL of `sql/` on DuckDB.

Every value from the command line reaches SQL as a bound variable (SET VARIABLE name = ?),
never as text pasted into a query.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

import sql as sqlfiles


class PredictionsError(ValueError):
    pass


def connect(pred_dir: str | Path) -> duckdb.DuckDBPyConnection:
    pred_dir = Path(pred_dir)
    for name in ("scores", "labels", "tags", "errors", "vocab"):
        if not (pred_dir / name).is_dir():
            raise PredictionsError(f"{pred_dir} is not a prediction folder: {name}/ is missing")
    con = duckdb.connect()
    set_vars(con, pred=str(pred_dir.resolve()))
    con.execute(sqlfiles.load("views"))
    return con


def set_vars(con: duckdb.DuckDBPyConnection, **values) -> None:
    for name, value in values.items():
        if not name.isidentifier():
            raise ValueError(f"bad variable name {name!r}")
        con.execute(f"SET VARIABLE {name} = ?", [value])  # the name is ours; the value is bound


def run(con, name: str, **variables):
    set_vars(con, **variables)
    return con.execute(sqlfiles.load(name))


def ap_per_class(con, zsl: bool) -> None:
    """Materialise the per-class APs of a setting as the temp table `ap_per_class`."""
    set_vars(con, zsl=zsl)
    con.execute("CREATE OR REPLACE TEMP TABLE ap_per_class AS " + sqlfiles.load("eval_ap_per_class").rstrip().rstrip(";"))


def evaluate(pred_dir: str | Path, ks=(3, 5), legacy: bool = False) -> dict:
    """{"zsl"|"gzsl": {"mAP": .., "P@k": .., "R@k": .., "F1@k": .., "images": n, "classes": n},
    "seen": {"mAP": .., "classes": n}} as fractions; "seen" is the mAP of the seen classes alone
    (the classes a model was trained on), present when the vocabulary has unseen classes."""
    con = connect(pred_dir)
    has_unseen = con.execute("SELECT count(*) FROM vocab WHERE unseen").fetchone()[0] > 0
    out = {}
    for setting, zsl in (("zsl", True), ("gzsl", False)):
        if zsl and not has_unseen:
            continue
        ap_per_class(con, zsl)
        set_vars(con, legacy=legacy, seen_only=False)
        m, with_pos, n_classes = con.execute(sqlfiles.load("eval_map")).fetchone()
        row = {"mAP": float("nan") if m is None else float(m), "classes": int(n_classes),
               "classes_with_positives": int(with_pos)}
        for k in ks:
            p, r, f1, _, n_images, _ = run(con, "eval_prf_at_k", zsl=zsl, k=int(k)).fetchone()
            row.update({f"P@{k}": p, f"R@{k}": r, f"F1@{k}": f1})
            row["images"] = int(n_images)
        out[setting] = row
    if has_unseen:  # ap_per_class holds the GZSL classes now
        m, with_pos, n_classes = run(con, "eval_map", legacy=legacy, seen_only=True).fetchone()
        out["seen"] = {"mAP": float("nan") if m is None else float(m), "classes": int(n_classes),
                       "classes_with_positives": int(with_pos)}
    return out


def format_table(results: dict, ks) -> str:
    cols = ["mAP"] + [f"{m}@{k}" for k in ks for m in ("P", "R", "F1")]
    lines = ["setting  " + "  ".join(f"{c:>7}" for c in cols)]
    for setting, row in results.items():
        lines.append(f"{setting.upper():<7}  " + "  ".join(f"{100 * row[c]:7.2f}" if c in row else f"{'':>7}"
                                                          for c in cols))
    return "\n".join(lines)


def audit(pred_dir: str | Path, top: int = 3, limit: int = 50, temperature: float = 0.1) -> dict:
    """The four audit queries as lists of dicts."""
    con = connect(pred_dir)

    def rows(name, **v):
        cur = run(con, name, **v)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    return {
        "missing": rows("audit_missing_labels", top=top, max_rows=limit),
        "wrong": rows("audit_wrong_labels", top=top, max_rows=limit),
        "classes": rows("audit_class_disagreement", top=top),
        "images": rows("audit_image_quality", temperature=temperature, max_rows=limit),
    }
