"""Why DART does or does not beat the frozen VLP in the demo world: DART variants trained on an
existing demo workdir (same shards, VLP and CRGs), measured against the frozen VLP.

    dart demo --workdir demo                # first: the workdir (shards, VLP, CRGs, zero-shot)
    python benchmarks/demo_diagnostics.py demo init lam1 lr1e3 tau_vlp     # through the real flows
    python benchmarks/demo_diagnostics.py demo --study 'cls_only:rank_image_weight=0' --seeds 0 1 2
    python benchmarks/demo_diagnostics.py demo --table dart no_arm no_wps no_atm   # per-class AP
    python benchmarks/demo_diagnostics.py demo --responsibilities   # how peaked the WPS prior is

Named variants go through the demo's own train -> annotate -> SQL evaluation path (folders
WORKDIR/runs/diag_NAME, predictions/diag_NAME); each prints one line (ZSL / GZSL mAP, F1@3, F1@5,
localization, seen mAP) and is appended to WORKDIR/diagnostics.json. On top of the demo's
settings (the library defaults, flows/demo.py DEMO_TRAIN, the world CRG):
  init          no training step (epochs 0): must equal the frozen VLP (residual init)
  epochs5       5 epochs instead of 20
  tau_vlp       WPS responsibilities at the VLP's own learned temperature (14) instead of CLIP's 100
  lam1          λ kept at 1: responsibilities always the VLP's (no self-training)
  lr1e3         10x the paper's lr: 1e-3, 1 warm-up epoch, cosine to 1e-4

`--study SPEC...` trains in this process instead, on the demo's shards held in memory (all 3,000
training images, no validation hold-out; the reader applies no augmentation, so the data are the
same), with one torch thread (run at most two at a time on two cores): seen / unseen (= ZSL) /
all (= GZSL) mAP, F1, localization and the training set's seen mAP, each variant and seed appended
to WORKDIR/study.jsonl with its per-class APs. A SPEC is `name[:key=value,...]`; a key is a
DARTConfig field (model, losses) or a TrainConfig field (schedule), plus `crg` = world (default, the
demo's) | similarity | random | self (self-loops only) and `freeze` = parameter-name prefixes kept
at their initial values, separated by | (e.g. atm.fnn|atm.mm_layers). The frozen VLP is scored
through the same code (a DART with neither ARM nor ATM). docs/world.md lists the measured specs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

HIGH_LR = dict(lr=1e-3, min_lr=1e-4, warmup_epochs=1.0)


def variants(train: dict) -> dict:
    return {
        "init": ({}, dict(train, epochs=0)),
        "epochs5": ({}, dict(train, epochs=5)),
        "tau_vlp": ({"wps_tau": None}, train),
        "lam1": ({}, dict(train, lam_end=1.0)),
        "lr1e3": ({}, dict(train, **HIGH_LR)),
    }


def line(name: str, r: dict) -> str:
    z, g, loc = r["zsl"], r["gzsl"], r["localization"]
    return (f"{name:<16} ZSL mAP {100 * z['mAP']:5.1f} F1@3 {100 * z['F1@3']:5.1f} F1@5 {100 * z['F1@5']:5.1f} "
            f"loc {100 * loc['zsl']:5.1f} | GZSL mAP {100 * g['mAP']:5.1f} F1@3 {100 * g['F1@3']:5.1f} "
            f"F1@5 {100 * g['F1@5']:5.1f} loc {100 * loc['gzsl']:5.1f} | seen mAP {100 * r['seen']['mAP']:5.1f}")


def per_class_table(workdir: Path, names: list[str]) -> str:
    from dart_core import evaluate as E

    cols = ["zero_shot", *names]
    aps = {}
    for n in cols:
        con = E.connect(workdir / "predictions" / n)
        E.ap_per_class(con, zsl=False)
        aps[n] = con.execute("SELECT class_name, unseen, ap FROM ap_per_class ORDER BY class_index").fetchall()
    out = [f"{'class':<10}{'unseen':>7}" + "".join(f"{n[:12]:>13}" for n in cols)]
    for i, (cname, unseen, _) in enumerate(aps["zero_shot"]):
        out.append(f"{cname:<10}{'yes' if unseen else '':>7}"
                   + "".join(f"{100 * (aps[n][i][2] or 0.0):13.1f}" for n in cols))
    for flag, label in ((False, "seen mAP"), (True, "unseen mAP")):
        means = [sum(a for _, u, a in aps[n] if u == flag and a is not None)
                 / max(1, sum(1 for _, u, a in aps[n] if u == flag and a is not None)) for n in cols]
        out.append(f"{label:<17}" + "".join(f"{100 * m:13.1f}" for m in means))
    return "\n".join(out)


def responsibilities(workdir: Path, taus=(None, 100.0), n_images: int = 256) -> str:
    """How many patches the WPS prior responsibilities Ẑ* (C.4) spread over, on training images'
    positive classes, at the VLP's own temperature and at CLIP's: the mean largest responsibility,
    the mass of the top 5 and the effective number of patches exp(entropy)."""
    import torch

    from dart_core.data.reader import make_loader
    from dart_core.losses import responsibilities as wps_responsibilities
    from dart_core.model import DART, DARTConfig
    from dart_core.vocab import Vocabulary
    from dart_core.world.vlp import MODEL_NAME

    vlp = json.loads((workdir / "results.json").read_text())["vlp"]
    seen = Vocabulary.read_csv(workdir / "shards" / "classes.csv").subset("seen")
    m = DART(DARTConfig(backbone=MODEL_NAME, pretrained=vlp, use_arm=False, use_atm=False))
    m.set_classes(list(seen.names))
    x, y = next(iter(make_loader(str(workdir / "shards" / "train"), seen, m.backbone.preprocess, n_images,
                                 train=False, num_workers=0)))[:2]
    with torch.no_grad():
        out = m(x)
    s, pos, lines = out.extras["scale"], y == 1, []
    for tau in taus:
        t = tau or s
        z = wps_responsibilities(out.prior_logits, t / s)  # Ẑ*, (B, P, C)
        eff = (-(z * z.clamp_min(1e-12).log()).sum(1)).exp()[pos]
        lines.append(f"τ = {t:5.1f}: largest responsibility {z.max(1).values[pos].mean():.3f}, top-5 mass "
                     f"{z.topk(5, dim=1).values.sum(1)[pos].mean():.3f}, effective patches {eff.mean():.1f} "
                     f"of {z.shape[1]}")
    return "\n".join(lines)


def load_split(workdir: Path, split: str, vocab, preprocess):
    from dart_core.data.reader import make_loader

    xs, ys, keys = [], [], []
    for x, y, k in make_loader(str(workdir / "shards" / split), vocab, preprocess, 256, train=False):
        xs.append(x)
        ys.append(y)
        keys += k
    return torch.cat(xs), torch.cat(ys), keys


class Batches:
    """Shuffled in-memory batches, a new seeded order every pass (drop_last, as the reader)."""

    def __init__(self, x, y, batch_size: int, seed: int):
        self.x, self.y, self.bs, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __len__(self):
        return len(self.x) // self.bs

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.x), generator=g)
        for i in range(len(self)):
            idx = order[i * self.bs:(i + 1) * self.bs]
            yield self.x[idx], self.y[idx]


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def split_overrides(spec: str) -> tuple[str, dict, dict, str, list]:
    from dart_core.model import DARTConfig
    from dart_core.train import TrainConfig

    name, _, rest = spec.partition(":")
    model, train, crg, freeze = {}, {}, "world", []
    mf, tf = {f.name for f in fields(DARTConfig)}, {f.name for f in fields(TrainConfig)}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        val = parse_value(v)
        if k == "crg":
            crg = v
        elif k == "freeze":  # study only: parameter-name prefixes kept at their initial values
            freeze = v.split("|")
        elif k in mf:
            model[k] = bool(val) if isinstance(getattr(DARTConfig, k, None), bool) else val
        elif k in tf:
            train[k] = val
        else:
            raise SystemExit(f"{spec}: {k!r} is neither a DARTConfig nor a TrainConfig field")
    return name, model, train, crg, freeze


@torch.no_grad()
def score(model, x, batch: int = 200):
    model.eval()
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return (torch.cat([o.logits for o in outs]).numpy(), torch.cat([o.patch_logits for o in outs]).numpy(),
            torch.cat([o.zero_shot for o in outs]).numpy())


def measure(scores, patch, labels, unseen, ctx) -> dict:
    from dart_core.metrics import average_precision, evaluate
    from dart_core.world.localization import localization_accuracy, localization_counts

    y = labels.numpy()
    r = evaluate(scores, y, unseen, ks=(3, 5))
    ap = average_precision(scores, y)
    out = {"seen_mAP": float(np.nanmean(ap[~unseen])), "unseen_mAP": float(np.nanmean(ap[unseen])),
           "all_mAP": float(np.nanmean(ap)), "zsl": r["zsl"], "gzsl": r["gzsl"],
           "ap": {n: round(float(a), 4) for n, a in zip(ctx["names"], ap)}}
    if patch is not None:
        loc = dict(boxes=ctx["boxes"], class_ids=ctx["ids"], image_sizes=(64, 64), labels=y, grid=ctx["grid"])
        out["loc_zsl"] = localization_accuracy(patch, class_mask=unseen, **loc)
        out["loc_gzsl"] = localization_accuracy(patch, **loc)
        hits, pairs = localization_counts(patch, loc["grid"], loc["boxes"], loc["class_ids"], (64, 64), y)
        out["loc_class"] = {n: [int(h), int(p)] for n, h, p in zip(ctx["names"], hits, pairs) if p}
    return out


def edges(vocab, text, kind: str, workdir: Path, seed: int):
    from dart_core.crg.graph import CRG, random_crg
    from dart_core.world.relations import world_crg

    if kind == "similarity":
        return CRG.read(workdir / "crg.json").edge_index(vocab)
    if kind == "world":
        return world_crg().edge_index(vocab)
    if kind == "random":
        return random_crg(vocab, 8, seed).edge_index(vocab)
    if kind == "self":
        return None
    raise SystemExit(f"unknown crg {kind!r}")


def study_line(name: str, r: dict) -> str:
    loc = f" loc {100 * r['loc_zsl']:5.1f}/{100 * r['loc_gzsl']:5.1f}" if "loc_zsl" in r else ""
    tr = f" | train seen {100 * r['train_seen_mAP']:5.1f}" if "train_seen_mAP" in r else ""
    return (f"{name:<22} seen {100 * r['seen_mAP']:5.1f} unseen {100 * r['unseen_mAP']:5.1f} "
            f"all {100 * r['all_mAP']:5.1f} | ZSL F1@3 {100 * r['zsl']['F1@3']:5.1f} GZSL F1@3 "
            f"{100 * r['gzsl']['F1@3']:5.1f} F1@5 {100 * r['gzsl']['F1@5']:5.1f}{loc}{tr}")


def study(wd: Path, specs: list[str], seeds: list[int], n_train: int = 0, train_eval: int = 600) -> None:
    """In-process variants (`--study`): see the module docstring."""
    from dart_core.data.sources.folder import key_for
    from dart_core.model import DART, DARTConfig
    from dart_core.train import TrainConfig, fit
    from dart_core.vocab import Vocabulary
    from dart_core.world.generator import read_boxes
    from dart_core.world.vlp import MODEL_NAME
    from flows.demo import DEMO_TRAIN

    vlp = json.loads((wd / "results.json").read_text())["vlp"]
    vocab = Vocabulary.read_csv(wd / "shards" / "classes.csv")
    seen = vocab.subset("seen")
    unseen = np.asarray(vocab.unseen_mask, bool)
    seen_cols = torch.as_tensor(~unseen)

    zs = DART(DARTConfig(backbone=MODEL_NAME, pretrained=str(vlp), use_arm=False, use_atm=False))
    text_all = zs.backbone.text_embeddings(list(vocab.names))
    zs.set_classes(list(vocab.names), text=text_all)
    x_tr, y_tr, _ = load_split(wd, "train", vocab, zs.backbone.preprocess)
    x_te, y_te, keys = load_split(wd, "test", vocab, zs.backbone.preprocess)
    if n_train:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    boxes_by_key = {key_for(p): o for p, o in read_boxes(wd / "source" / "test" / "boxes.jsonl").items()}
    ctx = {"names": list(vocab.names), "ids": list(vocab.ids), "grid": zs.backbone.grid_size,
           "boxes": [boxes_by_key[k] for k in keys]}
    ctx_tr = dict(ctx, boxes=None)
    _, patch0, z0 = score(zs, x_te)
    base = measure(z0, patch0, y_te, unseen, ctx)
    _, _, ztr = score(zs, x_tr[:train_eval])
    base["train_seen_mAP"] = measure(ztr, None, y_tr[:train_eval], unseen, ctx_tr)["seen_mAP"]
    print(study_line("frozen VLP", base), flush=True)
    log = wd / "study.jsonl"
    for spec in specs:
        name, mcfg, tcfg, crg, freeze = split_overrides(spec)
        for seed in seeds:
            t0 = time.time()
            cfg = DARTConfig(backbone=MODEL_NAME, pretrained=str(vlp), **mcfg)
            tc = TrainConfig(**{**DEMO_TRAIN, "seed": seed, "log_every": 10 ** 9, **tcfg})
            torch.manual_seed(seed)
            model = DART(cfg, backbone=zs.backbone)
            for n, p in model.named_parameters():
                if any(n.startswith(f) for f in freeze):
                    p.requires_grad_(False)
            text_seen = text_all[seen_cols]
            model.set_classes(list(seen.names), edges(seen, text_seen, crg, wd, seed), text=text_seen)
            data = Batches(x_tr, y_tr[:, seen_cols], tc.batch_size, seed)
            with tempfile.TemporaryDirectory() as tmp:
                hist = fit(model, data, seen, tmp, tc, log=lambda *_: None)
            model.set_classes(list(vocab.names), edges(vocab, text_all, crg, wd, seed), text=text_all)
            logits, patch, _ = score(model, x_te)
            r = measure(logits, patch, y_te, unseen, ctx)
            tr_logits, _, _ = score(model, x_tr[:train_eval])
            r["train_seen_mAP"] = measure(tr_logits, None, y_tr[:train_eval], unseen, ctx_tr)["seen_mAP"]
            r["gates"] = {"alpha": float(model.patch_gate.detach().abs().mean()),
                          **({n: float(p.detach().abs().mean()) for n, p in model.atm.named_parameters() if n.endswith("gamma")}
                             if model.atm is not None else {})}
            r.update(name=name, seed=seed, spec=spec, seconds=round(time.time() - t0),
                     steps=len(hist), last=hist[-1] if hist else None)
            print(study_line(f"{name} s{seed}", r), f"({r['seconds']} s)", flush=True)
            with log.open("a") as f:
                f.write(json.dumps({"vlp": base, **r}, default=float) + "\n")


def main() -> None:
    from flows.demo import DEMO_TRAIN, run_variant

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("names", nargs="*")
    ap.add_argument("--responsibilities", action="store_true", help="only print how peaked Ẑ* is at τ = VLP's and 100")
    ap.add_argument("--table", action="store_true", help="only print the per-class AP of these prediction folders")
    ap.add_argument("--study", action="store_true", help="the names are SPECs trained in this process")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--study: training seeds")
    ap.add_argument("--threads", type=int, default=1, help="--study: torch threads")
    a = ap.parse_intermixed_args()
    wd = Path(a.workdir).resolve()
    if a.study:
        torch.set_num_threads(a.threads)
        study(wd, a.names, a.seeds)
        return
    if a.responsibilities:
        print(responsibilities(wd))
        return
    if a.table:
        print(per_class_table(wd, a.names))
        return
    demo = json.loads((wd / "results.json").read_text())
    shards, classes = str(wd / "shards"), str(wd / "shards" / "classes.csv")
    crg = str(wd / ("crg.json" if demo["crg_source"] == "llm" else "crg_world.json"))
    table = variants(DEMO_TRAIN)
    unknown = [n for n in a.names if n not in table]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(table)}")
    out = wd / "diagnostics.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in a.names:
        model_cfg, train_cfg = table[name]
        t0 = time.time()
        r = run_variant(f"diag_{name}", wd, shards, classes, crg, demo["vlp"], model_cfg, train_cfg)
        r["seconds"] = round(time.time() - t0)
        results[name] = r
        out.write_text(json.dumps(results, indent=1, default=str))
        print(line(name, r), f"({r['seconds']} s)", flush=True)
    print(per_class_table(wd, [f"diag_{n}" for n in a.names]))


if __name__ == "__main__":  # the annotate flow's DataLoader starts workers with forkserver
    main()
