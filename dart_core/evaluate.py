"""Evaluation and label audit over the prediction tables, with the SQL of `sql/` on DuckDB.

Every value from the command line reaches SQL as a bound variable (SET VARIABLE name = ?),
never as text pasted into a query.

PRED may be a local folder or an s3:// prefix. DuckDB reads s3:// only through its `httpfs`
extension, which it downloads at run time, so `connect` does not use it: it mirrors the finished
shards of an s3:// PRED (the objects named by their done markers, plus vocab/) into a local cache
through dart_core.storage (boto3: the usual AWS environment, AWS_ENDPOINT_URL(_S3) for MinIO),
fetching only objects whose ETag changed, and runs the same views over the mirror
(docs/annotate.md: why, and the figures).
"""
from __future__ import annotations

import json
from pathlib import Path

import duckdb

import sql as sqlfiles
from dart_core.settings import settings


class PredictionsError(ValueError):
    pass


def connect(pred_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views of sql/views.sql over PRED (local folder or s3://):
    scores, tags, labels, errors (finished shards only), vocab, scores_long, ranked, judged."""
    from dart_core import storage

    if storage.is_s3(pred_dir):
        local = mirror(str(pred_dir))
    else:
        local = Path(pred_dir)
        for name in ("scores", "labels", "tags", "errors", "vocab"):
            if not (local / name).is_dir():
                raise PredictionsError(f"{pred_dir} is not a prediction folder: {name}/ is missing")
    if not any(local.glob("_done/*.json")):
        raise PredictionsError(f"{pred_dir} has no finished shard yet (no _done/ marker): nothing to read")
    con = duckdb.connect()
    set_vars(con, pred=str(local.resolve()))
    con.execute(sqlfiles.load("views"))
    return con


def cache_dir(pred_url: str) -> Path:
    """The local mirror of an s3:// PRED: $DART_CACHE_DIR (default ~/.cache/dart)/pred/<hash of the URL>."""
    import hashlib

    root = settings().cache_dir
    return root / "pred" / hashlib.sha256(pred_url.rstrip("/").encode()).hexdigest()[:16]


def mirror(pred_url: str) -> Path:
    """Bring the local mirror of an s3:// PRED up to date and return it: one listing of PRED, then
    (in parallel) every object of a finished shard, its done marker, vocab/ and run.json whose ETag
    differs from the mirror's copy; files no longer wanted are removed. A shard without a done
    marker is not fetched (it is being written, or its run stopped)."""
    import fcntl
    import json
    from concurrent.futures import ThreadPoolExecutor

    from dart_core import storage
    from dart_core.predictions import TABLES

    root = cache_dir(pred_url)
    root.mkdir(parents=True, exist_ok=True)
    # listed in key order: _done/ before the tables, so a marker seen here has its parts listed too
    objects = {o.key: o for o in storage.list_objects(pred_url)}
    if "vocab/vocab.parquet" not in objects:
        raise PredictionsError(f"{pred_url} is not a prediction folder: vocab/vocab.parquet is missing")
    done = [k[len("_done/"):-len(".json")] for k in objects
            if k.startswith("_done/") and k.endswith(".json") and k.count("/") == 1]
    want = [k for k in ("vocab/vocab.parquet", "run.json") if k in objects] + [f"_done/{s}.json" for s in done]
    want += [k for t in TABLES for s in done if (k := f"{t}/shard={s}/part.parquet") in objects]
    with open(root / ".lock", "a+") as lock:  # one sync of this mirror at a time (processes on this machine)
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest_file = root / ".etags.json"
        try:
            manifest = json.loads(manifest_file.read_text())
        except (FileNotFoundError, ValueError):
            manifest = {}

        def fetch(key: str) -> None:
            local = root / key
            if manifest.get(key) == objects[key].etag and local.is_file():
                return
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.part")
            try:
                storage.download_file(objects[key].url, tmp)
            except FileNotFoundError:
                raise PredictionsError(f"{objects[key].url} disappeared while reading {pred_url} "
                                       "(a `--mode overwrite` run?); try again") from None
            tmp.replace(local)

        threads = settings().s3_read_threads
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(fetch, want))
        keep = set(want)
        for p in sorted(root.rglob("*"), reverse=True):  # files first, then the folders they leave empty
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in keep and rel not in (".lock", ".etags.json"):
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        for name in ("scores", "labels", "tags", "errors", "vocab", "_done"):
            (root / name).mkdir(exist_ok=True)  # a PRED with no finished shard has empty tables
        tmp = manifest_file.with_name(".etags.json.tmp")
        tmp.write_text(json.dumps({k: objects[k].etag for k in want}))
        tmp.replace(manifest_file)
    return root


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


def labelled(pred_dir: str | Path, corrections=None) -> tuple[duckdb.DuckDBPyConnection, dict | None]:
    """connect(pred_dir), with a dart_core.corrections.Corrections applied on top of the shard labels
    when given (sql/corrections.sql); the second value: what the corrections changed (None without)."""
    con = connect(pred_dir)
    if corrections is None:
        return con, None
    from dart_core.corrections import apply

    return con, {**corrections.meta(), **apply(con, corrections)}


def evaluate(pred_dir: str | Path, ks=(3, 5), legacy: bool = False, corrections=None) -> dict:
    """{"zsl"|"gzsl": {"mAP": .., "P@k": .., "R@k": .., "F1@k": .., "classes": n,
    "classes_with_positives": n, "images": n, "labelled_images": n}, "seen": {"mAP": .., counts}}
    as fractions; "seen" is the mAP of the seen classes alone (the classes a model was trained on),
    present when the vocabulary has unseen classes. `images`: scored images (P/R/F1@K count them
    all); `labelled_images`: those with a known label for one of the setting's classes.
    With `corrections` (dart_core.corrections.Corrections) the labels are the shard labels with the
    corrections on top, and "labels" records the file, its sha256 and what it changed."""
    con, applied = labelled(pred_dir, corrections)
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
        row.update(_image_counts(con, zsl=zsl, seen_only=False))
        out[setting] = row
    if has_unseen:  # ap_per_class holds the GZSL classes now
        m, with_pos, n_classes = run(con, "eval_map", legacy=legacy, seen_only=True).fetchone()
        out["seen"] = {"mAP": float("nan") if m is None else float(m), "classes": int(n_classes),
                       "classes_with_positives": int(with_pos), **_image_counts(con, zsl=False, seen_only=True)}
    if applied is not None:
        out["labels"] = applied
    return out


SETTINGS = ("zsl", "gzsl", "seen")  # the rows of `evaluate`'s result ("labels": what labels it used)


def _image_counts(con, **variables) -> dict:
    images, labelled = run(con, "eval_counts", **variables).fetchone()
    return {"images": int(images), "labelled_images": int(labelled)}


def format_table(results: dict, ks) -> str:
    """Percentages per setting, then what they rest on: classes with a positive label of the
    setting's classes, and images with a known label in the setting of the images scored."""
    cols = ["mAP"] + [f"{m}@{k}" for k in ks for m in ("P", "R", "F1")]
    lines = ["setting  " + "  ".join(f"{c:>7}" for c in cols) + f"  {'classes':>11}  {'images':>15}"]
    for setting, row in results.items():
        if setting not in SETTINGS:
            continue
        classes = f"{row['classes_with_positives']}/{row['classes']}"
        images = f"{row['labelled_images']}/{row['images']}" if "labelled_images" in row else ""
        counts = f"  {classes:>11}  {images:>15}"
        lines.append(f"{setting.upper():<7}  " + "  ".join(f"{100 * row[c]:7.2f}" if c in row else f"{'':>7}"
                                                          for c in cols) + counts)
    lines.append("classes: with a positive label / in the setting; images: with a known label in the setting / scored")
    return "\n".join(lines)


def _names(rows: list, most: int = 3) -> str:
    names = ", ".join(str(r) for r in rows[:most])
    return names + (f", … ({len(rows) - most} more)" if len(rows) > most else "")


def doubts(pred_dir: str | Path, legacy: bool = False, corrections=None) -> list[str]:
    """Why the numbers of `evaluate` may not mean what they seem, one line each (no line: none):
    shards of the run that have no finished output, classes without a negative label (AP 1
    whatever the scores) and classes without a positive label (no AP)."""
    import json

    from dart_core.data.shard_format import shard_id
    from dart_core.predictions import done_shards

    from dart_core import storage

    out = []
    run_file = storage.join(pred_dir, "run.json")
    try:
        run_doc = json.loads(storage.read_bytes(run_file))
    except FileNotFoundError:
        run_doc = None
    if run_doc is None:
        out.append(f"{run_file} is missing: cannot tell whether every shard of the run was annotated")
    else:
        wanted = [shard_id(u) for u in run_doc.get("shards", [])]
        finished = set(done_shards(pred_dir))  # the views count these shards only
        missing = [s for s in wanted if s not in finished]
        if missing:
            out.append(f"{pred_dir}: {len(wanted) - len(missing)} of {len(wanted)} shards of the run are finished; "
                       f"not finished: {_names(missing)}; the numbers do not cover the whole run "
                       "(rerun the same `dart annotate` to finish it)")
    con, _ = labelled(pred_dir, corrections)
    rows = run(con, "eval_class_labels").fetchall()
    no_neg = [name for _, _, name, _, pos, neg in rows if pos and not neg]
    no_pos = [name for _, _, name, _, pos, _ in rows if not pos]
    if no_neg:
        out.append(f"{len(no_neg)} of {len(rows)} classes have no negative label ({_names(no_neg)}): their AP is "
                   "100 whatever the scores; if the label files list only the classes present, shard them with "
                   "absent classes as negatives (`dart shard --absent negative`, the default)")
    if no_pos:
        fate = "count as AP 0 (--legacy)" if legacy else "are left out of mAP"
        out.append(f"{len(no_pos)} of {len(rows)} classes have no positive label ({_names(no_pos)}): they {fate}")
    return out


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


def write_eval(res: dict, json_out: str) -> None:
    """JSON at `json_out` and the same table as CSV beside it (percent, as the paper's tables)."""
    import csv
    import io

    from dart_core import storage

    storage.write_bytes(json_out, json.dumps(res, indent=1).encode())  # local or s3://
    rows = {k: v for k, v in res.items() if k in SETTINGS}  # "labels" (corrections used) is in the JSON only
    cols = sorted({k for row in rows.values() for k in row})
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["setting"] + cols)
    for setting, row in rows.items():
        w.writerow([setting] + ["" if c not in row else round(100 * row[c], 4) if c == "mAP" or "@" in c
                                else row[c] for c in cols])
    head, _, name = str(json_out).rpartition("/")
    csv_name = (name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name) + ".csv"  # Path.with_suffix
    storage.write_bytes(f"{head}/{csv_name}" if head else csv_name, f.getvalue().encode())
