"""`dart demo`: the whole pipeline on the embedded synthetic world."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.cli._app import app


@app.command()
def demo(
    workdir: str = typer.Option("demo", help="Where everything is written (reruns reuse what is there)."),
    n_train: int = typer.Option(3000, min=1, help="Training images."),
    n_test: int = typer.Option(600, min=1, help="Test images."),
    epochs: int = typer.Option(20, min=1, help="DART training epochs (the paper's NUS-WIDE/COCO schedule)."),
    batch_size: int = typer.Option(256, min=1, help="DART training batch (the paper's)."),
    train_seed: List[int] = typer.Option([0], help="DART training seed; repeat it (--train-seed 0 --train-seed 1 ...) "
                                                   "to train once per seed and report the mean and spread."),
    vlp_steps: int = typer.Option(300, min=0, help="Contrastive pretraining steps of the small VLP (cached)."),
    ablations: bool = typer.Option(False, help="Also train the Tab. 5/6 variants (no ARM/WPS/ATM; random, similarity "
                                               "and world CRG; WPS τ at the VLP's own scale)."),
    vlp_cache: Optional[str] = typer.Option(None, help="Folder caching the pretrained VLP (default WORKDIR/vlp-cache)."),
    label_noise: float = typer.Option(0.0, min=0.0, max=1.0, metavar="SHARE",
                                      help="Also measure the label audit on known errors: this share of the test "
                                           "split's positives dropped and of its negatives turned positive (seeded) in "
                                           "a copy of its shards, annotated with the trained DART and audited; prints "
                                           "precision / recall at the top 1/2/5 % (sql and cleanlab). 0: off."),
) -> None:
    """generate -> shard -> VLP -> CRG -> train -> annotate -> eval -> audit, printing the ZSL/GZSL table."""
    from flows.demo import demo_flow, format_label_noise, format_results

    res = demo_flow(workdir, n_train, n_test, 0, vlp_steps, epochs, ablations, vlp_cache, list(train_seed), batch_size,
                    label_noise=label_noise)
    typer.echo(f"\nCRG: {res['crg_source']}    VLP: {res['vlp']}")
    typer.echo("test split, percent (loc = top patch inside the class's box):")
    typer.echo(format_results(res))
    if "label_noise" in res:
        typer.echo("\n" + format_label_noise(res["label_noise"]))
    typer.echo(f"\naudit report: {res['report']}\nall results: {Path(workdir) / 'results.json'}  ({res['seconds']:.0f} s)")

