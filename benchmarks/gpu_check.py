"""Is this GPU ready for DART? One command, offline, a few minutes; prints one table.

    python benchmarks/gpu_check.py [--device cuda] [--backbone ViT-B-16] [--classes 1006]
                                   [--batch 32] [--skip-ddp]

Random weights everywhere (no download). Checks, each a row of the table:
  * dtypes and ties: under bf16 autocast the scores (logits, S̃, S*, zero-shot) are fp32, the share
    of tied scores per image, and the largest difference from the same forward in fp32 on the CPU;
  * fit then stop and resume: 2 epochs in one go vs 1 epoch, a stop, and a resumed second epoch —
    the same step count and the same final loss;
  * torchrun --nproc_per_node 2 (both ranks on this one GPU, gloo: NCCL refuses two ranks per
    GPU): the 2-rank run's losses equal the 1-process run with the doubled batch;
  * MM-ATM peak training memory at 7,586 classes for B = 4 / 8 / 16 (forward + backward of the
    fusion and the two GATv2 layers), a line through them extrapolated to B = 64 and 256, beside
    the formula in docs/model.md;
  * annotate: the bytes a batch sends to the host (scores + the chosen tags' patches) against the
    whole (B, P, C) patch-score tensor;
  * images/s: the bare `encode_image`, DART inference, a DART training step (forward, backward,
    optimizer) at --classes, as ratios to the bare backbone.
On a machine without CUDA it runs on the CPU with small sizes (a smoke test of the script itself).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

ROWS: list[tuple[str, str, str]] = []


def row(check: str, result: str, ok: bool | None = None) -> None:
    ROWS.append((check, result, "" if ok is None else ("ok" if ok else "FAIL")))
    print(f"  {check}: {result} {'' if ok is None else ('ok' if ok else 'FAIL')}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def make_model(backbone: str, classes: int, device: torch.device, seed: int = 0):
    from dart_core.crg.graph import random_crg
    from dart_core.model import DART, DARTConfig
    from dart_core.vocab import Vocabulary

    torch.manual_seed(seed)
    model = DART(DARTConfig(backbone=backbone, pretrained=None), device=str(device))
    with torch.no_grad():  # a "trained" model: every path computes
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(0.5) if n.endswith("gamma") or n == "patch_gate" else p.normal_(0, 0.02)
    vocab = Vocabulary.from_names([f"class {i}" for i in range(classes)])
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(classes, model.backbone.embed_dim, generator=g), dim=-1)
    model.set_classes(list(vocab.names), random_crg(vocab, 8, seed=0).edge_index(vocab), text=text)
    return model, vocab


def check_dtypes(args, device) -> None:
    model, _ = make_model(args.backbone, args.classes, device)
    model.eval()
    size = model.backbone.clip.visual.image_size
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x.to(device))
    dtypes = {n: str(getattr(out, n).dtype).replace("torch.", "") for n in ("logits", "patch_logits", "prior_logits", "zero_shot")}
    all_fp32 = set(dtypes.values()) == {"float32"}
    row("scores under bf16 autocast", ", ".join(f"{k} {v}" for k, v in dtypes.items()), all_fp32)
    s = out.logits.float().sort(dim=1).values
    ties = float((s[:, 1:] == s[:, :-1]).float().mean())
    row("tied scores per image", f"{100 * ties:.2f} % of adjacent pairs (bf16 scores at scale 100: most)", ties < 0.01)
    cpu_model, _ = make_model(args.backbone, args.classes, torch.device("cpu"))
    cpu_model.eval()
    with torch.no_grad():
        ref = cpu_model(x).logits
    diff = float((out.logits.float().cpu() - ref).abs().max())
    row(f"largest score difference, {device.type} bf16 vs cpu fp32", f"{diff:.3f} (scale {model.scale:.0f})", diff < 1.0)


def batches(model, vocab, n: int, batch: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    size = model.backbone.clip.visual.image_size
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, *size, generator=g)
        y = torch.where(torch.rand(batch, len(vocab), generator=g) < 0.05, 1, -1).to(torch.int8)
        out.append((x, y))
    return out


def check_resume(args, device, work: Path) -> None:
    from dart_core.train import TrainConfig, fit

    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_epochs=0, log_every=1000, val_share=0)
    model, vocab = make_model(args.backbone, args.classes, device)
    data = batches(model, vocab, 3, args.batch // 4)
    whole = fit(model, data, vocab, work / "whole", TrainConfig(epochs=2, **cfg), device=str(device), log=lambda *_: None)
    class Stop(Exception):
        pass

    def stopping(after: int):  # the run is killed while reading the first batch of epoch 2
        class Data:
            def __len__(self):
                return len(data)

            def __iter__(self):
                for i, b in enumerate(data):
                    if Data.seen == after:
                        raise Stop
                    Data.seen += 1
                    yield b
        Data.seen = 0
        return Data()

    model, vocab = make_model(args.backbone, args.classes, device)
    try:
        fit(model, stopping(len(data)), vocab, work / "stopped", TrainConfig(epochs=2, **cfg), device=str(device),
            log=lambda *_: None)
    except Stop:
        pass
    model, vocab = make_model(args.backbone, args.classes, device)  # a new process would start so
    resumed = fit(model, data, vocab, work / "stopped", TrainConfig(epochs=2, **cfg), device=str(device),
                  log=lambda *_: None)
    steps = [h["step"] for h in resumed if "step" in h and "total" in h]
    a, b = whole[-1]["total"], [h for h in resumed if "total" in h][-1]["total"]
    ok = steps == list(range(1, 7)) and abs(a - b) <= 1e-3 * max(1.0, abs(a))
    row("fit, stop after epoch 1, resume", f"steps {steps[0]}..{steps[-1]}, last loss {b:.5f} vs uninterrupted {a:.5f}", ok)


DDP_CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from benchmarks.gpu_check import make_model, batches
from dart_core.train import TrainConfig, fit
out, device, per_rank, backbone, classes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
model, vocab = make_model(backbone, classes, torch.device(device))
data = [(x[rank::world], y[rank::world]) for x, y in batches(model, vocab, 2, per_rank * 2)]
hist = fit(model, data, vocab, out, TrainConfig(epochs=2, lr=1e-3, min_lr=1e-4, warmup_epochs=0, log_every=1000),
           device=device, log=lambda *_: None)
if rank == 0:
    json.dump([h["total"] for h in hist if "total" in h], open(os.path.join(out, "losses.json"), "w"))
"""


