"""Throughput of the whole annotate flow vs the bare model forward, in one run.

    python benchmarks/annotate_throughput.py [--images 32] [--shard-size 16] [--batch 16] [--classes 1006]

Over the same shards (JPEGs of 256 px, as the shard writer stores them), on a ViT-B-16-shaped DART
with random weights on CPU:
  * flow : `annotate_flow` end to end (checkpoint load, shard reading and JPEG decoding in a
           DataLoader worker, model, parquet writing), images/s from the flow's own wall time;
  * bare : the same model's forward on tensors decoded beforehand, images/s;
and their ratio (aim >= 0.9). Then the peak RSS of a whole `dart annotate` process over 1x and 4x
the shards (it should not grow with the number of shards).
"""
from __future__ import annotations

import argparse
import io
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


def make_shards(root: Path, n: int, shard_size: int, seed: int = 0) -> None:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, shard_size):
        tar = root / f"{s // shard_size:06d}.tar"
        with wds.TarWriter(str(tar)) as w:
            for i in range(s, min(n, s + shard_size)):
                arr = (rng.random((256, 320, 3)) * 255).astype("uint8")
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                w.write({"__key__": f"img{i:06d}", "jpg": buf.getvalue(),
                         "json": json.dumps({"id": f"img{i:06d}", "labels": {"c0": 1}}).encode()})
        tar.with_name(tar.stem + "_stats.json").write_text(json.dumps({"ok": min(n, s + shard_size) - s}))


def setup(work: Path, classes: int) -> tuple[str, str]:
    """A random ViT-B-16 CLIP saved as a local open_clip checkpoint, and a DART checkpoint on it."""
    import torch
    import open_clip

    from dart_core.checkpoint import save_checkpoint
    from dart_core.model import DART, DARTConfig
    from dart_core.vocab import Vocabulary

    torch.manual_seed(0)
    clip = work / "vit-b-16-random.pt"
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), clip)
    vocab = Vocabulary.from_names([f"c{i}" for i in range(classes)], unseen={f"c{i}" for i in range(classes // 10)})
    vocab.write_csv(work / "classes.csv")
    model = DART(DARTConfig(backbone="ViT-B-16", pretrained=str(clip)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(1.0) if n.endswith("gamma") else p.normal_(0, 0.02)
    save_checkpoint(work / "model.pt", model, vocab.subset("seen"))
    return str(work / "model.pt"), str(work / "classes.csv")


def bare_forward(ckpt: str, classes_csv: str, shards: Path, batch: int) -> float:
    import torch
    import webdataset as wds
    from PIL import Image

    from dart_core.checkpoint import load_model
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.read_csv(classes_csv)
    model, _ = load_model(ckpt)
    model.set_classes(list(vocab.names))
    model.eval()
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    images = [model.backbone.preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
              for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    x = torch.stack(images)
    with torch.inference_mode():
        model(x[:2], with_priors=False)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i:i + batch], with_priors=False)
        return len(x) / (time.perf_counter() - t)


def flow_run(ckpt: str, classes_csv: str, shards: Path, out: Path, batch: int) -> float:
    from prefect import flow

    from flows.annotate import annotate_flow

    @flow
    def warm_up() -> None:  # starts Prefect's temporary API server outside the timed region
        return None

    warm_up()
    t = time.perf_counter()
    s = annotate_flow(ckpt, str(shards), classes_csv, str(out), batch_size=batch, workers=1, mode="overwrite")
    end_to_end = s["images"] / (time.perf_counter() - t)
    # inside the shard tasks (one at a time): read + decode + model + parquet, without the one-off
    # model load and vocabulary text embedding that a real shard of thousands of images amortises
    done = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    in_shards = sum(d["images"] for d in done) / sum(d["seconds"] for d in done)
    return end_to_end, in_shards


def peak_rss(ckpt: str, classes_csv: str, shards: Path, out: Path, batch: int) -> float:
    """MiB: the `dart annotate` process and its children (DataLoader workers, Prefect server)."""
    code = ("import resource, sys; from flows.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, "annotate", "--checkpoint", ckpt, "--shards", str(shards),
                        "--classes", classes_csv, "--out", str(out), "--batch-size", str(batch), "--workers", "1",
                        "--mode", "overwrite"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RSS")]
    if not line:
        raise RuntimeError(r.stderr[-3000:])
    own, children = map(int, line[-1].split()[1:])
    return own / 1024, children / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1006)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, classes_csv = setup(work, args.classes)
        make_shards(work / "shards1" / "val", args.images, args.shard_size)
        bare = bare_forward(ckpt, classes_csv, work / "shards1" / "val", args.batch)
        flow, in_shards = flow_run(ckpt, classes_csv, work / "shards1", work / "pred", args.batch)
        print(f"ViT-B-16 DART, random weights, {args.classes} classes, {args.images} images, batch {args.batch}, CPU")
        print(f"bare forward on pre-decoded tensors:        {bare:.2f} images/s")
        print(f"annotate flow, inside the shard tasks:      {in_shards:.2f} images/s   ratio {in_shards / bare:.2f}")
        print(f"annotate flow end to end (incl. model load,  {flow:.2f} images/s   ratio {flow / bare:.2f}")
        print("  vocabulary text embedding, worker start-up)")
        if not args.skip_rss:
            make_shards(work / "shards4" / "val", 4 * args.images, args.shard_size, seed=1)
            r1 = peak_rss(ckpt, classes_csv, work / "shards1", work / "pred_rss1", args.batch)
            r4 = peak_rss(ckpt, classes_csv, work / "shards4", work / "pred_rss4", args.batch)
            print(f"peak RSS, 1x shards ({args.images} images): process {r1[0]:.0f} MiB, largest child {r1[1]:.0f} MiB")
            print(f"peak RSS, 4x shards ({4 * args.images} images): process {r4[0]:.0f} MiB, largest child {r4[1]:.0f} MiB")


if __name__ == "__main__":
    main()
