"""Training loop (paper App. A): AdamW, cosine LR 1e-4 -> 1e-5 with 2 linear warm-up epochs,
λ (WPS) annealed 1 -> 0, gradient clipping, bf16 autocast on CUDA, DDP under torchrun.

The loop takes any re-iterable of batches (images, labels[, keys]); one pass = one epoch. It runs
over global steps (epoch = step // steps_per_epoch) and resumes at a checkpoint's step.
Checkpoints (rank 0 only) hold trainable weights + config + vocabulary + optimizer state and are
written atomically; `fit` resumes from `out_dir/last.pt` when it exists.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dart_core.checkpoint import backbone_change, check_vocabulary, read_checkpoint, save_checkpoint
from dart_core.losses import loss_terms, weighted_total
from dart_core.model import DART
from dart_core.options.train import TrainOptions
from dart_core.settings import settings
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
    # lr multiplier of the zero-initialised gates (α, the ATM's LayerScales): weights that start at
    # zero and must reach O(0.1) within one schedule (at lr 1e-4 and a few hundred steps they
    # would move by ~0.01; docs/model.md)
    gate_lr_mult: float = 10.0
    # validation slice held out of the training shards (by key hash), at most val_max samples taken
    # from the first shards; its seen-class mAP picks the saved epoch. 0 = no validation.
    val_share: float = 0.05
    val_max: int = 5000
    # a corrections file (dart_core.corrections) applied on top of the shard labels; its sha256 is
    # filled in by train_on_shards, so the checkpoint's train_config records what was applied
    corrections: str | None = None
    corrections_sha256: str | None = None


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lambda_at(step: int, total: int, start: float = 1.0, end: float = 0.0) -> float:
    """The WPS smoothing weight λ, annealed linearly from `start` to `end` (Tab. 8 "scheduled")."""
    return start + (end - start) * min(1.0, step / max(1, total - 1))


def is_gate(name: str) -> bool:
    """The zero-initialised residual weights: the patch-evidence weight α and the ATM's LayerScales."""
    return name == "patch_gate" or name.endswith(".gamma")


def backend_for(device: str | torch.device) -> str:
    """NCCL for ranks on CUDA devices, gloo for ranks on the CPU (whether or not a GPU exists);
    DART_DIST_BACKEND overrides (gloo lets two ranks share one GPU, which NCCL refuses)."""
    return settings().dist_backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int]:
    """(rank, world) — initialises the process group when launched by torchrun with WORLD_SIZE > 1,
    with the backend that fits `device`."""
    world = settings().world_size
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str, log=print) -> str:
    """The device of this process: under torchrun (WORLD_SIZE > 1) a CUDA device is always the
    rank's own, cuda:LOCAL_RANK, whatever index was asked for (every rank on cuda:0 would share one
    GPU); elsewhere `device` as given."""
    s = settings()
    if s.world_size <= 1 or torch.device(device).type != "cuda":
        return device
    local = f"cuda:{s.local_rank or 0}"
    if device not in ("cuda", local):
        log(f"--device {device} under torchrun: this rank uses {local} (one GPU per rank)")
    torch.cuda.set_device(local)
    return local


