"""Prefect flows `evaluate` and `audit` over a prediction folder (the SQL lives in sql/)."""
from __future__ import annotations

import json

from prefect import flow, get_run_logger, task

from dart_core.options.annotate import AuditOptions, EvalOptions


@flow(name="evaluate")
def evaluate_flow(options: EvalOptions, details: bool = False) -> dict:
    """The ZSL / GZSL / seen table of PRED (dart_core.evaluate); with `json_out`, written as JSON (+ CSV).
    Returns the table, or with details=True {"result": the table, "warnings": the doubts about it}
    (what `dart eval` prints)."""
    from dart_core import corrections as corr
    from dart_core.evaluate import doubts, evaluate, format_table, write_eval

    pred, ks, legacy, json_out = options.pred, options.ks, options.legacy, options.json_out
    fix = corr.read(options.corrections) if options.corrections else None
    res = evaluate(pred, ks, legacy, corrections=fix)
    logger = get_run_logger()
    logger.info("\n" + format_table(res, ks))
    if fix is not None:
        logger.info(f"labels: {res['labels']}")
    notes = doubts(pred, legacy, corrections=fix)
    for note in notes:
        logger.warning(note)
    if json_out:
        write_eval(res, json_out)
    return {"result": res, "warnings": notes} if details else res


@task(name="audit-score")
def audit_score(pred: str, method: str, limit: int, per_class_cap: int | None, min_suspicion: float,
                corrections: str | None) -> dict:
    from dart_core import corrections as corr
    from dart_core.audit import run_audit

    fix = corr.read(corrections) if corrections else None
    return run_audit(pred, method=method, max_rows=limit, per_class_cap=per_class_cap,
                     min_suspicion=min_suspicion, corrections=fix)


@task(name="audit-samples")
def audit_samples(result: dict, run: dict, thumbnails: int) -> dict:
    """The original files (from the shard sidecars where the predictions lack them) and pictures."""
    from dart_core.audit import fill_sources, pictures

    fill_sources(result["pairs"], run)
    return pictures(result["pairs"], run, thumbnails)


@flow(name="audit")
def audit_flow(options: AuditOptions, details: bool = False):
    """Score every label (per-class calibrated), keep the review list, write the static report at
    `out` (when given) and the review CSV at `export` (when given). Returns the report's path (the
    review file's without `out`), or with details=True {"report", "export", "pairs", "meta"}."""
    from dart_core.audit import write_review
    from dart_core.report import write_report

    from dart_core import storage

    logger = get_run_logger()
    o, out, export = options, options.out, options.export
    run = json.loads(storage.read_bytes(storage.join(o.pred, "run.json")))  # local or s3://
    result = audit_score(o.pred, o.method, o.limit, o.per_class_cap or None, o.min_suspicion, o.corrections)
    images = audit_samples(result, run, o.thumbnails if out else 0)
    meta = result["meta"]
    logger.info(f"audit ({meta['method']}): {meta['listed']} of {meta['candidates']} suspicious labels listed, "
                f"at most {meta['per_class_cap']} per class")
    if meta["not_calibrated"]:
        logger.warning(f"{len(meta['not_calibrated'])} classes have no positive or no negative label and are not "
                       f"ranked: {', '.join(meta['not_calibrated'][:5])}")
    page = None
    if out:
        page = str(write_report(out, result, run, images, tuple(run.get("grid", (14, 14)))))
        logger.info(f"audit report: {page}")
    if export:
        n = write_review(export, result["pairs"])
        logger.info(f"review file: {export} ({n} rows)")
    if details:
        return {"report": page, "export": export, "pairs": len(result["pairs"]), "meta": meta}
    return page or export
