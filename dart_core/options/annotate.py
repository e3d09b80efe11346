"""Options of `dart annotate`, `dart eval` and `dart audit` (flows/annotate.py, flows/evaluate.py)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dart_core.options._fields import Cli, Device, Options


class AnnotateOptions(Options):
    """One annotate run: what to score, with what, where to, and how it is spread over workers.
    The flow `annotate` takes it whole; dart_core.infer.annotate_shard reads the per-batch fields."""

    checkpoint: str = Field(description="model.pt from `dart train`.")
    shards: str = Field(description="Shard folder (split subfolders included) or a .tar.")
    classes: str = Field(description="classes.csv: may add classes never trained on.")
    out: str = Field(description="Prediction folder or s3://bucket/prefix (scores/, tags/, labels/, errors/, vocab/, "
                                 "run.json).")
    crg: str | None = Field(None, description="crg.json; classes it lacks get edges (LLM if configured, else "
                                              "similarity).")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Where shard tasks run.")
    dask_address: str | None = Field(None, description="Scheduler address for dask/ray (default: a local cluster).")
    workers: int | None = Field(None, ge=1, description="Parallel shard tasks (threads / local cluster workers).")
    batch_size: int = Field(64, ge=1, description="Images per model step.")
    top_m: int = Field(10, ge=1, description="Tags written per image (plus every class above its threshold).")
    device: Device = "cpu"
    mode: Literal["new", "append", "overwrite"] = Field(
        "new", description="When OUT already holds predictions: new and append continue the same run (same "
                           "checkpoint, vocabulary and CRG) and refuse another's; overwrite deletes them first.")
    thresholds: str | None = Field(None, description="thresholds.csv (default: beside classes.csv if present).")
    mm_candidates: int = Field(0, ge=0, description="Bound the MM-ATM to each image's top-M classes (0 = all).")
    decode_threads: int | None = Field(
        None, ge=0, description="Threads decoding images beside each shard task's model (default: 1 on the CPU; on a "
                                "GPU the cores shared out, at most 8; 0: inline).")
    # "dart": DART's scores and refined patch selections; "zero_shot": the frozen VLP's own
    # s·cos(global, t_c) and its raw patch scores S* (the baseline DART is compared with, `dart demo`)
    score: Annotated[Literal["dart", "zero_shot"], Cli(hidden=True)] = "dart"


class EvalOptions(Options):
    """`dart eval`: the ZSL / GZSL / seen table of a prediction folder (flow `evaluate`)."""

    pred: Annotated[str, Cli(argument=True)] = Field(description="Prediction folder or s3://bucket/prefix.")
    ks: Annotated[list[Annotated[int, Field(ge=1)]], Cli("--k")] = Field(
        [3, 5], min_length=1, description="K for P/R/F1@K (repeat: --k 3 --k 5).")
    json_out: Annotated[str | None, Cli("--json")] = Field(
        None, description="Write the table as JSON (+ CSV beside it).")
    legacy: bool = Field(False, description="Count classes without positives as AP 0 (older papers).")
    corrections: str | None = Field(
        None, description="Corrections file (`dart corrections`) or reviewed file (`dart audit --export`, accepted "
                          "rows) applied on top of the shard labels.")


class AuditOptions(Options):
    """`dart audit`: the labels that look wrong or missing (flow `audit`)."""

    pred: Annotated[str, Cli(argument=True)] = Field(description="Prediction folder or s3://bucket/prefix.")
    out: str | None = Field(None, description="Report folder (index.html + thumbnails), local.")
    export: str | None = Field(None, description="Write the review list as CSV (path, class, current_label, "
                                                 "suggested_label, score, reason, ..., decision) to review.")
    method: Literal["sql", "cleanlab"] = Field(
        "sql", description="Ranking: a per-class calibrated probability in DuckDB SQL, or cleanlab's per-class label "
                           "quality on per-class Platt-calibrated probabilities (docs/audit.md: both measured).")
    limit: int = Field(2000, ge=1, description="Rows of the review list (report and export).")
    per_class_cap: int = Field(0, ge=0, description="At most this many rows per class (0: 3 x LIMIT / classes).")
    min_suspicion: float = Field(0.5, ge=0, le=1, description="List only labels whose suspicion (1 - calibrated "
                                                              "probability of the label) is at least this.")
    corrections: str | None = Field(None, description="Corrections applied on top of the shard labels first.")
    thumbnails: int = Field(2000, ge=0, description="Pictures for the first N rows of the report.")
