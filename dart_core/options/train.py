"""Options of `dart train` (flows/train.py, the ranks of flows/ranks.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field

from dart_core.options._fields import Cli, Device, Options, positive, share, share_held_out

if TYPE_CHECKING:
    from dart_core.model import DARTConfig
    from dart_core.train import TrainConfig


class TrainOptions(Options):
    """One training run: the data, the model, the schedule and where it runs. The flow `train` takes
    it whole; under torchrun each rank gets it as JSON (`model_dump`); the library gets the
    DARTConfig and TrainConfig built from it."""

    shards: str = Field(description="Shard folder or s3:// prefix (complete shards are used).")
    classes: str = Field(description="classes.csv (id,name,split); DART trains on the seen classes.")
    out: str = Field(description="Run folder: last.pt (resume), model.pt, history.jsonl.")
    crg: str | None = Field(None, description="crg.json from `dart crg mine`.")
    crg_source: Literal["file", "similarity", "random"] | None = Field(
        None, description="Where the class graph comes from (default: file with --crg, else similarity).")
    backbone: str = Field("ViT-B-16", description="open_clip model name.")
    pretrained: str = Field("openai", description="open_clip pretrained tag or a local weights file (stored by "
                                                  "absolute path + sha256).")
    epochs: int = Field(20, ge=1, description="Passes over the training samples.")
    batch_size: int = Field(256, ge=1, description="Samples per optimiser step (per process under torchrun).")
    lr: Annotated[float, AfterValidator(positive)] = Field(
        1e-4, description="Peak learning rate (AdamW; warm-up, then cosine).")
    device: Device = "cpu"
    workers: int | None = Field(None, ge=0, description="DataLoader workers for decoding, per process (default: 0 on "
                                                        "the CPU, min(8, cores - 1) on a GPU).")
    nproc: Annotated[int, Cli("--nproc", "--gpus")] = Field(
        1, ge=1, description="Training processes launched under torchrun by the flow (DDP; one per GPU with --device "
                             "cuda, gloo processes on CPU); --batch-size is per process.")
    arm_layers: int = Field(1, ge=1, description="ARM layers, beside the last N frozen ViT blocks.")
    top_k_share: Annotated[float, AfterValidator(share)] = Field(
        16 / 196, description="Patches aggregated per class, as a share of the patch grid (the paper's 16 of 196).")
    wps_tau: float = Field(0.0, ge=0, description="Temperature of the WPS responsibilities (0: the library default, "
                                                  "CLIP's learned 100, App. A).")
    val_shards: str | None = Field(None, description="Validation shards (seen-class mAP picks the saved epoch); "
                                                     "default: a slice held out of --shards.")
    val_share: Annotated[float, AfterValidator(share_held_out)] = Field(
        0.05, description="Share of the training samples held out for validation when --val-shards is not given "
                          "(0: none).")
    lambda_end: float = Field(0.0, ge=0, le=1, description="WPS λ at the last step (annealed from 1; 1 keeps the "
                                                           "VLP's prior responsibilities).")
    checkpoint_every: int = Field(
        0, ge=0, description="Also write last.pt every N optimiser steps (0: at the end of each epoch only); on long "
                             "epochs a crash or a killed rank then loses at most N steps.")
    arm: Annotated[bool, Cli("--arm/--no-arm")] = Field(
        True, description="--no-arm: the ablation without the ARM (Tab. 5).")
    wps: Annotated[bool, Cli("--wps/--no-wps")] = Field(
        True, description="--no-wps: the ablation without the WPS loss (Tab. 5).")
    atm: Annotated[bool, Cli("--atm/--no-atm")] = Field(
        True, description="--no-atm: the ablation without the ATM (Tab. 5).")
    corrections: str | None = Field(
        None, description="Corrections file (`dart corrections`, or a reviewed `dart audit --export` file) applied on "
                          "top of the shard labels; recorded in the checkpoint.")
    # what `dart demo`, the pipeline and the benchmarks set beyond the command's options (a seed,
    # the warm-up, wps_tau None, ...): any DARTConfig / TrainConfig field, over the fields above
    model_overrides: Annotated[dict[str, Any], Cli(hidden=True)] = Field(
        default_factory=dict, description="DARTConfig fields set on top of the options above.")
    train_overrides: Annotated[dict[str, Any], Cli(hidden=True)] = Field(
        default_factory=dict, description="TrainConfig fields set on top of the options above.")

    def graph_source(self) -> str:
        """Where the class graph comes from: --crg-source, else the file given with --crg, else similarity."""
        return self.crg_source or ("file" if self.crg else "similarity")

    def dart_settings(self) -> dict[str, Any]:
        """The DARTConfig fields this run sets."""
        # "none" becomes no weights, which train_on_shards refuses with its own message
        pretrained = None if self.pretrained.lower() == "none" else self.pretrained
        return {"backbone": self.backbone, "pretrained": pretrained, "arm_layers": self.arm_layers,
                "top_k_share": self.top_k_share, **({"wps_tau": self.wps_tau} if self.wps_tau else {}),
                "use_arm": self.arm, "use_wps": self.wps, "use_atm": self.atm, **self.model_overrides}

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields this run sets (read without torch by the flow's checks)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "lam_end": self.lambda_end,
                "val_share": self.val_share, "checkpoint_every": self.checkpoint_every,
                "corrections": self.corrections or None, **self.train_overrides}

    def dart_config(self) -> DARTConfig:
        from dart_core.model import DARTConfig

        return DARTConfig(**self.dart_settings())

    def train_config(self) -> TrainConfig:
        from dart_core.train import TrainConfig

        return TrainConfig(**self.train_settings())
