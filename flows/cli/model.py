"""`dart train` and `dart info`."""
from __future__ import annotations

from typing import Literal, Optional

import typer

from dart_core.settings import settings
from flows.cli import _options as check
from flows.cli._app import app


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


# stays long: its length is the typer option declarations (one per CLI flag); the body is ~40 lines
@app.command()
def train(
    shards: str = typer.Option(..., help="Shard folder or s3:// prefix (complete shards are used)."),
    classes: str = typer.Option(..., help="classes.csv (id,name,split); DART trains on the seen classes."),
    out: str = typer.Option(..., help="Run folder: last.pt (resume), model.pt, history.jsonl."),
    crg: Optional[str] = typer.Option(None, help="crg.json from `dart crg mine`."),
    crg_source: Optional[Literal["file", "similarity", "random"]] = typer.Option(
        None, help="Where the class graph comes from (default: file with --crg, else similarity)."),
    backbone: str = typer.Option("ViT-B-16", help="open_clip model name."),
    pretrained: str = typer.Option("openai", help="open_clip pretrained tag or a local weights file (stored by absolute path + sha256)."),
    epochs: int = typer.Option(20, min=1, help="Passes over the training samples."),
    batch_size: int = typer.Option(256, min=1, help="Samples per optimiser step (per process under torchrun)."),
    lr: float = typer.Option(1e-4, callback=check.positive, help="Peak learning rate (AdamW; warm-up, then cosine)."),
    device: str = typer.Option("cpu", callback=check.device, help=check.DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader workers for decoding, per process (default: 0 on the CPU, min(8, cores - 1) on a GPU)."),
    nproc: int = typer.Option(1, "--nproc", "--gpus", min=1, help="Training processes launched under torchrun by the "
                              "flow (DDP; one per GPU with --device cuda, gloo processes on CPU); --batch-size is per process."),
    arm_layers: int = typer.Option(1, min=1, help="ARM layers, beside the last N frozen ViT blocks."),
    top_k_share: float = typer.Option(16 / 196, callback=check.share, help="Patches aggregated per class, as a share of the patch grid (the paper's 16 of 196)."),
    wps_tau: float = typer.Option(0.0, min=0, help="Temperature of the WPS responsibilities (0: the library default, CLIP's learned 100, App. A)."),
    val_shards: Optional[str] = typer.Option(None, help="Validation shards (seen-class mAP picks the saved epoch); default: a slice held out of --shards."),
    val_share: float = typer.Option(0.05, callback=check.share_held_out, help="Share of the training samples held out for validation when --val-shards is not given (0: none)."),
    lambda_end: float = typer.Option(0.0, min=0, max=1, help="WPS λ at the last step (annealed from 1; 1 keeps the VLP's prior responsibilities)."),
    checkpoint_every: int = typer.Option(0, min=0, help="Also write last.pt every N optimiser steps (0: at the end of each epoch only); "
                                                        "on long epochs a crash or a killed rank then loses at most N steps."),
    arm: bool = typer.Option(True, "--arm/--no-arm", help="--no-arm: the ablation without the ARM (Tab. 5)."),
    wps: bool = typer.Option(True, "--wps/--no-wps", help="--no-wps: the ablation without the WPS loss (Tab. 5)."),
    atm: bool = typer.Option(True, "--atm/--no-atm", help="--no-atm: the ablation without the ATM (Tab. 5)."),
    corrections: Optional[str] = typer.Option(None, help="Corrections file (`dart corrections`, or a reviewed "
                                                         "`dart audit --export` file) applied on top of the shard labels; recorded in the checkpoint."),
) -> None:
    """Train DART on webdataset shards (resumes from OUT/last.pt after a crash or Ctrl-C)."""
    from dart_core.backbone import BackboneError, check_downloadable, is_weights_file

    if pretrained.lower() == "none":
        from dart_core.train import RANDOM_BACKBONE_REFUSED

        raise BackboneError(RANDOM_BACKBONE_REFUSED)

    if corrections:
        from dart_core.corrections import read as read_corrections

        read_corrections(corrections)  # a bad file: one error line now, not after the model is built
    if not is_weights_file(backbone, pretrained):  # unfetchable weights: say so now, not inside the flow
        check_downloadable(backbone, pretrained)
    source = crg_source or ("file" if crg else "similarity")
    if source == "similarity" and not crg and not crg_source:
        typer.echo("no --crg given: using the text-similarity CRG (the paper's 'Sim.' variant)")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            _fail(f"--device {device} but no CUDA device is available")
        if (local_rank := settings().local_rank) is not None and device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    model_cfg = dict(backbone=backbone, pretrained=None if pretrained.lower() == "none" else pretrained,
                     arm_layers=arm_layers, top_k_share=top_k_share, **({"wps_tau": wps_tau} if wps_tau else {}), use_arm=arm, use_wps=wps, use_atm=atm)
    train_cfg = dict(epochs=epochs, batch_size=batch_size, lr=lr, lam_end=lambda_end, val_share=val_share,
                     checkpoint_every=checkpoint_every,
                     **({"corrections": corrections} if corrections else {}))
    if nproc > 1:
        from flows.train import check_ranks

        check_ranks(nproc, device)  # before the flow starts: --device cuda:N, too few GPUs, inside torchrun
    if settings().world_size > 1:
        # under torchrun every rank trains; Prefect would start one flow run per rank
        from dart_core.model import DARTConfig
        from dart_core.train import TrainConfig, train_on_shards
        from dart_core.vocab import Vocabulary
        from flows.train import count_samples

        ckpt = train_on_shards(shards, Vocabulary.read_csv(classes), out, DARTConfig(**model_cfg),
                               TrainConfig(**train_cfg), count_samples(shards), crg, source, device, workers,
                               val_shards=val_shards)
    else:
        from flows.train import train_flow

        ckpt = train_flow(shards, classes, out, model_cfg, train_cfg, crg, source, device, workers, val_shards,
                          nproc=nproc)
    typer.echo(f"checkpoint: {ckpt}")


@app.command()
def info(
    backbone: str = typer.Option("ViT-B-16", help="open_clip model name."),
    pretrained: str = typer.Option("none", help="Weights to load ('none': random init, same counts)."),
    arm_layers: int = typer.Option(1, min=1, help="ARM layers, beside the last N frozen ViT blocks."),
) -> None:
    """Print total and trainable parameter counts of DART on a backbone (cf. paper Tab. 7).

    The counts do not depend on the vocabulary: no weight is class-specific."""
    from dart_core.model import DART, DARTConfig

    m = DART(DARTConfig(backbone=backbone, pretrained=None if pretrained == "none" else pretrained,
                        arm_layers=arm_layers))
    c = m.parameter_counts()
    M = 1e6
    typer.echo(f"backbone {backbone} ({m.backbone.n_layers} blocks, width {m.backbone.width}, embed {m.backbone.embed_dim})")
    typer.echo(f"  frozen CLIP (image + text towers): {c['frozen_backbone'] / M:.1f}M  (vision tower {c['vision_tower'] / M:.1f}M)")
    typer.echo(f"  ARM trainable: {c['arm'] / M:.2f}M   ATM trainable: {c['atm'] / M:.2f}M")
    typer.echo(f"  trainable: {c['trainable'] / M:.2f}M")
    typer.echo(f"  total: {c['total'] / M:.1f}M (incl. the ARM's frozen q/k/v/out copies, {c['arm_frozen_copies'] / M:.1f}M)")
    typer.echo(f"  vision tower + trainable (the paper's Tab. 7 'Param' counting): {(c['vision_tower'] + c['trainable']) / M:.1f}M")
