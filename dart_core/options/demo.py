"""Options of `dart demo` (flows/demo.py): the whole pipeline on the embedded synthetic world."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from dart_core.options._fields import Cli, Options

# The paper's schedule for NUS-WIDE and COCO (App. A): 20 epochs of batch 256, lr 1e-4 with 2
# linear warm-up epochs, cosine to 1e-5, λ 1 -> 0. Everything else is the library's default.
DEMO_TRAIN = dict(epochs=20, batch_size=256, lr=1e-4, min_lr=1e-5, warmup_epochs=2.0)
# How the demo (and benchmarks/label_audit.py) annotates its test split: top_m 64 keeps a tag row for
# each of the world's 30 classes; each rerun replaces the last run's tables.
DEMO_ANNOTATE = dict(top_m=64, batch_size=128, mode="overwrite")


class DemoOptions(Options):
    """One demo run: the world's size, the training schedule, what is measured besides the main run."""

    workdir: str = Field("demo", description="Where everything is written (reruns reuse what is there).")
    n_train: int = Field(3000, ge=1, description="Training images.")
    n_test: int = Field(600, ge=1, description="Test images.")
    # the world's seed: the demo world is a measuring instrument, the same world for every run
    seed: Annotated[int, Cli(hidden=True)] = 0
    epochs: int = Field(DEMO_TRAIN["epochs"], ge=1,
                        description="DART training epochs (the paper's NUS-WIDE/COCO schedule).")
    batch_size: int = Field(DEMO_TRAIN["batch_size"], ge=1, description="DART training batch (the paper's).")
    train_seeds: Annotated[list[int], Cli("--train-seed")] = Field(
        [0], min_length=1, description="DART training seed; repeat it (--train-seed 0 --train-seed 1 ...) to train "
                                       "once per seed and report the mean and spread.")
    vlp_steps: int = Field(300, ge=0, description="Contrastive pretraining steps of the small VLP (cached).")
    ablations: bool = Field(False, description="Also train the Tab. 5/6 variants (no ARM/WPS/ATM; random, similarity "
                                               "and world CRG; WPS τ at the VLP's own scale).")
    vlp_cache: str | None = Field(None, description="Folder caching the pretrained VLP (default WORKDIR/vlp-cache).")
    label_noise: Annotated[float, Cli(metavar="SHARE")] = Field(
        0.0, ge=0.0, le=1.0,
        description="Also measure the label audit on known errors: this share of the test split's positives dropped "
                    "and of its negatives turned positive (seeded) in a copy of its shards, annotated with the trained "
                    "DART and audited; prints precision / recall at the top 1/2/5 % (sql and cleanlab). 0: off.")
