"""Why DART does or does not beat the frozen VLP in the demo world: extra DART variants trained on
an existing demo workdir (same shards, VLP and CRG), then per-class AP side by side.

    dart demo --workdir demo                      # first: the workdir (shards, VLP, CRG, zero-shot)
    python benchmarks/demo_diagnostics.py demo init epochs3 tau_vlp lam1 lr1e3
    python benchmarks/demo_diagnostics.py demo --table dart no_arm no_wps no_atm   # per-class only
    python benchmarks/demo_diagnostics.py demo --responsibilities   # how peaked the WPS prior is

Each variant prints one line (ZSL / GZSL mAP, F1@3, F1@5, localization); `--table` prints the
per-class AP (percent) of the frozen VLP and the named prediction folders, with seen / unseen means.
Results are appended to WORKDIR/diagnostics.json. Variants (on top of the demo's settings):
  init          no training step (epochs 0): the architecture alone, ATM and ARM at their init
  epochs3       3 epochs instead of 12
  tau_vlp       WPS responsibilities at the VLP's own learned temperature (14) instead of 100
  lam1          λ kept at 1: responsibilities always the VLP's (no self-training)
  tau_vlp_lam1  both
  lr1e3         10x the paper's lr: 1e-3, 1 warm-up epoch, cosine to 1e-4 (the demo's first setting)
  lr1e3_tau_vlp both lr 1e-3 and τ = 14 (the demo as measured in the previous session)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HIGH_LR = dict(lr=1e-3, min_lr=1e-4, warmup_epochs=1.0)


def variants(train: dict) -> dict:
    return {
        "init": ({}, dict(train, epochs=0)),
        "epochs3": ({}, dict(train, epochs=3)),
        "tau_vlp": ({"wps_tau": None}, train),
        "lam1": ({}, dict(train, lam_end=1.0)),
        "tau_vlp_lam1": ({"wps_tau": None}, dict(train, lam_end=1.0)),
        "lr1e3": ({}, dict(train, **HIGH_LR)),
        "lr1e3_tau_vlp": ({"wps_tau": None}, dict(train, **HIGH_LR)),
    }


def line(name: str, r: dict) -> str:
    z, g, loc = r["zsl"], r["gzsl"], r["localization"]
    return (f"{name:<16} ZSL mAP {100 * z['mAP']:5.1f} F1@3 {100 * z['F1@3']:5.1f} F1@5 {100 * z['F1@5']:5.1f} "
            f"loc {100 * loc['zsl']:5.1f} | GZSL mAP {100 * g['mAP']:5.1f} F1@3 {100 * g['F1@3']:5.1f} "
            f"F1@5 {100 * g['F1@5']:5.1f} loc {100 * loc['gzsl']:5.1f}")


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


def main() -> None:
    from flows.demo import DEMO_TRAIN, run_variant

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("names", nargs="*")
    ap.add_argument("--responsibilities", action="store_true", help="only print how peaked Ẑ* is at τ = VLP's and 100")
    ap.add_argument("--table", action="store_true", help="only print the per-class AP of these prediction folders")
    a = ap.parse_intermixed_args()
    wd = Path(a.workdir).resolve()
    if a.responsibilities:
        print(responsibilities(wd))
        return
    if a.table:
        print(per_class_table(wd, a.names))
        return
    demo = json.loads((wd / "results.json").read_text())
    shards, classes, crg = str(wd / "shards"), str(wd / "shards" / "classes.csv"), str(wd / "crg.json")
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
