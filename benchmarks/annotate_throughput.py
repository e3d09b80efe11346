"""Annotate throughput at real shard sizes: bare forward vs in-shard vs end to end, in one run.

    python benchmarks/annotate_throughput.py [--shards 3] [--shard-size 1000] [--batch 64]
        [--classes 1006] [--backbone dart-world-vit] [--threads 1] [--num-workers 1]
        [--rounds 2] [--bare-images 512] [--cli] [--keep DIR]

Shards in the real format (dart_core.data.shard_format: `<key>.jpg` + `<key>.json` members, a
stats file as done marker), JPEGs of 256x320 px (shorter side 256, as `dart shard` stores them,
photo-like: gradient + noise, quality 90). The model: a random-weights DART on `dart-world-vit`
(dart_core/model_configs: 64 px input, 8 px patches -> 8x8 grid, 4 blocks of width 192), a small
backbone so that JPEG decoding is a visible share of the work; `--classes` classes. CPU, torch
with `--threads` threads (default 1: the measurement of ONE annotate worker, whose decoding runs
beside it on the other core).

  * bare      : the model forward alone on tensors decoded beforehand (same batch size), images/s;
  * in-shard  : `annotate_shard` over the first shard, model already loaded (read, decode, forward,
                tag selection, parquet writing, done marker), images/s from inside the shard;
                bare and in-shard are measured `--rounds` times, interleaved, and the best of each
                is reported (on a shared machine other processes' load comes and goes);
  * end to end: `annotate_flow` over all shards (threads runner, 1 shard task at a time), wall
                time including the model load, worker start-up and run files (Prefect's temporary
                API server is started beforehand: a one-off of the Python process, not of annotate);
  * cli (--cli): a whole `dart annotate` process over all shards, wall time from the shell (adds
                interpreter start, imports and Prefect's server), and its peak RSS.
Prints images/s, the ratios to the bare forward, a profile of where the in-shard time goes, and
peak RSS. Each run also checks that every sample has exactly one scores row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---- data and model -------------------------------------------------------------------------------

def make_shards(root: Path, n_shards: int, shard_size: int, seed: int = 0) -> None:
    """`root/val/NNNNNN.tar` + `NNNNNN_stats.json`, written with the shard-format module's own bytes."""
    import io

    import numpy as np
    from PIL import Image

    from dart_core.data import shard_format as F

    rng = np.random.default_rng(seed)
    w, h = 320, 256
    base = np.linspace(0, 255, w)[None, :, None] + np.linspace(0, 128, h)[:, None, None]
    split = root / "val"
    split.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        body = bytearray()
        for _ in range(shard_size):
            a = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "JPEG", quality=90)
            key = f"img{k:07d}"
            meta = F.sample_json(key, {"c0": 1, f"c{1 + k % 50}": -1}, {"path": f"{key}.jpg"})
            body += F.sample_tar_bytes(key, buf.getvalue(), meta)
            k += 1
        body += F.tar_end(len(body))
        (split / F.file_name(s, F.TAR)).write_bytes(bytes(body))
        (split / F.file_name(s, F.STATS)).write_bytes(F.stats_bytes({"ok": shard_size, "failed": 0}))


