"""Prefect flows `evaluate` and `audit` over a prediction folder (the SQL lives in sql/)."""
from __future__ import annotations

import json

from prefect import flow, get_run_logger


@flow(name="evaluate")
def evaluate_flow(pred: str, ks: list[int] | None = None, json_out: str | None = None, legacy: bool = False) -> dict:
    from dart_core.evaluate import doubts, evaluate, format_table

    ks = ks or [3, 5]
    res = evaluate(pred, ks, legacy)
    logger = get_run_logger()
    logger.info("\n" + format_table(res, ks))
    for note in doubts(pred, legacy):
        logger.warning(note)
    if json_out:
        write_eval(res, json_out)
    return res


def write_eval(res: dict, json_out: str) -> None:
    """JSON at `json_out` and the same table as CSV beside it (percent, as the paper's tables)."""
    import csv
    import io

    from dart_core import storage

    storage.write_bytes(json_out, json.dumps(res, indent=1).encode())  # local or s3://
    cols = sorted({k for row in res.values() for k in row})
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["setting"] + cols)
    for setting, row in res.items():
        w.writerow([setting] + ["" if c not in row else round(100 * row[c], 4) if c == "mAP" or "@" in c
                                else row[c] for c in cols])
    head, _, name = str(json_out).rpartition("/")
    csv_name = (name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name) + ".csv"  # Path.with_suffix
    storage.write_bytes(f"{head}/{csv_name}" if head else csv_name, f.getvalue().encode())


@flow(name="audit")
def audit_flow(pred: str, out: str, top: int = 3, limit: int = 50) -> str:
    from dart_core.evaluate import audit
    from dart_core.data.shard_format import shard_id
    from dart_core.infer import read_shard_image
    from dart_core.report import write_report

    from dart_core import storage

    run = json.loads(storage.read_bytes(storage.join(pred, "run.json")))  # local or s3://
    by_id = {shard_id(url): url for url in run.get("shards", [])}
    result = audit(pred, top=top, limit=limit)

    def image_bytes(shard: str, key: str):
        url = by_id.get(shard)
        if url is None:
            return None
        try:
            return read_shard_image(url, key)  # local or s3://
        except Exception:  # noqa: BLE001 - a thumbnail is optional: the report goes on without it
            return None

    grid = tuple(run.get("grid", (14, 14)))
    page = write_report(out, result, run, image_bytes, grid)
    get_run_logger().info(f"audit report: {page}")
    return str(page)
