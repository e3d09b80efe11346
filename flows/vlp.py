"""Prefect flow `pretrain_vlp`: the embedded world's small CLIP, pretrained once and cached.

The task is cached across runs by its inputs (the training config, the output folder, and a hash
of the world's code and model config, since TASK_SOURCE only covers the task's own body) and
persists its result, so the demo pays for pretraining once. A cached result whose checkpoint file
was deleted is recomputed rather than returned.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from dart_core.stages import code_hash
from dart_core.world.vlp import MODEL_NAME, VLPConfig

_ROOT = Path(__file__).resolve().parents[1] / "dart_core"
_CODE = [_ROOT / "world" / "generator.py", _ROOT / "world" / "vlp.py"]


def world_code_hash(model_name: str = MODEL_NAME) -> str:
    """What the checkpoint depends on besides the config: the generator, the training loop (as
    code: dart_core.stages.code_hash, so a comment edit pretrains nothing) and the model config JSON
    (when it is one of ours)."""
    return code_hash(_CODE + [_ROOT / "model_configs" / f"{model_name}.json"])


def checkpoint_path(out_dir: str, cfg: VLPConfig, code_hash: str) -> Path:
    key = hashlib.sha256((repr(sorted(asdict(cfg).items())) + code_hash).encode()).hexdigest()[:12]
    return Path(out_dir) / f"{cfg.model_name}-{key}.pt"


@task(name="pretrain-vlp", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def pretrain_vlp_task(out_dir: str, config: dict, code_hash: str) -> str:
    from dart_core.world.vlp import pretrain

    logger = get_run_logger()
    cfg = VLPConfig(**config)
    path = checkpoint_path(out_dir, cfg, code_hash)
    logger.info(f"pretraining {cfg.model_name} for {cfg.steps} steps × {cfg.batch_size} images -> {path}")
    pretrain(path, cfg, log=logger.info)
    return str(path)


@flow(name="pretrain_vlp")
def pretrain_vlp(out_dir: str, n_images: int | None = None, steps: int = 300, seed: int = 0,
                 batch_size: int = 128, lr: float = 1e-3, warmup: int = 30, threads: int = 2,
                 model_name: str = MODEL_NAME, options: dict | None = None) -> str:
    """Path of the pretrained checkpoint in `out_dir` (a cache folder), training only when no run
    with the same inputs and code produced it before. `n_images` caps the distinct images (None:
    a fresh image for every one of steps × batch_size). `options` sets any other VLPConfig field
    (caption probabilities, jpeg_quality) for ablations."""
    cfg = VLPConfig(**{**(options or {}), "model_name": model_name, "steps": steps, "batch_size": batch_size,
                       "lr": lr, "warmup": warmup, "seed": seed, "threads": threads, "n_images": n_images})
    out_dir = str(Path(out_dir).resolve())
    code = world_code_hash(model_name)
    exists = checkpoint_path(out_dir, cfg, code).is_file()
    t = pretrain_vlp_task.with_options(refresh_cache=not exists)
    from dart_core.backbone import quiet_random_init

    # pretraining starts from random weights on purpose: no open_clip warning about it. Here, not in
    # dart_core/world/vlp.py or the task, whose source keys the cached checkpoint.
    with quiet_random_init():
        return t(out_dir, asdict(cfg), code)