def setup(work: Path, backbone: str, classes: int) -> tuple[str, str]:
    """A random CLIP of `backbone` saved as a local open_clip checkpoint, and a DART checkpoint on it."""
    import open_clip
    import torch

    from dart_core.backbone import register_model_configs
    from dart_core.checkpoint import save_checkpoint
    from dart_core.model import DART, DARTConfig
    from dart_core.vocab import Vocabulary

    register_model_configs()
    torch.manual_seed(0)
    clip = work / f"{backbone}-random.pt"
    torch.save(open_clip.create_model(backbone).state_dict(), clip)
    vocab = Vocabulary.from_names([f"c{i}" for i in range(classes)], unseen={f"c{i}" for i in range(classes // 10)})
    vocab.write_csv(work / "classes.csv")
    model = DART(DARTConfig(backbone=backbone, pretrained=str(clip)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(1.0) if n.endswith("gamma") else p.normal_(0, 0.02)
    save_checkpoint(work / "model.pt", model, vocab.subset("seen"))
    return str(work / "model.pt"), str(work / "classes.csv")


def load(ckpt: str, classes_csv: str):
    from dart_core.checkpoint import load_model
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.read_csv(classes_csv)
    model, _ = load_model(ckpt)
    model.set_classes(list(vocab.names))
    model.eval()
    return model, vocab


# ---- the three measurements -----------------------------------------------------------------------

def decode_shard(model, vocab, shard: str, limit: int):
    """(the first `limit` images of the shard as one tensor, decode+preprocess ms per image)."""
    import torch
    import webdataset as wds

    from dart_core.data.shard_format import SampleDecoder

    dec = SampleDecoder(vocab.ids, model.backbone.preprocess, strict=False)
    t = time.perf_counter()
    images = []
    for s in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()):
        images.append(dec(s)[0])
        if len(images) == limit:
            break
    return torch.stack(images), 1000 * (time.perf_counter() - t) / len(images)


def bare_forward(model, x, batch: int) -> float:
    """The model forward alone on pre-decoded tensors (as annotate calls it), images/s."""
    import torch

    with torch.inference_mode():
        model(x[:batch], with_priors=False)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i:i + batch], with_priors=False)
        return len(x) / (time.perf_counter() - t)


def in_shard(model, vocab, shard: str, out: Path, batch: int, num_workers: int) -> tuple[float, dict]:
    """annotate_shard over one shard with the model loaded; the time inside it split by phase."""
    import dart_core.infer as infer
    from dart_core.options.annotate import AnnotateOptions

    prof = {"wait for data": 0.0, "forward": 0.0, "parquet writing": 0.0}
    real_batches, real_write, real_forward = infer.shard_batches, infer._write_table, model.forward

    def batches(*a, **kw):
        it = iter(real_batches(*a, **kw))
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                prof["wait for data"] += time.perf_counter() - t
                return
            prof["wait for data"] += time.perf_counter() - t
            yield b

    def forward(*a, **kw):
        t = time.perf_counter()
        r = real_forward(*a, **kw)
        prof["forward"] += time.perf_counter() - t
        return r

    def write(*a, **kw):
        t = time.perf_counter()
        r = real_write(*a, **kw)
        prof["parquet writing"] += time.perf_counter() - t
        return r

    infer.shard_batches, infer._write_table, model.forward = batches, write, forward
    try:
        t = time.perf_counter()
        s = infer.annotate_shard(model, vocab, shard, out, AnnotateOptions(
            checkpoint="-", shards=shard, classes="-", out=out, batch_size=batch, decode_threads=num_workers))
        wall = time.perf_counter() - t
    finally:
        infer.shard_batches, infer._write_table = real_batches, real_write
        del model.forward
    prof["tag selection, rows, publish"] = wall - sum(prof.values())
    prof["wall"] = wall
    return s["images"] / wall, prof


def end_to_end(ckpt: str, classes_csv: str, shards: Path, out: Path, batch: int, num_workers: int) -> tuple[float, dict]:
    from prefect import flow

    import dart_core.infer as infer
    import flows.annotate as fa
    from dart_core.options.annotate import AnnotateOptions

    @flow
    def warm_up() -> None:  # starts Prefect's temporary API server outside the timed region
        return None

    warm_up()
    infer._models.clear()  # the flow loads the model itself (counted)
    t = time.perf_counter()
    s = fa.annotate_flow(AnnotateOptions(checkpoint=ckpt, shards=shards, classes=classes_csv, out=out, batch_size=batch,
                                         workers=1, mode="overwrite", decode_threads=num_workers))
    wall = time.perf_counter() - t
    done = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    return s["images"] / wall, {"wall": wall, "in shards": sum(d["seconds"] for d in done), "images": s["images"]}


def cli_run(ckpt: str, classes_csv: str, shards: Path, out: Path, batch: int, threads: int) -> tuple[float, float, float, int]:
    """(wall s, process peak RSS MiB, largest child peak RSS MiB, images) of one `dart annotate` process."""
    code = ("import resource, sys; from flows.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "annotate", "--checkpoint", ckpt, "--shards", str(shards),
                        "--classes", classes_csv, "--out", str(out), "--batch-size", str(batch), "--workers", "1",
                        "--mode", "overwrite"], capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RSS")]
    if r.returncode or not line or "annotated" not in r.stdout:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:])
    own, children = map(int, line[-1].split()[1:])
    images = int(r.stdout.split("annotated ")[1].split()[0])
    return wall, own / 1024, children / 1024, images


