"""Prefect flow `demo`: the whole pipeline on the embedded synthetic world, offline.

generate -> shard -> pretrain the small VLP (cached) -> CRG (mined from an OpenAI-compatible
endpoint if one is configured; otherwise the world's own relations stand in for the LLM's, and the
text-similarity CRG is mined as the paper's "Sim." ablation) -> train DART (one run per training
seed) -> annotate (DART and the frozen VLP's zero-shot baseline) -> evaluate (SQL) + localization
-> audit (-> with `label_noise`, the audit measured on errors injected into a copy of the test split:
label_noise_audit). Tasks pass paths.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from dart_core.options.annotate import AnnotateOptions, AuditOptions, EvalOptions
from dart_core.options.data import ShardOptions
from dart_core.options.demo import DEMO_ANNOTATE, DEMO_TRAIN, DemoOptions
from dart_core.options.train import TrainOptions
from dart_core.stages import training_code_hash


def _log():
    try:
        return get_run_logger().info
    except Exception:  # noqa: BLE001 — called outside a run
        return print


def make_sources(workdir: Path, n_train: int, n_test: int, seed: int) -> dict:
    """World images as two folder sources (train: seed, test: seed + 1), written once."""
    from dart_core.world.generator import write_folder_source

    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        d = workdir / "source" / split
        marker = d / ".complete.json"
        want = {"images": n, "seed": s}
        if not (marker.exists() and json.loads(marker.read_text()) == want):
            write_folder_source(d, n, seed=s)
            marker.write_text(json.dumps(want))
        out[split] = str(d)
    return out


def crg_source_available() -> str:
    from flows.crg import endpoint_configured, resolve_api_key

    return "llm" if endpoint_configured(None, resolve_api_key(None)) else "similarity"  # None: OPENAI_BASE_URL


def reuse_run_dir(run_dir: Path, spec: dict) -> Path:
    """`run_dir`, kept if its spec.json equals `spec` (what the run was trained from), else emptied
    and given that spec: a stale model is never reported under a new configuration."""
    spec_file = run_dir / "spec.json"
    same = spec_file.exists() and json.loads(spec_file.read_text()) == json.loads(json.dumps(spec))
    if run_dir.exists() and not same:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not same:
        spec_file.write_text(json.dumps(spec, sort_keys=True))
    return run_dir


def run_variant(name: str, workdir: Path, shards: str, classes: str, crg: str | None, vlp: str, model_cfg: dict,
                train_cfg: dict, crg_source: str = "file") -> dict:
    """Train one DART variant, annotate the test split, evaluate + localize."""
    from flows.annotate import annotate_flow
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    from dart_core.world.generator import UNSEEN
    from dart_core.world.localization import top_patch_localization
    from dart_core.world.vlp import MODEL_NAME

    run_dir = workdir / "runs" / name
    ckpt = run_dir / "model.pt"
    cfg = {"backbone": MODEL_NAME, "pretrained": vlp, **model_cfg}
    # A rerun reuses a variant's model only if it was trained from the same inputs; anything else
    # (another VLP, CRG, config, training code) starts that variant's folder afresh.
    spec = {"model": cfg, "train": train_cfg, "crg_source": crg_source, "shards": shards, "code": training_code_hash(),
            "crg_sha256": hashlib.sha256(Path(crg).read_bytes()).hexdigest() if crg and crg_source == "file" else None}
    reuse_run_dir(run_dir, spec)
    # model.pt appears after the first validation (the best epoch so far); a run is finished when
    # history.jsonl is written. A stopped run resumes from its last.pt.
    if not (ckpt.exists() and (run_dir / "history.jsonl").exists()):
        train_flow(TrainOptions(shards=f"{shards}/train", classes=classes, out=run_dir, crg=crg, crg_source=crg_source,
                                backbone=MODEL_NAME, pretrained=vlp, model_overrides=model_cfg,
                                train_overrides=train_cfg))
    pred = workdir / "predictions" / name
    annotate_flow(AnnotateOptions(checkpoint=ckpt, shards=f"{shards}/test", classes=classes, out=pred,
                                  crg=crg if crg_source == "file" else None, **DEMO_ANNOTATE))
    res = evaluate_flow(EvalOptions(pred=pred))
    res["localization"] = top_patch_localization(str(pred), str(workdir / "source" / "test" / "boxes.jsonl"),
                                                 set(UNSEEN))
    return {"pred": str(pred), "checkpoint": str(ckpt), **res}


def summary(r: dict) -> dict[str, float]:
    """The figures of one row of the demo's table, as fractions."""
    z, g, loc = r["zsl"], r["gzsl"], r["localization"]
    return {"zsl_mAP": z["mAP"], "zsl_F1@3": z["F1@3"], "zsl_F1@5": z["F1@5"], "zsl_loc": loc["zsl"],
            "gzsl_mAP": g["mAP"], "gzsl_F1@3": g["F1@3"], "gzsl_F1@5": g["F1@5"], "gzsl_loc": loc["gzsl"],
            "seen_mAP": r["seen"]["mAP"]}