def shutdown_distributed() -> None:
    """Leave the process group cleanly (NCCL warns about, and may hang on, a group never destroyed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def read_resume_state(path: Path, rank: int, world: int) -> dict | None:
    """The resume checkpoint as rank 0 reads it, broadcast to every rank: all ranks resume from the
    same step even if `last.pt` changes between their reads (a slow shared disk, a concurrent write)."""
    doc = read_checkpoint(path) if rank == 0 and path.exists() else None
    if world > 1:
        box = [doc]
        dist.broadcast_object_list(box, src=0)
        doc = box[0]
    return doc


def term_diagnostics(model: DART, terms: dict, out) -> dict[str, float]:
    """What the log shows every `log_every` steps: each weighted loss term's gradient norm on the
    ARM and on the ATM (what the optimizer sees of it), and the refinement's relative size
    |Δx̃| / |x_orig| (mean over patches of the L2 norms)."""
    groups = {"arm": [p for p in model.arm.parameters() if p.requires_grad] if model.arm is not None else [],
              "atm": [p for p in model.atm.parameters() if p.requires_grad] if model.atm is not None else []}
    diag = {}
    for name, (w, t) in terms.items():
        for g, params in groups.items():
            if not params or not t.requires_grad:
                continue
            grads = torch.autograd.grad(w * t, params, retain_graph=True, allow_unused=True)
            diag[f"grad_{name}_{g}"] = float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None)
                                                        or torch.tensor(0.0)))
    x = out.extras.get("x_orig")
    if x is not None:
        diag["delta_rel"] = float((out.delta.detach().norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-6)).mean())
    diag["alpha"] = float(model.patch_gate.detach().abs().mean())
    return diag


@torch.no_grad()
def seen_map(model: DART, val_data: Iterable, device) -> float:
    """mAP over the training vocabulary on the validation batches (labels 0 masked out)."""
    from dart_core.metrics import mean_average_precision

    was_training = model.training
    model.eval()
    scores, labels = [], []
    for batch in val_data:
        scores.append(model(batch[0].to(device), with_priors=False).logits.float().cpu())
        labels.append(batch[1].cpu())
    model.train(was_training)
    if not scores:
        return float("nan")
    return mean_average_precision(torch.cat(scores).numpy(), torch.cat(labels).numpy())


# Why `dart train --pretrained none` is refused rather than run with a seeded random backbone: the
# checkpoint keeps only DART's own weights, so the frozen backbone must be rebuilt identically to
# annotate; a seed would tie that to torch's RNG and open_clip's init order across versions, and a
# random CLIP's image and text towers do not agree, so the tags would mean nothing anyway.
RANDOM_BACKBONE_REFUSED = (
    "--pretrained none: a random backbone is not saved with the DART checkpoint, so `dart annotate` could not "
    "rebuild it (and its image and text towers do not agree); pass an open_clip tag (--pretrained openai) or a "
    "weights file (--pretrained /path/to/file.pt, e.g. the demo's small VLP: see README, 'Your own data on a CPU')")


def build_optimizer(model: DART, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over the trainable weights, and those weights (for gradient clipping). The
    zero-initialised gates (`is_gate`) get their own group: lr × cfg.gate_lr_mult, no weight decay;
    each group's `lr_mult` scales the scheduled lr at every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    gates = [p for n, p in model.named_parameters() if p.requires_grad and is_gate(n)]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not is_gate(n)]
    groups = [{"params": others, "lr_mult": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_mult": cfg.gate_lr_mult, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), params


def resume(model: DART, opt: torch.optim.Optimizer, vocab: Vocabulary, last: Path, rank: int, world: int) -> dict | None:
    """Load `last` (as rank 0 read it) into the model and the optimizer after a crash or a stop,
    refusing a checkpoint of another vocabulary, DART config or backbone; the checkpoint's document
    (step, history, best_val), or None when there is nothing to resume."""
    doc = read_resume_state(last, rank, world)
    if doc is None:
        return None
    check_vocabulary(doc, vocab, str(last), exact=True)
    # the backbone weights are compared by content (a file may be named differently now)
    if {**doc["config"], "pretrained": None} != {**model.cfg.to_dict(), "pretrained": None}:
        raise ValueError(f"{last}: was trained with another DART config; use a new --out")
    changed = backbone_change(doc, model)
    if changed:
        raise ValueError(f"{last}: was trained on other backbone weights ({changed}); use a new --out")
    model.load_state_dict(doc["state_dict"], strict=False)
    opt.load_state_dict(doc["optimizer"])
    return doc


def epoch_batches(data: Iterable, skip: int = 0) -> Iterator:
    """One pass over `data` (one epoch) from its `skip`-th batch on: a resumed run goes on with the
    epoch it was stopped in. The streaming reader (RepeatingBatches) has no position to seek to, so
    the first `skip` batches are read and dropped: the resumed run then takes the batches the
    uninterrupted run would have taken (tests/test_train.py compares the two runs' losses)."""
    return itertools.islice(iter(data), skip, None)


class _Run:
    """The state one `fit` carries from step to step: the model (and its DDP wrapper), the optimizer,
    the history, the best validation so far, and the steps whose loss figures are not read yet."""

    def __init__(self, model: DART, vocab: Vocabulary, out_dir: Path, cfg: TrainConfig, steps_per_epoch: int,
                 device: torch.device, rank: int, world: int, log, val_data: Iterable | None):
        self.model, self.vocab, self.cfg, self.device, self.rank, self.world, self.log = (
            model, vocab, cfg, device, rank, world, log)
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.val_data, self.val_requested = val_data, val_data is not None
        self.out_dir, self.last, self.best_path = out_dir, out_dir / "last.pt", out_dir / "model.pt"
        model.to(device)
        self.opt, self.params = build_optimizer(model, cfg)
        self.step, self.history, self.best = 0, [], None  # step: the steps done
        doc = resume(model, self.opt, vocab, self.last, rank, world)
        if doc is not None:
            self.step, self.history, self.best = int(doc["step"]), json.loads(doc["history"]), doc.get("best_val")
            if rank == 0:
                log(f"resumed from {self.last} at step {self.step}/{self.total}")
        self.ddp = model
        if world > 1:
            # the buffers (text embeddings, class graph) are set identically on every rank and never
            # change while training: no re-broadcast every step
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.names: list[str] = []  # the loss terms' names, then "total" (the columns of the pending vectors)
        self.t0, self.step0 = time.time(), self.step

    def checkpoint(self, epoch_done: int) -> None:
        if self.rank == 0:
            save_checkpoint(self.last, self.model, self.vocab,
                            {"optimizer": self.opt.state_dict(), "step": self.step, "epoch": epoch_done,
                             "train_config": asdict(self.cfg), "history": json.dumps(self.history),
                             "best_val": self.best})
        if self.world > 1:
            dist.barrier()  # no rank runs ahead of (or stops before) the checkpoint it would resume from

    def validate(self, epoch_done: int) -> None:
        """Rank 0 scores the whole validation set (the other ranks go on to the next collective)."""
        if self.val_data is None or self.rank != 0:
            return
        score = seen_map(self.model, self.val_data, self.device)
        if math.isnan(score):
            self.log("the validation slice holds no positive label (or no sample): no validation; "
                     "model.pt will be the last epoch")
            self.val_data = None
            return
        improved = self.best is None or score > self.best["mAP"]
        if improved:
            self.best = {"mAP": score, "epoch": epoch_done, "step": self.step}
            save_checkpoint(self.best_path, self.model, self.vocab,
                            {"step": self.step, "train_config": asdict(self.cfg), "best_val": self.best})
        self.history.append({"epoch": epoch_done, "step": self.step, "val_seen_mAP": score, "best": improved})
        note = "best" if improved else f"best {100 * self.best['mAP']:.2f} at epoch {self.best['epoch']}"
        self.log(f"epoch {epoch_done}/{self.cfg.epochs} validation seen mAP {100 * score:.2f} ({note})")

    def flush(self) -> dict[str, float]:
        """The pending steps' loss terms and gradient norms into `history`, with one host sync (and,
        under DDP, one all-reduce: the logged total is the global-batch mean, as one process would
        see it); a non-finite loss stops training here, before any checkpoint is written."""
        pending, names = self.pending, self.names
        if not pending:
            return {}
        stacked = torch.stack([v for _, v in pending])  # (steps, terms + total + grad_norm)
        if self.world > 1:
            total_col = stacked[:, len(names) - 1].clone()
            dist.all_reduce(total_col)
            stacked[:, len(names) - 1] = total_col / self.world
        rows = stacked.tolist()
        for (rec, _), row in zip(pending, rows):
            parts = dict(zip(names, row))
            if not math.isfinite(parts["total"]):
                pending.clear()
                raise NonFiniteLossError(
                    f"loss is {parts['total']} at epoch {rec['epoch']} step {rec['step'] - 1} ({parts}); training "
                    f"stopped. The last good checkpoint is {self.last if self.last.exists() else 'not written yet'}.")
            self.history.append({**{k: rec[k] for k in ("step", "epoch", "lr", "lambda")}, "grad_norm": row[-1],
                                 **parts, **{k: v for k, v in rec.items() if k not in ("step", "epoch", "lr", "lambda")}})
        pending.clear()
        return parts

    def train_step(self, batch, step: int, epoch: int) -> None:
        """One optimisation step on `batch`, global step index `step` (0-based) of epoch `epoch`
        (0-based); its figures stay on the device until the next log line or checkpoint."""
        model, cfg, total = self.model, self.cfg, self.total
        images, labels = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
        if labels.shape[1] != len(self.vocab):
            raise ValueError(f"labels have {labels.shape[1]} classes, the vocabulary has {len(self.vocab)}")
        lam = lambda_at(step, total, cfg.lam_start, cfg.lam_end)
        for g in self.opt.param_groups:
            g["lr"] = g["lr_mult"] * lr_at(step, total, self.warmup, cfg.lr, cfg.min_lr)
        watch = step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == total
        with self.autocast:
            out = self.ddp(images)
        # the losses in fp32, outside autocast (the model's scores already are fp32)
        terms = loss_terms(out, labels, lam, model.cfg)
        loss, stats = weighted_total(terms)
        self.names[:] = [*terms, "total"]
        diag = term_diagnostics(model, terms, out) if watch else {}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip else torch.zeros(())
        self.opt.step()
        self.step = step + 1
        # reading the figures every step would stall the GPU on a host sync each step
        self.pending.append(({"step": self.step, "epoch": epoch + 1, "lr": self.opt.param_groups[0]["lr"],
                              "lambda": lam, **diag},
                             torch.cat([stats, grad_norm.detach().float().reshape(1).to(stats.device)])))
        if watch:
            self.log_line(self.flush(), diag, epoch, lam, len(labels))

    def log_line(self, parts: dict[str, float], diag: dict[str, float], epoch: int, lam: float, batch: int) -> None:
        if self.rank != 0:
            return
        terms_txt = " ".join(f"{k} {v:.4g}" for k, v in parts.items())
        # a term that cannot reach a module (WPS, penalty on the ATM) is left out of the line
        grads_txt = " ".join(f"{k[5:]} {v:.2g}" for k, v in diag.items() if k.startswith("grad_") and v)
        step, total = self.step, self.total
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs} step {step}/{total} {terms_txt} | grad {grads_txt} | "
                 f"|Δx̃|/|x| {diag.get('delta_rel', 0):.3f} α {diag.get('alpha', 0):.3f} "
                 f"lr {self.history[-1]['lr']:.2e} λ {lam:.2f} | "
                 f"{progress(step - self.step0, total - step, time.time() - self.t0, batch * self.world)}")

    def end_of_epoch(self, epoch_done: int) -> None:
        """Epoch `epoch_done` (1-based) is over: its figures read, validated, checkpointed."""
        self.flush()
        self.validate(epoch_done)
        self.checkpoint(epoch_done)

    def finish(self) -> list[dict]:
        """history.jsonl and (without validation) model.pt written; with validation the model is left
        with model.pt's weights (the best epoch). The history is returned."""
        model, rank = self.model, self.rank
        if rank == 0:
            (self.out_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
            if self.val_data is None:
                save_checkpoint(self.best_path, model, self.vocab, {"step": self.step, "train_config": asdict(self.cfg)})
        if self.world > 1 and self.val_requested:
            dist.barrier()  # rank 0 has written model.pt
            self.val_data = self.val_data if self.best_path.exists() else None
        if self.val_data is not None:
            doc = read_checkpoint(self.best_path)
            model.load_state_dict(doc["state_dict"], strict=False)
            if rank == 0:
                b = doc["best_val"]
                self.log(f"model.pt: the weights after epoch {b['epoch']} (validation seen mAP {100 * b['mAP']:.2f})")
        model.eval()
        return self.history


_NO_BATCH = object()  # what next() gives when an epoch's pass ends early


def fit(model: DART, data: Iterable, vocab: Vocabulary, out_dir: str | Path, cfg: TrainConfig,
        steps_per_epoch: int | None = None, device: str = "cpu", log=print,
        val_data: Iterable | None = None) -> list[dict]:
    """Train `model` on `data` for cfg.epochs; returns the history (also in history.jsonl): one
    record per step (loss terms, lr, λ, gradient norm; every `log_every` steps also each term's
    gradient norm on the ARM and the ATM, |Δx̃|/|x| and α) and, with `val_data`, one per epoch with
    the validation mAP. With `val_data`, model.pt is the best validation epoch and the model is
    left with those weights; last.pt is always the latest state (for resume).

    One loop over the global steps (as nanoGPT's): the epoch is step // steps_per_epoch, each epoch
    is one pass over `data`, validation and a checkpoint close every epoch, and a checkpoint is also
    written every cfg.checkpoint_every steps; a resumed run starts at the checkpoint's step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # epochs=0 writes the untrained model (a baseline)
    rank, world = init_distributed(device)
    device = torch.device(device)
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("steps_per_epoch is required when the data has no len()") from None
    if steps_per_epoch < 1:
        raise ValueError("no training batches: the data is empty or smaller than one batch")
    torch.manual_seed(cfg.seed)
    run = _Run(model, vocab, out_dir, cfg, steps_per_epoch, device, rank, world, log, val_data)
    if run.val_data is not None and run.step == 0 and run.best is None:
        run.validate(0)  # the frozen VLP's own score: training must beat it to replace it
    model.train()
    run.t0 = time.time()
    batches = None
    for step in range(run.step, run.total):
        epoch, pos = divmod(step, steps_per_epoch)
        if batches is None or pos == 0:
            batches = epoch_batches(data, pos)  # pos > 0: resumed mid-epoch
        batch = next(batches, _NO_BATCH)
        if batch is _NO_BATCH:
            raise ValueError(f"the data gave {pos} batches in epoch {epoch + 1}, expected {steps_per_epoch}")
        run.train_step(batch, step, epoch)
        if pos + 1 == steps_per_epoch:
            run.end_of_epoch(epoch + 1)
        elif cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            run.flush()
            run.checkpoint(epoch)
    return run.finish()


def progress(done_steps: int, left_steps: int, seconds: float, global_batch: int) -> str:
    """`123 img/s, 4m05s elapsed, ETA 12m30s` for a log line (rate over the steps of this process:
    a resumed run does not count the steps it skipped)."""
    def clock(t: float) -> str:
        t = int(round(t))
        return f"{t // 3600}h{t % 3600 // 60:02d}m" if t >= 3600 else f"{t // 60}m{t % 60:02d}s"

    if done_steps <= 0 or seconds <= 0:
        return f"{clock(seconds)} elapsed"
    per_step = seconds / done_steps
    return (f"{done_steps * global_batch / seconds:.0f} img/s, {clock(seconds)} elapsed, "
            f"ETA {clock(per_step * left_steps)}")


class RepeatingBatches:
    """Exactly `steps` batches per pass, drawn from an endless repetition of `data`.

    A streaming reader splits shards across ranks and workers, so one pass can hold a different
    number of batches on each rank; DDP needs every rank to take the same number of steps.

    A run resumed mid-epoch reads and drops the first `skip` batches of a fresh stream
    (`epoch_batches`). The webdataset reader cannot seek: shards are
    tar streams read front to back, and the seeded shuffle buffer spans shard boundaries and is split
    by rank and worker, so the k-th batch depends on every sample read before it — skipping whole
    shards would change the batches, not just start later. Positioning cheaply would need the reader
    to skip decoding (the costly part) for the dropped samples."""

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
                    num_workers: int | None = 0, log=print, val_shards: str | None = None) -> Path:
    """`dart train`: DART on webdataset shards (seen classes only, as in OV-MLR training).

    Validation (the seen-class mAP that picks the saved epoch): `val_shards` when given, else a
    slice held out of the training shards — the samples whose key hashes below `val_share`, taken
    from as many of the first shards as give about min(val_share × samples, val_max)."""
    if not model_cfg.pretrained:
        from dart_core.backbone import BackboneError

        raise BackboneError(RANDOM_BACKBONE_REFUSED)
    device = rank_device(device, log)
    rank, world = init_distributed(device)
    try:
        return _train_on_shards(shards, vocab, out_dir, model_cfg, train_cfg, n_samples, crg_path, crg_source,
                                device, num_workers, log, val_shards, rank, world)
    finally:
        shutdown_distributed()


def train_from_options(options: TrainOptions, n_samples: int, log=print) -> Path:
    """train_on_shards for one run's options: what the `train` flow's task, each torchrun rank and a
    `dart train` started by torchrun call. `n_samples`: the training samples, counted once."""
    return train_on_shards(options.shards, Vocabulary.read_csv(options.classes), options.out, options.dart_config(),
                           options.train_config(), n_samples, crg_path=options.crg, crg_source=options.graph_source(),
                           device=options.device, num_workers=options.workers, log=log, val_shards=options.val_shards)


def _train_on_shards(shards, vocab, out_dir, model_cfg, train_cfg, n_samples, crg_path, crg_source, device,
                     num_workers, log, val_shards, rank, world) -> Path:
    from dart_core.data.reader import list_shards, make_loader
    from dart_core.model import DART

    # The trainable modules' initial weights come from torch's global RNG: seed it here, or a run
    # depends on whatever the process drew before (the demo's ablations differed by ~1 mAP).
    torch.manual_seed(train_cfg.seed)
    model = DART(model_cfg, device=device)
    # Train on the seen classes only: unseen classes must stay unseen (the ZSL protocol).
    seen = vocab.subset("seen")
    text = model.backbone.text_embeddings(list(seen.names))
    model.set_classes(list(seen.names), class_graph(seen, text, crg_path, crg_source), text=text)
    counts = model.parameter_counts()
    urls = list_shards(shards) if isinstance(shards, (str, os.PathLike)) else [str(u) for u in shards]
    fixes = None
    if train_cfg.corrections:
        from dart_core.corrections import read as read_corrections

        corr = read_corrections(train_cfg.corrections)
        train_cfg.corrections_sha256 = corr.sha256
        fixes = corr.by_image()
        if rank == 0:
            log(f"labels: the shard labels with {len(corr.labels)} corrections from {train_cfg.corrections} "
                f"(sha256 {corr.sha256[:12]}) on top")
    holdout, val_loader, n_val = None, None, 0
    pre, bs = model.backbone.preprocess, train_cfg.batch_size
    if val_shards:
        val_loader = make_loader(val_shards, seen, pre, bs, train=False, all_ranks=True, corrections=fixes)
        val_note = f"validation: {val_shards}"
    elif train_cfg.val_share > 0 and urls:
        share = train_cfg.val_share
        per_shard = n_samples / len(urls)
        wanted = min(share * n_samples, train_cfg.val_max)
        held = urls[:max(1, min(len(urls), math.ceil(wanted / max(share * per_shard, 1e-9))))]
        n_val = int(round(share * per_shard * len(held)))
        holdout = (share, False, held)
        val_loader = make_loader(held, seen, pre, bs, train=False, all_ranks=True, holdout=(share, True, held),
                                 corrections=fixes)
        val_note = f"validation: ~{n_val} samples held out of {len(held)} shard(s)"
    else:
        val_note = "no validation (model.pt = the last epoch)"
    n_train = n_samples - n_val
    if num_workers is None:  # decoding beside a GPU needs processes; on the CPU they would compete with it
        num_workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if torch.device(device).type == "cuda" else 0
    if rank == 0:
        from dart_core.devices import unused_gpu_note

        note = unused_gpu_note(device)
        if note:
            log(f"warning: {note}")
        log(f"DART on {model_cfg.backbone}/{model_cfg.pretrained}: {counts['trainable']:,} trainable of "
            f"{counts['total']:,} parameters; {len(seen)} seen classes, {n_train} training samples; {val_note}")
    steps = n_train // (bs * world)
    if steps < 1:
        raise ValueError(f"{n_train} training samples are fewer than one global batch of "
                         f"{bs * world} (--batch-size {bs} per process × {world}); lower --batch-size")
    loader = make_loader(urls, seen, pre, bs, train=True, num_workers=num_workers, seed=train_cfg.seed,
                         holdout=holdout, corrections=fixes, pin_memory=torch.device(device).type == "cuda")
    fit(model, RepeatingBatches(loader, steps), seen, out_dir, train_cfg, steps_per_epoch=steps,
        device=device, log=log, val_data=val_loader)
    return Path(out_dir) / "model.pt"
