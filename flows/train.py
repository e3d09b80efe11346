"""Prefect flow `train`: DART on shards. The task receives paths and returns the checkpoint path."""
from __future__ import annotations

from prefect import flow, get_run_logger, task


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard, from their stats files (0 where a shard has none): what training and the annotate progress count."""
    from dart_core.data.shard_format import sample_count

    return [sample_count(url) for url in shards]


def count_samples(shards_root: str) -> int:
    """ok samples over the complete shards, from their stats files (local or s3)."""
    from dart_core.data.reader import require_shards

    return sum(shard_sample_counts(require_shards(shards_root)))


@task(name="train-dart")
def train_task(shards: str, classes_csv: str, out_dir: str, model_cfg: dict, train_cfg: dict,
               crg: str | None, crg_source: str, device: str, num_workers: int, val_shards: str | None = None) -> str:
    from dart_core.data.reader import require_shards
    from dart_core.vocab import Vocabulary

    logger = get_run_logger()
    vocab = Vocabulary.read_csv(classes_csv)
    n = count_samples(shards)
    if val_shards:
        require_shards(val_shards, "--val-shards")
    # seconds of torch / torch_geometric imports: after the input checks, so a mistake shows at once
    from dart_core.model import DARTConfig
    from dart_core.train import TrainConfig, train_on_shards

    ckpt = train_on_shards(shards, vocab, out_dir, DARTConfig(**model_cfg), TrainConfig(**train_cfg), n,
                           crg_path=crg, crg_source=crg_source, device=device, num_workers=num_workers,
                           log=logger.info, val_shards=val_shards)
    return str(ckpt)


@flow(name="train")
def train_flow(shards: str, classes_csv: str, out_dir: str, model_cfg: dict | None = None,
               train_cfg: dict | None = None, crg: str | None = None, crg_source: str = "file",
               device: str = "cpu", num_workers: int = 0, val_shards: str | None = None) -> str:
    return train_task(shards, classes_csv, out_dir, model_cfg or {}, train_cfg or {}, crg, crg_source,
                      device, num_workers, val_shards)
