"""`dart annotate`, `dart eval`, `dart audit`, `dart calibrate`."""
from __future__ import annotations

from typing import List, Literal, Optional

import typer

from flows.cli import _options as check
from flows.cli._app import app


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _user_errors():
    from dart_core.backbone import BackboneError
    from dart_core.checkpoint import CheckpointError
    from dart_core.crg.graph import CRGError
    from dart_core.evaluate import PredictionsError
    from dart_core.infer import AnnotateError
    from dart_core.vocab import VocabularyError

    return (AnnotateError, CheckpointError, VocabularyError, CRGError, BackboneError, PredictionsError,
            FileNotFoundError, ValueError)


@app.command()
def annotate(
    checkpoint: str = typer.Option(..., help="model.pt from `dart train`."),
    shards: str = typer.Option(..., help="Shard folder (split subfolders included) or a .tar."),
    classes: str = typer.Option(..., help="classes.csv: may add classes never trained on."),
    out: str = typer.Option(..., help="Prediction folder or s3://bucket/prefix (scores/, tags/, labels/, errors/, vocab/, run.json)."),
    crg: Optional[str] = typer.Option(None, help="crg.json; classes it lacks get edges (LLM if configured, else similarity)."),
    task_runner: Literal["threads", "dask", "ray"] = typer.Option("threads", help="Where shard tasks run."),
    dask_address: Optional[str] = typer.Option(None, help="Scheduler address for dask/ray (default: a local cluster)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Parallel shard tasks (threads / local cluster workers)."),
    batch_size: int = typer.Option(64, min=1, help="Images per model step."),
    top_m: int = typer.Option(10, min=1, help="Tags written per image (plus every class above its threshold)."),
    device: str = typer.Option("cpu", callback=check.device, help=check.DEVICE_HELP),
    mode: Literal["new", "append", "overwrite"] = typer.Option(
        "new", help="When OUT already holds predictions: new and append continue the same run (same checkpoint, "
                    "vocabulary and CRG) and refuse another's; overwrite deletes them first."),
    thresholds: Optional[str] = typer.Option(None, help="thresholds.csv (default: beside classes.csv if present)."),
    mm_candidates: int = typer.Option(0, min=0, help="Bound the MM-ATM to each image's top-M classes (0 = all)."),
    decode_threads: Optional[int] = typer.Option(None, min=0, help="Threads decoding images beside each shard task's "
                                                                   "model (default: 1 on the CPU; on a GPU the cores shared out, at most 8)."),
) -> None:
    """Tag every image of the shards with DART and write the prediction tables (a rerun, after a crash
    or Ctrl-C, resumes: finished shards are skipped)."""
    from flows.annotate import annotate_flow

    s = annotate_flow(checkpoint, shards, classes, out, crg, task_runner, dask_address, workers, batch_size,
                      top_m, device, mode, thresholds, mm_candidates, decode_threads)
    typer.echo(f"annotated {s['images']} images in {s['shards']} shards ({s['skipped']} already done, "
               f"{s['errors']} unreadable samples in errors/) -> {s['out']}")


@app.command(name="eval")
def eval_(
    pred: str = typer.Argument(..., help="Prediction folder or s3://bucket/prefix."),
    k: List[int] = typer.Option([3, 5], "--k", min=1, help="K for P/R/F1@K (repeat: --k 3 --k 5)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the table as JSON (+ CSV beside it)."),
    legacy: bool = typer.Option(False, help="Count classes without positives as AP 0 (older papers)."),
    corrections: Optional[str] = typer.Option(None, help="Corrections file (`dart corrections`) or reviewed file "
                                                         "(`dart audit --export`, accepted rows) applied on top of the shard labels."),
) -> None:
    """ZSL / GZSL mAP and P/R/F1@K (percent) from the prediction tables, in SQL, with the class and
    image counts behind them; `warning:` lines on stderr when the numbers are doubtful."""
    from dart_core.evaluate import format_table
    from flows.cli._run import plain_output
    from flows.evaluate import evaluate_flow

    with plain_output():  # the table and warnings are printed here, from what the flow returns
        out = evaluate_flow(pred, list(k), json_out, legacy, corrections, details=True)
    res, notes = out["result"], out["warnings"]
    typer.echo(format_table(res, k))
    labels = res.get("labels")
    if labels:
        typer.echo(f"labels: shard labels with {labels['corrections_rows']} corrections from {labels['corrections']} "
                   f"(sha256 {labels['corrections_sha256'][:12]}): {labels['changed']} labels changed, "
                   f"{labels['rows'] - labels['matched']} name no image scored here")
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    if json_out:  # written by the flow
        typer.echo(f"wrote {json_out}")