def scores_rows(out: Path) -> tuple[int, int]:
    """(scores rows, distinct image ids) over all shards of a prediction folder."""
    import pyarrow.parquet as pq

    ids = []
    for p in sorted((out / "scores").glob("shard=*/part.parquet")):
        ids += pq.read_table(p, columns=["image_id"]).column(0).to_pylist()
    return len(ids), len(set(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=1006)
    ap.add_argument("--backbone", default="dart-world-vit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the (one) annotate worker")
    ap.add_argument("--num-workers", type=int, default=1, help="AnnotateOptions.decode_threads (decoding beside the model)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="bare and in-shard measured this many times, interleaved; the best of each is reported "
                         "(a shared machine's load comes and goes)")
    ap.add_argument("--bare-images", type=int, default=512, help="images of the bare-forward pass")
    ap.add_argument("--cli", action="store_true", help="also time a whole `dart annotate` process (+ its peak RSS)")
    ap.add_argument("--keep", help="generate / reuse the shards and checkpoint in this folder instead of a temp one")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        shards = work / f"shards-{args.shards}x{args.shard_size}"
        if not (shards / "val" / "000000_stats.json").exists():
            make_shards(shards, args.shards, args.shard_size)
        ckpt, classes_csv = setup(work, args.backbone, args.classes)
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        model, vocab = load(ckpt, classes_csv)
        t_load = time.perf_counter() - t
        first = str(shards / "val" / "000000.tar")
        x, decode_ms = decode_shard(model, vocab, first, args.bare_images)
        n_bare = len(x)
        load0 = os.getloadavg()[0]
        bares, ins_runs = [], []
        for r in range(args.rounds):
            bares.append(bare_forward(model, x, args.batch))
            import shutil

            shutil.rmtree(work / "pred_in_shard", ignore_errors=True)
            ins_runs.append(in_shard(model, vocab, first, work / "pred_in_shard", args.batch, args.num_workers))
        bare = max(bares)
        ins, prof = max(ins_runs, key=lambda r: r[0])
        del model, x
        e2e, e = end_to_end(ckpt, classes_csv, shards, work / "pred_e2e", args.batch, args.num_workers)
        rows = scores_rows(work / "pred_e2e")
        assert rows == (e["images"], e["images"]) == (args.shards * args.shard_size,) * 2, rows
        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        n = args.shards * args.shard_size
        print(f"\n{args.backbone} DART (random weights), {args.classes} classes, {args.shards} shards x "
              f"{args.shard_size} images (256x320 JPEG), batch {args.batch}, CPU, torch threads {args.threads}, "
              f"num_workers {args.num_workers}, {os.cpu_count()} cores   (set-up {t_gen:.0f} s)")
        print(f"load average (1 min) {load0:.1f} before the measurements, {os.getloadavg()[0]:.1f} after")
        print(f"bare forward on pre-decoded tensors  {bare:7.1f} images/s   ({n_bare} images; rounds: "
              f"{', '.join(f'{b:.1f}' for b in bares)})")
        print(f"in-shard (annotate_shard, 1 shard)   {ins:7.1f} images/s   ratio {ins / bare:.2f}   (rounds: "
              f"{', '.join(f'{r[0]:.1f}' for r in ins_runs)})")
        print(f"end to end (annotate_flow, {args.shards} shards) {e2e:7.1f} images/s   ratio {e2e / bare:.2f}   "
              f"({e['wall']:.1f} s, of which {e['in shards']:.1f} s inside shard tasks)")
        print(f"profile of the in-shard run ({prof['wall']:.1f} s, {args.shard_size} images), ms per image:")
        for k, v in prof.items():
            if k != "wall":
                print(f"    {k:28s} {1000 * v / args.shard_size:6.2f}   {100 * v / prof['wall']:5.1f} %")
        print(f"    (decode + preprocess, 1 thread, measured apart: {decode_ms:.2f} ms per image = "
              f"{decode_ms * bare / 10:.0f} % of the bare forward's time; it runs beside the model)")
        print(f"end to end beyond the shard tasks: {e['wall'] - e['in shards']:.1f} s (model load alone "
              f"{t_load:.1f} s), shard tasks {1000 * e['in shards'] / n:.2f} ms per image")
        print(f"scores rows {rows[0]} for {n} samples ({rows[1]} distinct)")
        print(f"peak RSS of this process (model, in-shard rows, flow) {rss_self:.0f} MiB")
        if args.cli:
            wall, own, child, images = cli_run(ckpt, classes_csv, shards, work / "pred_cli", args.batch, args.threads)
            print(f"`dart annotate` whole process: {wall:.1f} s, {images / wall:.1f} images/s, ratio {images / wall / bare:.2f} "
                  f"(incl. interpreter start, imports, Prefect's temporary server); peak RSS {own:.0f} MiB, largest child "
                  f"{child:.0f} MiB (Prefect's server; a fork+exec child counts its parent's RSS at the fork)")


if __name__ == "__main__":
    main()