def check_ddp(args, device, work: Path) -> None:
    work.mkdir(parents=True)
    script = work / "ddp_child.py"
    script.write_text(DDP_CHILD.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DART_DIST_BACKEND": "gloo"}
    per_rank = max(2, args.batch // 8)
    common = [str(device), str(per_rank), args.backbone, str(args.classes)]
    t = time.perf_counter()
    for out, cmd in ((work / "one", [sys.executable, str(script)]),
                     (work / "two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_addr", "127.0.0.1", "--master_port", "29517", str(script)])):
        out.mkdir()
        # one process with the doubled batch: pass world-size 1 and the whole batch
        r = subprocess.run(cmd + [str(out)] + common, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if r.returncode:
            row("torchrun --nproc_per_node 2", f"failed: {r.stderr.strip().splitlines()[-1:]}", False)
            return
    a = json.load(open(work / "one" / "losses.json"))
    b = json.load(open(work / "two" / "losses.json"))
    diff = max(abs(x - y) for x, y in zip(a, b))
    row("torchrun --nproc_per_node 2 vs 1 process", f"{len(b)} steps, max |Δloss| {diff:.2e} "
        f"({time.perf_counter() - t:.0f} s)", len(a) == len(b) and diff < 1e-3)


def check_mm_atm_memory(args, device) -> None:
    from dart_core.atm import ATM, NeighbourTable
    from dart_core.crg.graph import random_crg
    from dart_core.vocab import Vocabulary

    if device.type != "cuda":
        row("MM-ATM peak training memory", "needs CUDA (torch.cuda.max_memory_allocated)")
        return
    C, D = 7586, 512
    vocab = Vocabulary.from_names([f"c{i}" for i in range(C)])
    graph = NeighbourTable.from_edge_index(random_crg(vocab, 12, seed=0).edge_index(vocab), C)
    graph = NeighbourTable(graph.index.to(device), graph.mask.to(device))
    atm = ATM(D).to(device)
    h_txt = torch.randn(C, D, device=device)
    peaks = {}
    for B in (4, 8, 16):
        x = torch.randn(B, C, D, device=device, requires_grad=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        atm.multimodal(atm.fuse(x, h_txt), graph).float().square().mean().backward()
        torch.cuda.synchronize(device)
        peaks[B] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        del x
    slope = (peaks[16] - peaks[4]) / 12
    at = {B: peaks[4] + slope * (B - 4) for B in (64, 256)}
    formula = {B: 4 * 16 * B * C * D / 2**30 for B in (64, 256)}
    row("MM-ATM peak (C=7,586, fp32), B=4/8/16", " / ".join(f"{peaks[B]:.2f}" for B in (4, 8, 16)) + " GiB")
    row("  extrapolated B=64 / 256", f"{at[64]:.1f} / {at[256]:.1f} GiB (docs' formula {formula[64]:.1f} / "
        f"{formula[256]:.1f} GiB)", at[256] <= 1.5 * formula[256])


def check_annotate_bytes(args, device) -> None:
    import numpy as np

    from dart_core.infer import tag_patches

    model, _ = make_model(args.backbone, args.classes, device)
    model.eval()
    size = model.backbone.clip.visual.image_size
    B = args.batch
    x = torch.randn(B, 3, *size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x)
    scores = out.logits.float().cpu().numpy()
    order = np.argsort(-scores, axis=1)[:, :10]
    tb = np.repeat(np.arange(B), 10)
    tc = order.reshape(-1)
    patches, pscores = tag_patches(out, out.patch_logits, tb, tc, zero_shot=False)
    sent = scores.nbytes + patches.nbytes + pscores.nbytes
    whole = out.patch_logits.numel() * 4
    row("annotate: bytes to the host per batch", f"{sent / 2**10:,.0f} KiB (scores + top-10 tags' patches) vs "
        f"{whole / 2**10:,.0f} KiB for the whole (B, P, C) patch scores (B={B}, C={args.classes})", sent < whole / 10)


def check_speed(args, device) -> None:
    from dart_core.losses import loss_terms, weighted_total

    model, vocab = make_model(args.backbone, args.classes, device)
    size = model.backbone.clip.visual.image_size
    B = args.batch
    x = torch.randn(B, 3, *size, device=device)
    y = torch.where(torch.rand(B, len(vocab), device=device) < 0.05, 1, -1).to(torch.int8)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.eval()
    with torch.no_grad(), torch.autocast(**amp):
        bare = timed(lambda: model.backbone.clip.encode_image(x), device)
        infer = timed(lambda: model(x, with_priors=False), device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(**amp):
            out = model(x)
        loss, _ = weighted_total(loss_terms(out, y, 0.5, model.cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = timed(step, device, repeats=2)
    row("images/s: bare encode_image", f"{B / bare:.1f}")
    row(f"images/s: DART inference (C={args.classes})", f"{B / infer:.1f} (x{infer / bare:.2f} the bare time)")
    row(f"images/s: DART training step (C={args.classes})", f"{B / train:.1f} (x{train / bare:.2f} the bare time)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default=None, help="open_clip model (default ViT-B-16 on CUDA, dart-tiny-vit on CPU)")
    ap.add_argument("--classes", type=int, default=None, help="vocabulary size (default 1006 on CUDA, 64 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch for the speed rows (default 64 on CUDA, 8 on CPU)")
    ap.add_argument("--skip-ddp", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    big = device.type == "cuda"
    args.backbone = args.backbone or ("ViT-B-16" if big else "dart-tiny-vit")
    args.classes = args.classes or (1006 if big else 64)
    args.batch = args.batch or (64 if big else 8)
    from dart_core.backbone import register_model_configs

    register_model_configs()
    name = torch.cuda.get_device_name(device) if big else "CPU (smoke test of this script)"
    print(f"gpu_check on {name}, torch {torch.__version__}, backbone {args.backbone}, {args.classes} classes", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        check_dtypes(args, device)
        check_resume(args, device, work / "resume")
        if not args.skip_ddp:
            check_ddp(args, device, work / "ddp")
        check_mm_atm_memory(args, device)
        check_annotate_bytes(args, device)
        check_speed(args, device)
    print(f"\n| check | result | |\n|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s; {sum(r[2] == 'FAIL' for r in ROWS)} failed")
    sys.exit(1 if any(r[2] == "FAIL" for r in ROWS) else 0)


if __name__ == "__main__":
    main()
