"""Options of `dart pipeline` (flows/pipeline.py): shard -> CRG -> train -> annotate -> evaluate -> audit."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from dart_core.options._fields import Cli, Device, Options, positive, share, share_held_out
from dart_core.options.data import AbsentRule, SourceFormat

TEST_SPLIT = {"coco": "val2014"}  # the others: "test"
TRAIN_SPLIT = {"coco": "train2014"}  # the others: "train"


class PipelineError(ValueError):
    """A pipeline option that cannot work; the message names the option."""


class PipelineOptions(Options):
    """One pipeline run over a real source. Bounds are the fields'; the rules across fields (a
    folder source needs its test folder, the work folder is local, ...) are `resolved()`'s, which
    the command and the flow both call."""

    source: Annotated[str, Cli(argument=True)] = Field(
        description="Dataset root (local dir or s3://bucket/prefix); its training split is sharded.")
    format: SourceFormat = Field(description="The dataset's layout.")
    out: str = Field(description="Local work folder: shards/, crg.json, runs/, predictions/, eval.json, report/, "
                                 "summary.md (a rerun skips what has not changed).")
    test_source: str | None = Field(None, description="Where the labelled test split is (default: SOURCE; required "
                                                       "for --format folder).")
    train_split: str | None = Field(None, description="Training split (default: the format's: train, coco train2014).")
    test_split: str | None = Field(None, description="Test split (default: test, coco val2014).")
    shards: str | None = Field(None, description="Shard root, local or s3:// (default OUT/shards).")
    predictions: str | None = Field(None, description="Prediction folder, local or s3:// (default OUT/predictions).")
    shard_size: int = Field(5000, ge=1, description="Samples per shard.")
    shard_workers: int | None = Field(None, ge=1, description="Decoding processes while sharding (default: all cores).")
    image_size: int = Field(256, ge=1, description="Shorter side of the sharded images after resizing.")
    absent: AbsentRule | None = Field(
        None, description="folder only: what a class an image's labels do not name is.")
    crg_source: Literal["auto", "llm", "similarity"] = Field(
        "auto", description="auto: the LLM when an OpenAI-compatible endpoint is configured, else text similarity.")
    crg_model: str = Field("gpt-4o", description="Chat model that names each class's neighbours.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL).")
    api_key_block: str | None = Field(None, description="Name of a Prefect Secret block holding the LLM key "
                                                        "(default: $OPENAI_API_KEY).")
    neighbors: int = Field(8, ge=1, description="Neighbours per class in the CRG (paper: 8; Open Images 12).")
    backbone: str = Field("ViT-B-16", description="open_clip model name.")
    pretrained: str = Field("openai", description="open_clip pretrained tag or a local weights file.")
    top_k_share: Annotated[float | None, AfterValidator(share)] = Field(
        None, description="Patches aggregated per class, as a share of the patch grid (default 16/196).")
    # further DARTConfig fields (arm_layers, wps_tau, ...) for a deployment; part of the training fingerprint
    model_cfg: Annotated[dict, Cli(hidden=True)] = Field(default_factory=dict)
    epochs: int = Field(20, ge=1, description="Training epochs.")
    batch_size: int = Field(256, ge=1, description="Training batch per process.")
    lr: Annotated[float, AfterValidator(positive)] = Field(1e-4, description="Peak learning rate.")
    val_share: Annotated[float, AfterValidator(share_held_out)] = Field(
        0.05, description="Share of the training samples held out to pick the best epoch.")
    nproc: Annotated[int, Cli("--nproc", "--gpus")] = Field(
        1, ge=1, description="Training processes under torchrun (one per GPU with --device cuda).")
    device: Device = "cpu"
    train_workers: int | None = Field(None, ge=0, description="DataLoader workers per training process (default: 0 "
                                                              "on the CPU, min(8, cores - 1) on a GPU).")
    annotate_batch_size: int = Field(64, ge=1, description="Images per model step when annotating.")
    top_m: int = Field(10, ge=1, description="Tags written per image.")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Where annotate's shard tasks run.")
    annotate_workers: int | None = Field(None, ge=1, description="Parallel shard tasks when annotating.")
    ks: Annotated[list[Annotated[int, Field(ge=1)]], Cli("--k")] = Field(
        [3, 5], min_length=1, description="K for P/R/F1@K (repeat: --k 3 --k 5).")
    audit: bool = Field(True, description="Write the label-audit report.")
    audit_limit: int = Field(2000, ge=1, description="Rows of the audit's review list.")
    # when last.pt is written, not what is learnt: not part of the training fingerprint
    checkpoint_every: int = Field(0, ge=0, description="Also write last.pt every N training steps (0: at each "
                                                       "epoch's end); a killed run loses at most N steps.")

    def model_settings(self) -> dict:
        """The DARTConfig fields this run sets (the training fingerprint includes them)."""
        extra = {"top_k_share": self.top_k_share} if self.top_k_share else {}
        return {"backbone": self.backbone, "pretrained": self.pretrained, **self.model_cfg, **extra}

    def resolved(self) -> "PipelineOptions":
        """Defaults filled in, paths made absolute; raises PipelineError naming the option for what
        cannot work."""
        from dart_core import storage

        o = self.model_copy(deep=True)
        if storage.is_s3(o.out):
            raise PipelineError(f"--out {o.out}: the work folder must be local (training writes there); "
                                "--shards and --predictions may be s3://")
        if o.format == "folder" and not o.test_source:
            raise PipelineError("--format folder: --test-source is required (the folder with the labelled test images "
                                "and the same classes.csv; a folder source holds one split)")
        if o.pretrained.lower() == "none":
            from dart_core.train import RANDOM_BACKBONE_REFUSED

            raise PipelineError(RANDOM_BACKBONE_REFUSED)
        from dart_core.backbone import is_weights_file

        if is_weights_file(o.backbone, o.pretrained):
            if not os.path.isfile(o.pretrained):
                raise PipelineError(f"--pretrained {o.pretrained}: no such weights file")
            o.pretrained = str(Path(o.pretrained).resolve())

        def absolute(url: str) -> str:
            return url if storage.is_s3(url) else str(Path(url).resolve())

        o.out, o.source = absolute(o.out), absolute(o.source)
        o.test_source = absolute(o.test_source or o.source)
        o.train_split = o.train_split or TRAIN_SPLIT.get(o.format, "train")
        o.test_split = o.test_split or TEST_SPLIT.get(o.format, "test")
        if o.train_split == o.test_split and o.test_source == o.source:
            raise PipelineError(f"--train-split and --test-split are both {o.train_split!r} of one source")
        o.shards = o.shards or str(Path(o.out) / "shards")
        o.predictions = o.predictions or str(Path(o.out) / "predictions")
        return o
