"""`dart train` and `dart info`."""
from __future__ import annotations

import os
from typing import Optional

import typer

from flows.cli._app import app


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    shards: str = typer.Option(..., help="Shard folder or s3:// prefix (complete shards are used)."),
    classes: str = typer.Option(..., help="classes.csv (id,name,split); DART trains on the seen classes."),
    out: str = typer.Option(..., help="Run folder: last.pt (resume), model.pt, history.jsonl."),
    crg: Optional[str] = typer.Option(None, help="crg.json from `dart crg mine`."),
    crg_source: str = typer.Option("", help="file | similarity | random (default: file with --crg, else similarity)."),
    backbone: str = typer.Option("ViT-B-16", help="open_clip model name."),
    pretrained: str = typer.Option("openai", help="open_clip pretrained tag or a local checkpoint file ('none' for random)."),
    epochs: int = typer.Option(20),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(1e-4),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    workers: int = typer.Option(0, help="DataLoader workers for decoding."),
    arm_layers: int = typer.Option(1),
    top_k_share: float = typer.Option(16 / 196, help="Patches aggregated per class, as a share of the patch grid (the paper's 16 of 196)."),
    wps_tau: float = typer.Option(0.0, help="Temperature of the WPS responsibilities (0: the library default, CLIP's learned 100, App. A)."),
    val_shards: Optional[str] = typer.Option(None, help="Validation shards (seen-class mAP picks the saved epoch); default: a slice held out of --shards."),
    val_share: float = typer.Option(0.05, help="Share of the training samples held out for validation when --val-shards is not given (0: none)."),
    lambda_end: float = typer.Option(0.0, help="WPS λ at the last step (annealed from 1; 1 keeps the VLP's prior responsibilities)."),
    no_arm: bool = typer.Option(False, help="Ablation: no ARM (Tab. 5)."),
    no_wps: bool = typer.Option(False, help="Ablation: no WPS loss (Tab. 5)."),
    no_atm: bool = typer.Option(False, help="Ablation: no ATM (Tab. 5)."),
) -> None:
    """Train DART on webdataset shards (resumes from OUT/last.pt after a crash)."""
    from dart_core.backbone import BackboneError
    from dart_core.checkpoint import CheckpointError
    from dart_core.crg.graph import CRGError
    from dart_core.vocab import VocabularyError

    source = crg_source or ("file" if crg else "similarity")
    if source == "similarity" and not crg and not crg_source:
        typer.echo("no --crg given: using the text-similarity CRG (the paper's 'Sim.' variant)")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail("--device cuda but no CUDA device is available")
        if "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    model_cfg = dict(backbone=backbone, pretrained=None if pretrained.lower() == "none" else pretrained,
                     arm_layers=arm_layers, top_k_share=top_k_share, **({"wps_tau": wps_tau} if wps_tau else {}), use_arm=not no_arm, use_wps=not no_wps, use_atm=not no_atm)
    train_cfg = dict(epochs=epochs, batch_size=batch_size, lr=lr, lam_end=lambda_end, val_share=val_share)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
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

            ckpt = train_flow(shards, classes, out, model_cfg, train_cfg, crg, source, device, workers, val_shards)
    except (VocabularyError, CRGError, CheckpointError, BackboneError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"checkpoint: {ckpt}")


@app.command()
def info(
    backbone: str = typer.Option("ViT-B-16"),
    pretrained: str = typer.Option("none", help="Weights to load ('none': random init, same counts)."),
    arm_layers: int = typer.Option(1),
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
