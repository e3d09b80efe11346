"""Training loop (paper App. A): AdamW, cosine LR 1e-4 -> 1e-5 with 2 linear warm-up epochs,
λ (WPS) annealed 1 -> 0, gradient clipping, bf16 autocast on CUDA, DDP under torchrun.

The loop takes any re-iterable of batches (images, labels[, keys]); one pass = one epoch.
Checkpoints (rank 0 only) hold trainable weights + config + vocabulary + optimizer state and are
written atomically; `fit` resumes from `out_dir/last.pt` when it exists.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from dart_core.checkpoint import check_vocabulary, read_checkpoint, save_checkpoint
from dart_core.losses import total_loss
from dart_core.model import DART
from dart_core.vocab import Vocabulary


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_epochs: float = 2.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lam_start: float = 1.0
    lam_end: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    bf16: bool = True  # autocast on CUDA only


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lambda_at(step: int, total: int, start: float = 1.0, end: float = 0.0) -> float:
    """The WPS smoothing weight λ, annealed linearly from `start` to `end` (Tab. 8 "scheduled")."""
    return start + (end - start) * min(1.0, step / max(1, total - 1))


def init_distributed() -> tuple[int, int]:
    """(rank, world) — initialises the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(model: DART, data: Iterable, vocab: Vocabulary, out_dir: str | Path, cfg: TrainConfig,
        steps_per_epoch: int | None = None, device: str = "cpu", log=print) -> list[dict]:
    """Train `model` on `data` for cfg.epochs; returns the per-step history (also in history.jsonl)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # epochs=0 writes the untrained model (a baseline)
    rank, world = init_distributed()
    device = torch.device(device)
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("steps_per_epoch is required when the data has no len()") from None
    if steps_per_epoch < 1:
        raise ValueError("no training batches: the data is empty or smaller than one batch")
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    torch.manual_seed(cfg.seed)

    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    last = out_dir / "last.pt"
    if last.exists():  # resume after a crash or a stop
        doc = read_checkpoint(last)
        check_vocabulary(doc, vocab, str(last), exact=True)
        if doc["config"] != model.cfg.to_dict():
            raise ValueError(f"{last}: was trained with another DART config; use a new --out")
        model.load_state_dict(doc["state_dict"], strict=False)
        opt.load_state_dict(doc["optimizer"])
        step = int(doc["step"])
        history = json.loads(doc["history"])
        if rank == 0:
            log(f"resumed from {last} at step {step}/{total}")
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    def checkpoint(epoch_done: int) -> None:
        if rank == 0:
            save_checkpoint(last, model, vocab, {"optimizer": opt.state_dict(), "step": step, "epoch": epoch_done,
                                                 "train_config": asdict(cfg), "history": json.dumps(history)})

    model.train()
    t0 = time.time()
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        n_in_epoch = 0
        for i, batch in enumerate(data):
            if i < skip:  # resumed mid-epoch: these batches were already consumed
                continue
            if n_in_epoch + skip >= steps_per_epoch or step >= total:
                break
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device)
            if labels.shape[1] != len(vocab):
                raise ValueError(f"labels have {labels.shape[1]} classes, the vocabulary has {len(vocab)}")
            lam = lambda_at(step, total, cfg.lam_start, cfg.lam_end)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            with autocast:
                out = ddp(images)
                loss, parts = total_loss(out, labels, lam, model.cfg)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {epoch + 1} step {step} ({parts}); training stopped. "
                    f"The last good checkpoint is {last if last.exists() else 'not written yet'}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
            opt.step()
            if world > 1:  # the logged loss is the global-batch mean, as one process would see it
                t = torch.tensor([parts["total"]], device=device)
                dist.all_reduce(t)
                parts["total"] = float(t) / world
            step += 1
            n_in_epoch += 1
            rec = {"step": step, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "lambda": lam,
                   "grad_norm": float(grad_norm), **parts}
            history.append(rec)
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total} loss {parts['total']:.4f} "
                    f"rank {parts['rank']:.4f} lr {rec['lr']:.2e} λ {lam:.2f} ({time.time() - t0:.0f}s)")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                checkpoint(epoch)
        if n_in_epoch + skip < steps_per_epoch and step < total:
            raise ValueError(f"the data gave {n_in_epoch + skip} batches in epoch {epoch + 1}, expected {steps_per_epoch}")
        checkpoint(epoch + 1)
    if rank == 0:
        (out_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        save_checkpoint(out_dir / "model.pt", model, vocab, {"step": step, "train_config": asdict(cfg)})
    model.eval()
    return history


class RepeatingBatches:
    """Exactly `steps` batches per pass, drawn from an endless repetition of `data`.

    A streaming reader splits shards across ranks and workers, so one pass can hold a different
    number of batches on each rank; DDP needs every rank to take the same number of steps."""

    def __init__(self, data: Iterable, steps: int):
        self.data, self.steps, self._it = data, steps, None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            for attempt in range(2):
                if self._it is None:
                    self._it = iter(self.data)
                try:
                    yield next(self._it)
                    break
                except StopIteration:
                    self._it = None
                    if attempt:
                        raise ValueError("the training data yielded no batch") from None


def class_graph(vocab: Vocabulary, text: torch.Tensor, crg_path: str | Path | None, source: str = "file",
                n_neighbors: int = 8, seed: int = 0):
    """edge_index for the ATM: a CRG file, or the similarity / random ablations (Tab. 6)."""
    from dart_core.crg.graph import CRG, random_crg, similarity_crg

    if source == "file":
        if crg_path is None:
            raise ValueError("--crg is required with --crg-source file")
        return CRG.read(crg_path).edge_index(vocab)
    if source == "similarity":
        return similarity_crg(vocab, text.cpu().numpy(), n_neighbors).edge_index(vocab)
    if source == "random":
        return random_crg(vocab, n_neighbors, seed).edge_index(vocab)
    raise ValueError(f"unknown CRG source {source!r} (file, similarity, random)")


def train_on_shards(shards, vocab: Vocabulary, out_dir: str | Path, model_cfg, train_cfg: TrainConfig,
                    n_samples: int, crg_path=None, crg_source: str = "file", device: str = "cpu",
                    num_workers: int = 0, log=print) -> Path:
    """`dart train`: DART on webdataset shards (seen classes only, as in OV-MLR training)."""
    from dart_core.data.reader import make_loader
    from dart_core.model import DART

    rank, world = init_distributed()
    # The trainable modules' initial weights come from torch's global RNG: seed it here, or a run
    # depends on whatever the process drew before (the demo's ablations differed by ~1 mAP).
    torch.manual_seed(train_cfg.seed)
    model = DART(model_cfg, device=device)
    # Train on the seen classes only: unseen classes must stay unseen (the ZSL protocol).
    seen = vocab.subset("seen")
    text = model.backbone.text_embeddings(list(seen.names))
    model.set_classes(list(seen.names), class_graph(seen, text, crg_path, crg_source), text=text)
    counts = model.parameter_counts()
    if rank == 0:
        log(f"DART on {model_cfg.backbone}/{model_cfg.pretrained}: {counts['trainable']:,} trainable of "
            f"{counts['total']:,} parameters; {len(seen)} seen classes, {n_samples} samples")
    steps = n_samples // (train_cfg.batch_size * world)
    if steps < 1:
        raise ValueError(f"{n_samples} samples are fewer than one global batch of "
                         f"{train_cfg.batch_size * world}; lower --batch-size")
    loader = make_loader(shards, seen, model.backbone.preprocess, train_cfg.batch_size, train=True,
                         num_workers=num_workers, seed=train_cfg.seed)
    fit(model, RepeatingBatches(loader, steps), seen, out_dir, train_cfg, steps_per_epoch=steps,
        device=device, log=log)
    return Path(out_dir) / "model.pt"
