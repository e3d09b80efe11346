"""Shard throughput vs a bare PIL loop, and peak memory at N and 4N images.

    python benchmarks/shard_throughput.py --n 400 [--workers K] [--size 640x480]

1. generates N photo-like JPEGs (gradient + noise) in a temp folder with a labels.csv;
2. bare loop: the same decode -> EXIF transpose -> RGB -> resize (shorter side 256, JPEG draft
   decoding) -> JPEG encode, with PIL in a ProcessPoolExecutor over all cores, nothing written;
3. `dart shard`'s code path (dart_core.data.shard_run.shard_source, folder format) on the same files;
4. peak RSS (parent, and the largest worker) of sharding N and 4N images, each in a fresh process.
Prints images/s of both, their ratio, and the RSS figures.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int, w: int, h: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, w)[None, :, None] + np.linspace(0, 128, h)[:, None, None]
    rows = ["path,labels"]
    for i in range(n):
        a = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"i{i:06d}.jpg", quality=90)
        rows.append(f"i{i:06d}.jpg,{'a' if i % 2 else 'b|-a'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def bare_one(path: str) -> int:
    with Image.open(path) as im:
        w, h = im.size
        s = 256 / min(w, h)
        im.draft("RGB", (int(w * s + 1), int(h * s + 1)))
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        if s < 1:
            im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return len(buf.getvalue())


def bare(paths: list[str], workers: int) -> float:
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sum(pool.map(bare_one, paths, chunksize=16))
    return time.perf_counter() - t


RSS_CHILD = """
import json, os, resource, sys, threading, time
from dart_core.data.shard_run import shard_source
from dart_core.options.data import ShardOptions

peak = {"kb": 0}
def descendants_rss_kb():
    # pool workers are children of the forkserver, not of us: walk /proc for our descendants
    kids, parent = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    me, best = os.getpid(), 0
    for pid in parent:
        p = pid
        while p in parent and p != me and p > 1:
            p = parent[p]
        if p == me and pid != me:
            try:
                with open(f"/proc/{pid}/status") as f:
                    best = max(best, next(int(l.split()[1]) for l in f if l.startswith("VmRSS")))
            except (OSError, StopIteration):
                pass
    return best
def poll():
    while True:
        peak["kb"] = max(peak["kb"], descendants_rss_kb()); time.sleep(0.2)
threading.Thread(target=poll, daemon=True).start()
r = shard_source(ShardOptions(source=sys.argv[1], format="folder", out=sys.argv[2], shard_size=1000,
                              workers=int(sys.argv[3])), progress=False)
print(json.dumps({"ok": r["ok"], "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": peak["kb"]}))
"""


def rss_run(src: Path, out: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), str(out), str(workers)],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-rss", action="store_true")
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    from dart_core.data.shard_run import shard_source
    from dart_core.options.data import ShardOptions

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "n", a.n, w, h)
        paths = sorted(str(p) for p in (tmp / "n").glob("*.jpg"))
        bare(paths[: min(32, len(paths))], a.workers)  # warm the page cache and the pool start-up path
        # alternate the two, best of `repeats` each: other load on the machine hits both alike
        t_bare = t_shard = float("inf")
        for _ in range(a.repeats):
            t_bare = min(t_bare, bare(paths, a.workers))
            t0 = time.perf_counter()
            r = shard_source(ShardOptions(source=str(tmp / "n"), format="folder", out=str(tmp / "out"),
                                          shard_size=1000, workers=a.workers, mode="overwrite"), progress=False)
            t_shard = min(t_shard, time.perf_counter() - t0)
            assert r["ok"] == a.n, r
        bare_ips, shard_ips = a.n / t_bare, a.n / t_shard
        print(f"images {a.n} ({w}x{h} JPEG -> shorter side 256), workers {a.workers}, cpus {os.cpu_count()}, "
              f"best of {a.repeats}, load average {os.getloadavg()[0]:.1f}")
        print(f"bare PIL loop : {bare_ips:8.1f} images/s")
        print(f"dart shard    : {shard_ips:8.1f} images/s (incl. pool start-up, tar+parquet+stats writes)")
        print(f"ratio         : {shard_ips / bare_ips:8.2f}")
        if not a.no_rss:
            make_images(tmp / "n4", 4 * a.n, w, h)
            r1 = rss_run(tmp / "n", tmp / "o1", a.workers)
            r4 = rss_run(tmp / "n4", tmp / "o4", a.workers)
            print(f"peak RSS N={a.n:<6}: writer {r1['self_kb'] / 1024:7.1f} MiB, largest worker {r1['workers_kb'] / 1024:7.1f} MiB")
            print(f"peak RSS 4N={4 * a.n:<5}: writer {r4['self_kb'] / 1024:7.1f} MiB, largest worker {r4['workers_kb'] / 1024:7.1f} MiB")


if __name__ == "__main__":
    main()
