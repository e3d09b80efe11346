"""Training / inference reader over the shards (a webdataset pipeline).

    list_shards(root) -> complete shards' .tar URLs, sorted
    make_loader(shards, vocab, preprocess, batch_size, *, train, ...) -> yields (images, labels, keys)

Local paths and s3:// URLs alike (dart_core.storage): s3:// shards are streamed in-process by
webdataset through the `s3` scheme dart_core.storage registers (one client per process, so per
DataLoader worker); the shard format (names, members, decoding) is dart_core.data.shard_format.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from dart_core import storage
from dart_core.data import shard_format as F
from dart_core.vocab import Vocabulary


def list_shards(root: str, lister: Callable[[str], list[str]] | None = None) -> list[str]:
    """Complete shards (those with a stats file) under `root`, sorted, as .tar paths/URLs.
    `lister(root)` returns the file names directly under root (default: storage.list_names)."""
    root = str(root)
    names = (lister or storage.list_names)(root)
    return [storage.join(root, n) for n in F.complete_tars(names)]


class ShardsError(ValueError):
    """A shard folder with nothing to read; names the folder and what it holds instead."""


def split_folders(root: str) -> list[str]:
    """Names of the subfolders of `root` (local or s3://) that hold complete shards: `root` is a
    `dart shard` output (classes.csv + one folder per split), not a folder of shards."""
    return [d for d in storage.list_dirs(root) if list_shards(storage.join(root, d))]


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
                          f"pass {storage.join(root, pick)}")
    raise ShardsError(f"{option} {root}: no complete shards there (NNNNNN.tar with its NNNNNN_stats.json)")


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard, from their stats files (0 where a shard has none): what training and the annotate progress count."""
    from dart_core.data.shard_format import sample_count

    return [sample_count(url) for url in shards]


def count_samples(shards_root: str) -> int:
    """ok samples over the complete shards, from their stats files (local or s3)."""
    return sum(shard_sample_counts(require_shards(shards_root)))


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
        self.urls = None if urls is None else frozenset(str(u) for u in urls)

    def __call__(self, sample: dict) -> bool:
        held = (self.urls is None or sample.get("__url__") in self.urls) and is_validation(sample["__key__"], self.share)
        return held == self.validation


def opened_here(src):
    """Pipeline stage placed before the tar reader: registers the `s3` webdataset scheme in the
    process that opens the shards (the main one, or a DataLoader worker, forked or spawned)."""
    storage.register_webdataset()
    yield from src


class _Corrected:
    """Picklable map stage: labels of a decoded sample with corrections on top ({key: {class id: label}},
    dart_core.corrections); classes outside the vocabulary are ignored."""

    def __init__(self, corrections: dict, class_ids):
        index = {cid: i for i, cid in enumerate(class_ids)}
        self.fix = {k: [(index[c], v) for c, v in d.items() if c in index] for k, d in corrections.items()}

    def __call__(self, item):
        fix = self.fix.get(item[2])
        if fix:
            labels = item[1].clone()
            for i, v in fix:
                labels[i] = v
            item = (item[0], labels, *item[2:])
        return item


def _collate(batch):
    import torch

    imgs, labels, keys, _ = zip(*batch)
    return torch.stack(list(imgs)), torch.stack(list(labels)), list(keys)


def make_loader(shards, vocab: Vocabulary, preprocess, batch_size: int, *, train: bool,
                shuffle_buffer: int = 1000, num_workers: int = 0, seed: int = 0,
                drop_last: bool | None = None, holdout: tuple | None = None,
                all_ranks: bool = False, corrections: dict | None = None, pin_memory: bool = False) -> Iterable:
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
    corrections: {sample key: {class id: 1 | -1 | 0}} applied on top of the shard labels
    (dart_core.corrections.Corrections.by_image()).
    """
    import webdataset as wds

    urls = list_shards(shards) if isinstance(shards, (str, os.PathLike)) else [str(s) for s in shards]
    if drop_last is None:
        drop_last = train
    if train:
        stages = [wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker, opened_here,
                  wds.tarfile_to_samples(), wds.select(F.valid_member), wds.shuffle(shuffle_buffer, seed=seed)]
    else:
        split = wds.split_by_worker if all_ranks else _split_eval
        stages = [wds.SimpleShardList(urls), split, opened_here, wds.tarfile_to_samples(), wds.select(F.valid_member)]
    if holdout is not None and holdout[0] > 0:
        stages.append(wds.select(_KeyFilter(*holdout)))
    stages.append(wds.map(F.SampleDecoder(vocab.ids, preprocess, strict=True)))
    if corrections:
        stages.append(wds.map(_Corrected(corrections, vocab.ids)))
    stages += [wds.batched(batch_size, collation_fn=_collate, partial=not drop_last)]
    pipeline = wds.DataPipeline(*stages)
    if num_workers == 0:
        return pipeline
    # training (an endless repetition: RepeatingBatches) keeps its workers between epochs;
    # pinned memory lets the copy to a GPU overlap the step
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=train, shuffle=False)


def _split_eval(src):
    """Shard i to exactly one (rank, worker) pair: i mod (world_size * num_workers)."""
    from webdataset.utils import pytorch_worker_info

    rank, world, worker, nworkers = pytorch_worker_info()
    me, total = rank * nworkers + worker, world * nworkers
    for i, s in enumerate(src):
        if i % total == me:
            yield s
