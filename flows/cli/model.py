"""`dart train` and `dart info`."""
from __future__ import annotations

import typer

from dart_core.options.train import TrainOptions
from dart_core.settings import settings
from flows.cli._app import app
from flows.cli._command import options_command


@options_command(app, TrainOptions)
def train(options: TrainOptions) -> None:
    """Train DART on webdataset shards (resumes from OUT/last.pt after a crash or Ctrl-C)."""
    from dart_core.backbone import BackboneError, check_downloadable, is_weights_file

    if options.pretrained.lower() == "none":
        from dart_core.train import RANDOM_BACKBONE_REFUSED

        raise BackboneError(RANDOM_BACKBONE_REFUSED)

    if options.corrections:
        from dart_core.corrections import read as read_corrections

        read_corrections(options.corrections)  # a bad file: one error line now, not after the model is built
    # unfetchable weights: say so now, not inside the flow
    if not is_weights_file(options.backbone, options.pretrained):
        check_downloadable(options.backbone, options.pretrained)
    if not options.crg and not options.crg_source:
        typer.echo("no --crg given: using the text-similarity CRG (the paper's 'Sim.' variant)")
    from dart_core.devices import require_device

    require_device(options.device)
    if options.nproc > 1:
        from flows.train import check_ranks

        # before the flow starts: --device cuda:N, too few GPUs, inside torchrun
        check_ranks(options.nproc, options.device)
    if settings().world_size > 1:
        # under torchrun every rank trains (on cuda:LOCAL_RANK: dart_core.train.rank_device); Prefect
        # would start one flow run per rank
        from dart_core.data.reader import count_samples
        from dart_core.train import train_from_options

        ckpt = train_from_options(options, count_samples(options.shards))
    else:
        from flows.train import train_flow

        ckpt = train_flow(options)
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