@app.command()
def audit(
    pred: str = typer.Argument(..., help="Prediction folder or s3://bucket/prefix."),
    out: Optional[str] = typer.Option(None, help="Report folder (index.html + thumbnails), local."),
    export: Optional[str] = typer.Option(None, help="Write the review list as CSV (path, class, current_label, "
                                                    "suggested_label, score, reason, ..., decision) to review."),
    method: Literal["sql", "cleanlab"] = typer.Option(
        "sql", help="Ranking: a per-class calibrated probability in DuckDB SQL, or cleanlab's per-class label quality "
                    "on per-class Platt-calibrated probabilities (docs/audit.md: both measured)."),
    limit: int = typer.Option(2000, min=1, help="Rows of the review list (report and export)."),
    per_class_cap: int = typer.Option(0, min=0, help="At most this many rows per class (0: 3 x LIMIT / classes)."),
    min_suspicion: float = typer.Option(0.5, min=0, max=1, help="List only labels whose suspicion (1 - calibrated "
                                                                 "probability of the label) is at least this."),
    corrections: Optional[str] = typer.Option(None, help="Corrections applied on top of the shard labels first."),
    thumbnails: int = typer.Option(2000, min=0, help="Pictures for the first N rows of the report."),
) -> None:
    """The labels that look wrong or missing: a static HTML report (--out) and a review CSV (--export)."""
    from flows.evaluate import audit_flow

    if not out and not export:
        _fail("give --out REPORT_DIR, --export review.csv, or both")
    if corrections:
        from dart_core import corrections as corr

        corr.read(corrections)  # a bad file: one error line now, before the flow starts
    res = audit_flow(pred, out, method, limit, per_class_cap or None, min_suspicion, export, corrections, thumbnails,
                     details=True)
    m = res["meta"]
    typer.echo(f"{m['listed']} of {m['candidates']} suspicious labels listed ({m['method']}, at most "
               f"{m['per_class_cap']} per class)")
    if res["report"]:
        typer.echo(f"report: {res['report']}")
    if res["export"]:
        typer.echo(f"review file: {res['export']} ({res['pairs']} rows; fill decision with accept or reject, then "
                   f"`dart corrections {res['export']} --out corrections.csv`)")


@app.command(name="corrections")
def corrections_(
    review: str = typer.Argument(..., help="A review file from `dart audit --export` with decision = accept / reject."),
    out: str = typer.Option(..., help="Corrections file to write (image_id,class_id,label,...), local or s3://."),
) -> None:
    """Turn a reviewed file into a corrections file for `dart train --corrections` / `dart eval --corrections`."""
    from dart_core.corrections import from_review

    c = from_review(review, out)
    typer.echo(f"{c['accepted']} accepted, {c['rejected']} rejected, {c['pending']} without a decision -> "
               f"{c['written']} corrections in {out}")


@app.command()
def calibrate(
    pred: str = typer.Argument(..., help="Predictions on a labelled split (folder or s3://bucket/prefix)."),
    out: str = typer.Option(..., help="thresholds.csv to write, local or s3:// (put it beside classes.csv to use it by default)."),
) -> None:
    """Per-class decision thresholds maximising each class's F1 on a labelled split."""
    import numpy as np

    from dart_core.thresholds import calibrate_predictions, write_thresholds

    ids, th, f1 = calibrate_predictions(pred)
    write_thresholds(out, ids, th, f1)
    typer.echo(f"thresholds for {int((~np.isnan(th)).sum())} of {len(ids)} classes -> {out}")
