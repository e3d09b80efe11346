"""`dart annotate`, `dart eval`, `dart audit`, `dart calibrate`."""
from __future__ import annotations

import typer

from dart_core.options.annotate import AnnotateOptions, AuditOptions, EvalOptions
from flows.cli._app import app
from flows.cli._command import options_command


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@options_command(app, AnnotateOptions)
def annotate(options: AnnotateOptions) -> None:
    """Tag every image of the shards with DART and write the prediction tables (a rerun, after a crash
    or Ctrl-C, resumes: finished shards are skipped)."""
    from flows.annotate import annotate_flow

    s = annotate_flow(options)
    typer.echo(f"annotated {s['images']} images in {s['shards']} shards ({s['skipped']} already done, "
               f"{s['errors']} unreadable samples in errors/) -> {s['out']}")


@options_command(app, EvalOptions, name="eval")
def eval_(options: EvalOptions) -> None:
    """ZSL / GZSL mAP and P/R/F1@K (percent) from the prediction tables, in SQL, with the class and
    image counts behind them; `warning:` lines on stderr when the numbers are doubtful."""
    from dart_core.evaluate import format_table
    from flows.cli._run import plain_output
    from flows.evaluate import evaluate_flow

    with plain_output():  # the table and warnings are printed here, from what the flow returns
        out = evaluate_flow(options, details=True)
    res, notes = out["result"], out["warnings"]
    typer.echo(format_table(res, options.ks))
    labels = res.get("labels")
    if labels:
        typer.echo(f"labels: shard labels with {labels['corrections_rows']} corrections from {labels['corrections']} "
                   f"(sha256 {labels['corrections_sha256'][:12]}): {labels['changed']} labels changed, "
                   f"{labels['rows'] - labels['matched']} name no image scored here")
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    if options.json_out:  # written by the flow
        typer.echo(f"wrote {options.json_out}")


@options_command(app, AuditOptions)
def audit(options: AuditOptions) -> None:
    """The labels that look wrong or missing: a static HTML report (--out) and a review CSV (--export)."""
    from flows.evaluate import audit_flow

    if not options.out and not options.export:
        _fail("give --out REPORT_DIR, --export review.csv, or both")
    if options.corrections:
        from dart_core import corrections as corr

        corr.read(options.corrections)  # a bad file: one error line now, before the flow starts
    res = audit_flow(options, details=True)
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