def seed_statistics(runs: list[dict]) -> dict:
    """Mean and spread (max - min) of each figure over the training seeds' runs."""
    rows = [summary(r) for r in runs]
    return {"mean": {k: float(np.mean([x[k] for x in rows])) for k in rows[0]},
            "spread": {k: float(np.ptp([x[k] for x in rows])) for k in rows[0]}, "runs": len(rows)}


def _zero_shot_run(wd: Path, shards: str, classes: str, vlp: str) -> dict:
    """The zero-shot baseline (the VLP's own scores, no DART training): annotate the test split,
    evaluate, and measure its localization on the world's boxes."""
    from flows.annotate import annotate_flow
    from flows.evaluate import evaluate_flow
    from dart_core.checkpoint import zero_shot_checkpoint
    from dart_core.world.generator import UNSEEN
    from dart_core.world.localization import top_patch_localization
    from dart_core.world.vlp import MODEL_NAME

    zs_ckpt = zero_shot_checkpoint(wd / "zero_shot.pt", MODEL_NAME, vlp, classes)
    zs_pred = wd / "predictions" / "zero_shot"
    annotate_flow(AnnotateOptions(checkpoint=zs_ckpt, shards=f"{shards}/test", classes=classes, out=zs_pred,
                                  score="zero_shot", **DEMO_ANNOTATE))
    res = evaluate_flow(EvalOptions(pred=zs_pred))
    res["localization"] = top_patch_localization(str(zs_pred), str(wd / "source/test/boxes.jsonl"), set(UNSEEN))
    return res


def _ablation_runs(wd: Path, shards: str, classes: str, crg: str, mined: str, world: str, vlp: str, source: str,
                   train_cfg: dict) -> dict:
    """`dart demo --ablations`: the Tab. 5 variants and the other CRGs, each trained and evaluated
    like the main run; returns {variant: run_variant's result}."""
    variants = {
        "no_arm": ({"use_arm": False}, "file", crg), "no_wps": ({"use_wps": False}, "file", crg),
        "no_atm": ({"use_atm": False}, "file", crg), "crg_random": ({}, "random", None),
        "crg_similarity": ({}, "file", mined if source != "llm" else None),
        "crg_world": ({}, "file", world if source == "llm" else None),
        "wps_tau_vlp": ({"wps_tau": None}, "file", crg),
    }
    results = {}
    for name, (mcfg, csrc, path) in variants.items():
        if csrc == "file" and path is None:
            continue  # the main run already uses that CRG
        if name == "crg_similarity" and source == "llm":
            csrc = "similarity"
        results[name] = run_variant(name, wd, shards, classes, path, vlp, mcfg, dict(train_cfg), csrc)
    return results


