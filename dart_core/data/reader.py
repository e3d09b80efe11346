"""Training / inference reader over the shards (a webdataset pipeline).

    list_shards(root) -> complete shards' .tar URLs, sorted
    make_loader(shards, vocab, preprocess, batch_size, *, train, ...) -> yields (images, labels, keys)

s3:// shards are read without importing boto3 here: each URL becomes a webdataset `pipe:` URL
running `python -m flows.storage cat URL`, which streams the object with the project's S3 client
(same endpoint / credentials / retries as everything else). Listing an s3:// root runs
`python -m flows.storage ls URL` the same way, or takes an injected `lister`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

from dart_core.vocab import Vocabulary

_STATS = re.compile(r"^(\d{6})_stats\.json$")


def _s3_names(root: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "flows.storage", "ls", root], check=True,
                         capture_output=True, text=True)
    return out.stdout.split()


def list_shards(root: str, lister: Callable[[str], list[str]] | None = None) -> list[str]:
    """Complete shards (those with a stats file) under `root`, sorted, as .tar paths/URLs.
    `lister(root)` returns the file names directly under root (default: local dir or s3)."""
    root = str(root)
    if lister is not None:
        names = lister(root)
    elif root.startswith("s3://"):
        names = _s3_names(root)
    else:
        p = Path(root)
        names = [q.name for q in p.iterdir() if q.is_file()] if p.is_dir() else []
    names = set(names)
    ids = sorted(m.group(1) for n in names if (m := _STATS.match(n)) and f"{m.group(1)}.tar" in names)
    sep = "" if root.endswith("/") else "/"
    return [f"{root}{sep}{i}.tar" if "://" in root else str(Path(root, f"{i}.tar")) for i in ids]


class ShardsError(ValueError):
    """A shard folder with nothing to read; names the folder and what it holds instead."""


def split_folders(root: str) -> list[str]:
    """Names of the subfolders of a local `root` that hold complete shards: `root` is a
    `dart shard` output (classes.csv + one folder per split), not a folder of shards."""
    p = Path(root)
    if root.startswith("s3://") or not p.is_dir():
        return []
    return sorted(q.name for q in p.iterdir() if q.is_dir() and list_shards(str(q)))


def require_shards(root: str, option: str = "--shards") -> list[str]:
    """list_shards(root), never empty: else a ShardsError that names `root` and, when it is a
    dataset root given instead of one of its splits, the splits to pass instead."""
    found = list_shards(root)
    if found:
        return found
    splits = split_folders(root)
    if splits:
        pick = "train" if "train" in splits else splits[0]
        raise ShardsError(f"{option} {root} holds no shards; it has splits {', '.join(splits)}: "
                          f"pass {Path(root, pick)}")
    raise ShardsError(f"{option} {root}: no complete shards there (NNNNNN.tar with its NNNNNN_stats.json)")


def is_validation(key: str, share: float) -> bool:
    """A stable hold-out: the sample whose key hashes below `share` belongs to the validation slice,
    in every run, on every rank, whatever the shard layout (sha1 of the key, first 8 hex digits)."""
    import hashlib

    return share > 0 and int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < share * 0x100000000


class _KeyFilter:
    """Picklable select stage: keep the samples whose held-out flag equals `validation`; only the
    shards in `urls` hold out samples (None: every shard)."""

    def __init__(self, share: float, validation: bool, urls=None):
        self.share, self.validation = share, validation
        self.urls = None if urls is None else frozenset(to_wds_url(str(u)) for u in urls)

    def __call__(self, sample: dict) -> bool:
        held = (self.urls is None or sample.get("__url__") in self.urls) and is_validation(sample["__key__"], self.share)
        return held == self.validation


def to_wds_url(url: str) -> str:
    if url.startswith("s3://"):
        return f"pipe:{shlex.quote(sys.executable)} -m flows.storage cat {shlex.quote(url)}"
    return url


def labels_tensor(meta: dict, index: dict[str, int], n: int):
    """json labels {class id: ±1} -> int8 (n,) in vocabulary order; ids outside the vocab ignored."""
    import torch

    t = torch.zeros(n, dtype=torch.int8)
    for cid, v in (meta.get("labels") or {}).items():
        i = index.get(cid)
        if i is not None:
            t[i] = 1 if v > 0 else -1 if v < 0 else 0
    return t


class _Sample:
    """Picklable per-sample transform (DataLoader workers may be spawned)."""

    def __init__(self, vocab: Vocabulary, preprocess):
        self.index = {cid: i for i, cid in enumerate(vocab.ids)}
        self.n = len(vocab)
        self.preprocess = preprocess

    def __call__(self, sample: dict):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(sample["jpg"])) as im:
            img = self.preprocess(im.convert("RGB"))
        meta = json.loads(sample["json"])
        return img, labels_tensor(meta, self.index, self.n), sample["__key__"]


def _collate(batch):
    import torch

    imgs, labels, keys = zip(*batch)
    return torch.stack(list(imgs)), torch.stack(list(labels)), list(keys)


def _valid_member(sample: dict) -> bool:
    # tar member names are validated: a sample needs both parts, and no path in its key
    key = sample.get("__key__", "")
    return "jpg" in sample and "json" in sample and "/" not in key and ".." not in key


def make_loader(shards, vocab: Vocabulary, preprocess, batch_size: int, *, train: bool,
                shuffle_buffer: int = 1000, num_workers: int = 0, seed: int = 0,
                drop_last: bool | None = None, holdout: tuple | None = None,
                all_ranks: bool = False) -> Iterable:
    """Batches (images (B,3,H,W) float, labels (B,len(vocab)) int8 in {-1,0,1}, keys list[str]).

    train=True: shards shuffled (seeded), split by node (torch.distributed rank / world size, or
    RANK/WORLD_SIZE) and by DataLoader worker, samples through a shuffle buffer; drops the last
    partial batch unless drop_last=False.
    train=False: no shuffling; each shard goes whole to exactly one (node, worker) — shard i to
    flat worker i mod (world_size*num_workers) — and is read in order, so every sample is yielded
    exactly once across all ranks and workers; the last partial batch is kept unless drop_last=True.
    holdout=(share, validation[, shard urls]): only the samples outside (False) or inside (True) the
    validation slice `is_validation(key, share)` of the given shards (default: all). all_ranks=True (train=False only): this process reads every
    shard whatever its rank (rank 0 scoring the validation slice alone).
    """
    import webdataset as wds

    urls = list_shards(shards) if isinstance(shards, (str, os.PathLike)) else [str(s) for s in shards]
    urls = [to_wds_url(u) for u in urls]
    if drop_last is None:
        drop_last = train
    if train:
        stages = [wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(), wds.select(_valid_member), wds.shuffle(shuffle_buffer, seed=seed)]
    else:
        split = wds.split_by_worker if all_ranks else _split_eval
        stages = [wds.SimpleShardList(urls), split, wds.tarfile_to_samples(), wds.select(_valid_member)]
    if holdout is not None and holdout[0] > 0:
        stages.append(wds.select(_KeyFilter(*holdout)))
    stages += [wds.map(_Sample(vocab, preprocess)),
               wds.batched(batch_size, collation_fn=_collate, partial=not drop_last)]
    pipeline = wds.DataPipeline(*stages)
    if num_workers == 0:
        return pipeline
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                         persistent_workers=False, shuffle=False)


def _split_eval(src):
    """Shard i to exactly one (rank, worker) pair: i mod (world_size * num_workers)."""
    from webdataset.utils import pytorch_worker_info

    rank, world, worker, nworkers = pytorch_worker_info()
    me, total = rank * nworkers + worker, world * nworkers
    for i, s in enumerate(src):
        if i % total == me:
            yield s
