"""Prefect flow `pipeline`: a real source to predictions, an evaluation and an audit in one run.

shard (incremental) -> CRG (cached; the LLM when an endpoint is configured, else text similarity)
-> train (in this process, or on N ranks under torchrun) -> annotate -> evaluate -> audit.

Each stage is the stage's own flow, run as a subflow, with that flow's rules for reruns: `shard`
shards only what is not sharded yet; `mine_crg` is cached by the vocabulary's content; `train`
resumes from `last.pt`; `annotate` appends (finished shards are skipped) while model, CRG and
vocabulary stay the same, and starts over when one of them changed. On top of that a stage is
skipped without starting it when the fingerprint of its inputs equals the one recorded when it
last finished (`OUT/stages/<stage>.json`) and its outputs are there:

| stage    | inputs fingerprinted                                                                   |
|----------|----------------------------------------------------------------------------------------|
| shard    | always runs: the source is what changes; it writes nothing when nothing is new         |
| crg      | classes.csv's bytes, the CRG settings, whether an LLM endpoint is configured            |
| train    | training shards (names + stats files' etags), classes.csv, crg.json, the model and      |
|          | training settings, the backbone weights' sha256, the model/training code               |
| annotate | the checkpoint's, crg.json's and classes.csv's bytes, the test shards, the settings     |
| evaluate | the annotate fingerprint, K                                                             |
| audit    | the annotate fingerprint, the audit settings                                            |

A changed training input trains a new run in `OUT/runs/<fingerprint>/` (an earlier model is kept
there, not overwritten). The run's paths and figures are the flow's result, `OUT/summary.json`,
`OUT/summary.md` and the Prefect markdown artifact `pipeline-summary`. Tasks pass paths.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dart_core import storage
from dart_core.options.pipeline import PipelineOptions
from dart_core.stages import Stages, bytes_sha, digest, shard_set, training_code_hash, weights_id

# ---- tasks ----------------------------------------------------------------------------------------

@task(name="check-options", cache_policy=NO_CACHE)
def check_options(options: PipelineOptions) -> PipelineOptions:
    """The options with defaults filled in; the backbone weights can be had (else one error line)."""
    from dart_core.backbone import check_downloadable, is_weights_file

    o = options.resolved()
    if not is_weights_file(o.backbone, o.pretrained):
        check_downloadable(o.backbone, o.pretrained)
    return o


@task(name="fingerprint-shards", cache_policy=NO_CACHE)
def fingerprint_shards(split_dir: str) -> dict:
    return shard_set(split_dir)


@task(name="fingerprint-files", cache_policy=NO_CACHE)
def fingerprint_files(urls: dict) -> dict:
    return {k: bytes_sha(v) for k, v in urls.items()}


@task(name="annotate-mode", cache_policy=NO_CACHE)
def annotate_mode(pred: str, checkpoint: str, crg: str, classes_csv: str) -> str:
    """append while PRED holds predictions of this checkpoint, CRG and vocabulary (finished shards
    are skipped, new ones added); overwrite when one of them changed (the old tables are stale)."""
    from dart_core.predictions import file_hash
    from dart_core.vocab import Vocabulary

    try:
        run = json.loads(storage.read_bytes(storage.join(pred, "run.json")))
    except FileNotFoundError:
        return "new"
    same = (run.get("checkpoint_hash") == file_hash(checkpoint) and run.get("crg_hash") == file_hash(crg)
            and run.get("vocab_hash") == Vocabulary.read_csv(classes_csv).hash())
    return "append" if same else "overwrite"


@task(name="write-summary", cache_policy=NO_CACHE)
def write_summary(summary: dict) -> str:
    """OUT/summary.json, OUT/summary.md and the `pipeline-summary` markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    md = summary_markdown(summary)
    out = Path(summary["out"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(md)
    create_markdown_artifact(markdown=md, key="pipeline-summary",
                             description=f"dart pipeline: {summary['source']} -> {summary['paths']['predictions']}")
    return str(out / "summary.md")


def summary_markdown(s: dict) -> str:
    lines = [f"# dart pipeline: {s['source']} ({s['format']})", "",
             "| stage | status | output |", "|---|---|---|"]
    for name, st in s["stages"].items():
        lines.append(f"| {name} | {st['status']} | `{st.get('output', '')}` |")
    ev = s.get("eval") or {}
    rows = [k for k in ("zsl", "gzsl", "seen") if k in ev]
    if rows:
        cols = ["mAP"] + [f"F1@{k}" for k in s["ks"]]
        lines += ["", "| setting | " + " | ".join(cols) + " | classes with positives | images |",
                  "|---|" + "---|" * (len(cols) + 2)]
        for r in rows:
            row = ev[r]
            vals = [f"{100 * row[c]:.2f}" if isinstance(row.get(c), (int, float)) else "" for c in cols]
            lines.append(f"| {r.upper()} | " + " | ".join(vals) + f" | {row.get('classes_with_positives', '')}/"
                         f"{row.get('classes', '')} | {row.get('images', '')} |")
    lines += ["", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in s["paths"].items()]
    lines += [f"| {k} | {v} |" for k, v in s["figures"].items()]
    lines += ["", f"{s['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def crg_source_for(choice: str, base_url: str | None, api_key_block: str | None) -> tuple[str, str]:
    """(source, why) — auto: the LLM when an OpenAI-compatible endpoint is configured, else similarity."""
    from flows.crg import endpoint_configured, resolve_api_key

    if choice != "auto":
        return choice, f"--crg-source {choice}"
    if endpoint_configured(base_url, resolve_api_key(api_key_block)):
        return "llm", "an OpenAI-compatible endpoint is configured"
    return "similarity", ("no OpenAI-compatible endpoint configured (OPENAI_API_KEY / OPENAI_BASE_URL / --base-url / "
                          "--api-key-block): the text-similarity CRG (the paper's 'Sim.' variant)")


# ---- the flow -------------------------------------------------------------------------------------

def _shard_stage(o: PipelineOptions, status: dict) -> dict:
    """1. shard: incremental (what is sharded already is skipped; a rerun resumes). Returns the
    shard paths and fingerprints the later stages use."""
    from dart_core.options.data import ShardOptions
    from flows.shard import shard

    reports = {}
    for split, src in ((o.train_split, o.source), (o.test_split, o.test_source)):
        r = shard(ShardOptions(source=src, format=o.format, out=o.shards, split=split, shard_size=o.shard_size,
                               mode="incremental", workers=o.shard_workers, image_size=o.image_size,
                               absent=o.absent))
        reports[split] = r
    classes = storage.join(o.shards, "classes.csv")
    train_dir, test_dir = storage.join(o.shards, o.train_split), storage.join(o.shards, o.test_split)
    new = {s: len(r["new_shards"]) for s, r in reports.items()}
    status["shard"] = {"status": "ran: " + ", ".join(f"{s} +{n} shards ({reports[s]['ok']} new samples)"
                                                     for s, n in new.items())
                       if any(new.values()) else "ran: nothing new in the source", "output": o.shards}
    train_set, test_set = fingerprint_shards(train_dir), fingerprint_shards(test_dir)
    files = fingerprint_files({"classes": classes})
    return {"classes": classes, "train_dir": train_dir, "test_dir": test_dir, "train_set": train_set,
            "test_set": test_set, "files": files}


def _crg_stage(o: PipelineOptions, stages: Stages, status: dict, sh: dict, logger) -> tuple[str, str]:
    """2. CRG (cached by the vocabulary's content); returns (crg.json's path, the CRG source)."""
    from dart_core.options.crg import MineOptions
    from flows.crg import mine_crg

    source_kind, why = crg_source_for(o.crg_source, o.base_url, o.api_key_block)
    logger.info(f"CRG source: {source_kind} ({why})")
    crg = str(Path(o.out) / "crg.json")
    crg_fp = digest({"classes": sh["files"]["classes"], "source": source_kind, "model": o.crg_model,
                     "neighbors": o.neighbors, "base_url": o.base_url, "backbone": o.backbone,
                     "weights": weights_id(o.backbone, o.pretrained)})
    if stages.done("crg", crg_fp) and os.path.exists(crg):
        status["crg"] = {"status": f"skipped (classes.csv unchanged; {source_kind})", "output": crg}
    else:
        mine_crg(MineOptions(classes=sh["classes"], out=crg, source=source_kind, base_url=o.base_url,
                             model=o.crg_model, neighbors=o.neighbors, backbone=o.backbone, pretrained=o.pretrained,
                             api_key_block=o.api_key_block))
        stages.record("crg", crg_fp, {"crg": crg})
        status["crg"] = {"status": f"ran ({source_kind})", "output": crg}
    return crg, source_kind


def _train_stage(o: PipelineOptions, status: dict, sh: dict, crg: str, crg_sha: str | None, logger) -> Path:
    """3. train: one run folder per training fingerprint; a stopped run resumes from its last.pt.
    Returns the checkpoint's path."""
    from dart_core.options.train import TrainOptions
    from flows.train import train_flow

    model_cfg = o.model_settings()
    train_cfg = {"epochs": o.epochs, "batch_size": o.batch_size, "lr": o.lr, "val_share": o.val_share}
    train_fp = digest({"shards": sh["train_set"], "classes": sh["files"]["classes"], "crg": crg_sha,
                       "model": model_cfg, "train": train_cfg, "nproc": o.nproc,
                       "weights": weights_id(o.backbone, o.pretrained), "code": training_code_hash()})
    run_dir = Path(o.out) / "runs" / train_fp[:12]
    ckpt = run_dir / "model.pt"
    if ckpt.exists() and (run_dir / "history.jsonl").exists():
        status["train"] = {"status": "skipped (shards, classes, CRG and settings unchanged)", "output": str(ckpt)}
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps({"train_shards": sh["train_dir"], "shard_set": sh["train_set"],
                                                       "model": model_cfg, "train": train_cfg, "nproc": o.nproc},
                                                      indent=1))
        where = f"{o.nproc} processes under torchrun" if o.nproc > 1 else "this process"
        logger.info(f"training DART in {run_dir} on {where} ({o.device})")
        # checkpoint_every decides when last.pt is written, not what is learnt: outside the fingerprint
        train_flow(TrainOptions(
            shards=sh["train_dir"], classes=sh["classes"], out=run_dir, crg=crg, crg_source="file",
            backbone=o.backbone, pretrained=o.pretrained, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
            val_share=o.val_share, checkpoint_every=o.checkpoint_every, device=o.device, workers=o.train_workers,
            nproc=o.nproc, model_overrides=model_cfg))
        status["train"] = {"status": f"ran ({where})", "output": str(ckpt)}
    return ckpt


def _annotate_stage(o: PipelineOptions, stages: Stages, status: dict, sh: dict, ckpt: Path, crg: str,
                    crg_sha: str | None) -> tuple[dict, str]:
    """4. annotate the test split; returns (annotate's summary, the annotate fingerprint)."""
    from dart_core.options.annotate import AnnotateOptions
    from flows.annotate import annotate_flow

    ann_fp = digest({"checkpoint": bytes_sha(str(ckpt)), "crg": crg_sha, "classes": sh["files"]["classes"],
                     "shards": sh["test_set"], "batch": o.annotate_batch_size, "top_m": o.top_m,
                     "pred": o.predictions})
    done = stages.done("annotate", ann_fp)
    if done and storage.exists(storage.join(o.predictions, "summary.json")):
        ann = done["outputs"]["summary"]
        status["annotate"] = {"status": "skipped (model and test shards unchanged)", "output": o.predictions}
    else:
        mode = annotate_mode(o.predictions, str(ckpt), crg, sh["classes"])
        ann = annotate_flow(AnnotateOptions(checkpoint=ckpt, shards=sh["test_dir"], classes=sh["classes"],
                                            out=o.predictions, crg=crg, task_runner=o.task_runner,
                                            workers=o.annotate_workers, batch_size=o.annotate_batch_size,
                                            top_m=o.top_m, device=o.device, mode=mode))
        stages.record("annotate", ann_fp, {"summary": ann})
        status["annotate"] = {"status": f"ran (mode {mode}: {ann['images']} images, {ann['skipped']} shards "
                                        "already done)", "output": o.predictions}
    return ann, ann_fp


def _evaluate_stage(o: PipelineOptions, stages: Stages, status: dict, ann_fp: str) -> tuple[dict, str]:
    """5. evaluate; returns (the evaluation, eval.json's path)."""
    from dart_core.options.annotate import EvalOptions
    from flows.evaluate import evaluate_flow

    eval_json = str(Path(o.out) / "eval.json")
    ev_fp = digest({"annotate": ann_fp, "ks": o.ks})
    if stages.done("evaluate", ev_fp) and os.path.exists(eval_json):
        res = json.loads(Path(eval_json).read_text())
        status["evaluate"] = {"status": "skipped (predictions unchanged)", "output": eval_json}
    else:
        res = evaluate_flow(EvalOptions(pred=o.predictions, ks=o.ks, json_out=eval_json))
        stages.record("evaluate", ev_fp, {"eval": eval_json})
        status["evaluate"] = {"status": "ran", "output": eval_json}
    return res, eval_json


def _audit_stage(o: PipelineOptions, stages: Stages, status: dict, ann_fp: str) -> str | None:
    """6. audit (when o.audit); returns the report's path, or None."""
    from dart_core.options.annotate import AuditOptions
    from flows.evaluate import audit_flow

    if not o.audit:
        return None
    report_dir = str(Path(o.out) / "report")
    au_fp = digest({"annotate": ann_fp, "limit": o.audit_limit})
    rec = stages.done("audit", au_fp)
    if rec and rec["outputs"].get("report") and os.path.exists(rec["outputs"]["report"]):
        report = rec["outputs"]["report"]
        status["audit"] = {"status": "skipped (predictions unchanged)", "output": report}
    else:
        report = audit_flow(AuditOptions(pred=o.predictions, out=report_dir, limit=o.audit_limit))
        stages.record("audit", au_fp, {"report": report})
        status["audit"] = {"status": "ran", "output": report}
    return report


@flow(name="pipeline")
def pipeline_flow(options: PipelineOptions) -> dict:
    """shard -> CRG -> train -> annotate -> evaluate -> audit over SOURCE (see the module doc);
    returns the summary (paths, stage statuses, the evaluation)."""
    logger = get_run_logger()
    t0 = time.time()
    o = check_options(options)
    if o.nproc > 1:
        from flows.train import check_ranks

        check_ranks(o.nproc, o.device)
    Path(o.out).mkdir(parents=True, exist_ok=True)
    stages, status = Stages(o.out), {}

    sh = _shard_stage(o, status)
    crg, source_kind = _crg_stage(o, stages, status, sh, logger)
    crg_sha = bytes_sha(crg)
    ckpt = _train_stage(o, status, sh, crg, crg_sha, logger)
    ann, ann_fp = _annotate_stage(o, stages, status, sh, ckpt, crg, crg_sha)
    res, eval_json = _evaluate_stage(o, stages, status, ann_fp)
    report = _audit_stage(o, stages, status, ann_fp)
    summary = {
        "source": o.source, "format": o.format, "out": o.out, "ks": o.ks, "stages": status,
        "paths": {"shards": o.shards, "classes": sh["classes"], "crg": crg, "checkpoint": str(ckpt),
                  "predictions": o.predictions, "eval": eval_json, "report": report},
        "figures": {"training shards": sh["train_set"]["shards"], "test shards": sh["test_set"]["shards"],
                    "test images annotated": ann.get("images"), "unreadable test samples": ann.get("errors"),
                    "CRG source": source_kind, "training processes": o.nproc, "device": o.device},
        "eval": {k: v for k, v in res.items() if k in ("zsl", "gzsl", "seen")},
        "seconds": round(time.time() - t0, 1),
    }
    summary["summary_md"] = write_summary(summary)
    logger.info(f"pipeline finished in {summary['seconds']:.0f} s: " + "; ".join(f"{k} {v['status']}" for k, v in status.items())
                + f". Summary: {summary['summary_md']} (artifact pipeline-summary)")
    return summary
