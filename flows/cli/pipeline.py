"""`dart pipeline`: shard -> CRG -> train -> annotate -> evaluate -> audit over a real source."""
from __future__ import annotations

from dataclasses import asdict
from typing import List, Literal, Optional

import typer

from flows.cli import _options as check
from flows.cli._app import app
from flows.cli.data import SourceFormat


@app.command()
def pipeline(
    source: str = typer.Argument(..., help="Dataset root (local dir or s3://bucket/prefix); its training split is sharded."),
    format: SourceFormat = typer.Option(..., "--format", help="The dataset's layout."),
    out: str = typer.Option(..., "--out", help="Local work folder: shards/, crg.json, runs/, predictions/, eval.json, "
                                               "report/, summary.md (a rerun skips what has not changed)."),
    test_source: Optional[str] = typer.Option(None, "--test-source", help="Where the labelled test split is "
                                              "(default: SOURCE; required for --format folder)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Training split (default: the format's: train, coco train2014)."),
    test_split: Optional[str] = typer.Option(None, "--test-split", help="Test split (default: test, coco val2014)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shard root, local or s3:// (default OUT/shards)."),
    predictions: Optional[str] = typer.Option(None, "--predictions", help="Prediction folder, local or s3:// (default OUT/predictions)."),
    shard_size: int = typer.Option(5000, "--shard-size", min=1, help="Samples per shard."),
    shard_workers: Optional[int] = typer.Option(None, "--shard-workers", min=1, help="Decoding processes while sharding (default: all cores)."),
    absent: Optional[Literal["negative", "unknown"]] = typer.Option(None, "--absent", help="folder only: what a class an image's labels do not name is."),
    crg_source: Literal["auto", "llm", "similarity"] = typer.Option(
        "auto", "--crg-source", help="auto: the LLM when an OpenAI-compatible endpoint is configured, else text similarity."),
    crg_model: str = typer.Option("gpt-4o", "--crg-model", help="Chat model that names each class's neighbours."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)."),
    backbone: str = typer.Option("ViT-B-16", "--backbone", help="open_clip model name."),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag or a local weights file."),
    top_k_share: Optional[float] = typer.Option(None, "--top-k-share", callback=check.share, help="Patches aggregated per class, as a share of the patch grid (default 16/196)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Training epochs."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Training batch per process."),
    lr: float = typer.Option(1e-4, "--lr", callback=check.positive, help="Peak learning rate."),
    val_share: float = typer.Option(0.05, "--val-share", callback=check.share_held_out, help="Share of the training samples held out to pick the best epoch."),
    nproc: int = typer.Option(1, "--nproc", "--gpus", min=1, help="Training processes under torchrun (one per GPU with --device cuda)."),
    device: str = typer.Option("cpu", "--device", callback=check.device, help=check.DEVICE_HELP),
    annotate_batch_size: int = typer.Option(64, "--annotate-batch-size", min=1, help="Images per model step when annotating."),
    top_m: int = typer.Option(10, "--top-m", min=1, help="Tags written per image."),
    task_runner: Literal["threads", "dask", "ray"] = typer.Option("threads", "--task-runner", help="Where annotate's shard tasks run."),
    k: List[int] = typer.Option([3, 5], "--k", min=1, help="K for P/R/F1@K (repeat: --k 3 --k 5)."),
    audit: bool = typer.Option(True, "--audit/--no-audit", help="Write the label-audit report."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Also write last.pt every N training steps "
                                                                          "(0: at each epoch's end); a killed run loses at most N steps."),
) -> None:
    """Run the whole pipeline on a real source: shard (incremental) -> CRG (cached) -> train -> annotate
    -> evaluate -> audit. Each stage is skipped when its inputs have not changed; prints the eval table."""
    from flows.pipeline import PipelineOptions, pipeline_flow, summary_markdown

    opts = PipelineOptions(source=source, format=format, out=out, test_source=test_source, train_split=train_split,
                           test_split=test_split, shards=shards, predictions=predictions, shard_size=shard_size,
                           shard_workers=shard_workers, absent=absent, crg_source=crg_source, crg_model=crg_model,
                           base_url=base_url, backbone=backbone, pretrained=pretrained,
                           model_cfg={"top_k_share": top_k_share} if top_k_share else {}, epochs=epochs,
                           batch_size=batch_size, lr=lr, val_share=val_share, nproc=nproc, device=device,
                           annotate_batch_size=annotate_batch_size, top_m=top_m, task_runner=task_runner, ks=list(k),
                           audit=audit, checkpoint_every=checkpoint_every)
    opts.resolved()  # a bad option: one error line now, before Prefect starts
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            typer.echo(f"error: --device {device} but no CUDA device is available", err=True)
            raise typer.Exit(2)
    s = pipeline_flow(**asdict(opts))
    typer.echo(summary_markdown(s), nl=False)
    typer.echo(f"summary: {s['summary_md']}")