@flow(name="demo")
def demo_flow(options: DemoOptions) -> dict:
    """generate -> shard -> VLP -> CRG -> train (per seed, + ablations) -> annotate -> eval -> audit
    (+ the label-noise measurement); returns every figure, also written to WORKDIR/results.json."""
    from dart_core.options.crg import MineOptions
    from flows.crg import run_mining
    from flows.evaluate import audit_flow
    from flows.shard import shard
    from flows.vlp import pretrain_vlp
    from dart_core.world.relations import world_crg
    from dart_core.world.vlp import MODEL_NAME

    log = _log()
    t0 = time.time()
    o, seed, train_seeds = options, options.seed, options.train_seeds
    wd = Path(o.workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    src = make_sources(wd, o.n_train, o.n_test, seed)
    shards = str(wd / "shards")
    for split in ("train", "test"):
        shard(ShardOptions(source=src[split], format="folder", out=shards, split=split, shard_size=1000))
    classes = f"{shards}/classes.csv"
    vlp = pretrain_vlp(o.vlp_cache or str(wd / "vlp-cache"), steps=o.vlp_steps, seed=seed)
    source = crg_source_available()
    mined = str(wd / "crg.json")
    run_mining(MineOptions(classes=classes, out=mined, source=source, backbone=MODEL_NAME, pretrained=vlp,
                           neighbors=8, estimate=False), log=log)
    # the world's own relations (label co-occurrence on a separate stream): what an LLM knows about
    # real classes, measured here; the main run's CRG when no LLM endpoint is configured
    world = wd / "crg_world.json"
    world_crg().write(world)
    crg = mined if source == "llm" else str(world)
    log(f"CRG: {'mined from the LLM endpoint' if source == 'llm' else 'the world relations (no OpenAI-compatible endpoint configured: OPENAI_BASE_URL / OPENAI_API_KEY), the stand-in for the LLM CRG'}")
    train_cfg = dict(DEMO_TRAIN, epochs=o.epochs, batch_size=o.batch_size)
    results = {"crg_source": "llm" if source == "llm" else "world", "vlp": vlp, "train_seeds": train_seeds}
    results["zero_shot"] = _zero_shot_run(wd, shards, classes, vlp)
    runs = [run_variant("dart" if s == train_seeds[0] else f"dart_seed{s}", wd, shards, classes, crg, vlp, {},
                        dict(train_cfg, seed=s)) for s in train_seeds]
    results["dart"] = runs[0]
    if len(runs) > 1:
        results["dart_seeds"] = seed_statistics(runs)
    if o.ablations:
        results.update(_ablation_runs(wd, shards, classes, crg, mined, str(world), vlp, source,
                                      dict(train_cfg, seed=train_seeds[0])))
    results["report"] = audit_flow(AuditOptions(pred=results["dart"]["pred"], out=wd / "report"))
    if o.label_noise:
        results["label_noise"] = label_noise_audit(wd, shards, classes, results["dart"]["checkpoint"], crg,
                                                   o.label_noise, seed)
    results["seconds"] = round(time.time() - t0, 1)
    (wd / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def label_noise_audit(workdir: Path, shards: str, classes: str, checkpoint: str, crg: str | None, share: float,
                      seed: int) -> dict:
    """`dart demo --label-noise SHARE`: `share` of the test split's known positives dropped and of its
    known negatives turned positive (chosen by `seed`) in a copy of its shards (WORKDIR/label_noise/
    shards/test), annotated with the trained DART (WORKDIR/label_noise/pred), and the audit's sql and
    cleanlab rankings measured on those known errors: dart_core.audit.measure_label_noise, the
    function benchmarks/label_audit.py runs too. Returns its figures (JSON-ready)."""
    from dart_core.audit import measure_label_noise
    from flows.annotate import annotate_flow

    def annotate(noisy: str, pred: str) -> None:
        annotate_flow(AnnotateOptions(checkpoint=checkpoint, shards=noisy, classes=classes, out=pred, crg=crg,
                                      **DEMO_ANNOTATE))

    res = measure_label_noise(f"{shards}/test", Path(workdir) / "label_noise", annotate, seed=seed, pos_rate=share,
                              neg_rate=share)
    res.pop("flipped")
    return res


def format_label_noise(r: dict) -> str:
    """The label-noise table: precision / recall of the flagged labels at the top 1 / 2 / 5 % of the
    known labels, per ranking, and the best any ranking can do with that many errors."""
    def cell(p, rec):
        return " / ".join("—" if v is None else f"{v:.2f}" for v in (p, rec))

    names = {"sql": "sql (dart audit default)", "cleanlab": "cleanlab"}
    lines = [f"label noise: {r['positive_rate']:.0%} of the test split's known positives dropped, "
             f"{r['negative_rate']:.0%} of its negatives turned positive (seed {r['seed']}): "
             f"{r['errors']:,} errors among {r['known_labels']:,} known labels",
             f"{'ranking':<26}" + "".join(f"{f'top {q:.0%} P / R':>16}" for q in r["shares"])]
    for name, cuts in r["rankings"].items():
        lines.append(f"{names.get(name, name):<26}" + "".join(f"{cell(c['precision'], c['recall']):>16}" for c in cuts))
    e = r["errors"]
    best = [cell(min(c["cut"], e) / c["cut"] if c["cut"] else None, min(c["cut"], e) / e if e else None)
            for c in next(iter(r["rankings"].values()))]
    lines.append(f"{'best possible':<26}" + "".join(f"{b:>16}" for b in best))
    return "\n".join(lines)


ROW_LABELS = {"no_arm": "DART without ARM", "no_wps": "DART without WPS", "no_atm": "DART without ATM",
              "crg_random": "DART, random CRG", "crg_similarity": "DART, similarity CRG",
              "crg_world": "DART, world CRG", "wps_tau_vlp": "DART, WPS τ = VLP's"}
COLUMNS = ["zsl_mAP", "zsl_F1@3", "zsl_F1@5", "zsl_loc", "gzsl_mAP", "gzsl_F1@3", "gzsl_F1@5", "gzsl_loc", "seen_mAP"]


def format_results(results: dict) -> str:
    """The demo's table in percent: the frozen VLP, DART (and its seeds' mean ± spread), ablations."""
    main = "DART" + (f" (seed {results['train_seeds'][0]})" if "dart_seeds" in results else "")
    rows = [("frozen VLP zero-shot", summary(results["zero_shot"])), (main, summary(results["dart"]))]
    if "dart_seeds" in results:
        st = results["dart_seeds"]
        rows.append((f"DART, mean of {st['runs']} seeds", st["mean"]))
        rows.append(("  spread (max - min)", st["spread"]))
    rows += [(label, summary(results[name])) for name, label in ROW_LABELS.items() if name in results]
    head = (f"{'model':<28}{'ZSL mAP':>8}{'F1@3':>7}{'F1@5':>7}{'loc':>7}   "
            f"{'GZSL mAP':>8}{'F1@3':>7}{'F1@5':>7}{'loc':>7}   {'seen mAP':>8}")
    lines = [head]
    for name, r in rows:
        v = [100 * r[c] for c in COLUMNS]
        lines.append(f"{name:<28}{v[0]:8.1f}{v[1]:7.1f}{v[2]:7.1f}{v[3]:7.1f}   {v[4]:8.1f}{v[5]:7.1f}{v[6]:7.1f}"
                     f"{v[7]:7.1f}   {v[8]:8.1f}")
    return "\n".join(lines)
