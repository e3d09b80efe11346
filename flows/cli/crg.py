"""CLI for the Class Relationship Graph: `dart crg mine`, `dart crg show`, `dart crg tokens`.

Heavy modules (openai, numpy, torch, prefect, matplotlib) are imported inside the commands so
that `dart --help` stays fast. Bad input ends with one line on stderr naming the file/row/class
and exit code 2; no traceback (flows.cli._guard).
"""
from __future__ import annotations

import typer

from dart_core.options.crg import MineOptions
from flows.cli._app import app
from flows.cli._command import options_command

crg_app = typer.Typer(help="Class Relationship Graph: mine it from an LLM (or fallbacks), look at it.",
                      no_args_is_help=True)
app.add_typer(crg_app, name="crg")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@options_command(crg_app, MineOptions, name="mine")
def mine(options: MineOptions) -> None:
    """Mine the CRG for CLASSES_CSV into CRG_JSON. The API key comes from $OPENAI_API_KEY."""
    from flows.cli._run import plain_output
    from flows.crg import mine_crg

    try:
        with plain_output(echo=True):  # the estimate, progress and summary lines on stderr, as plain lines
            res = mine_crg(options)
    except _backbone_errors() as e:
        _fail(f"{e} (use --backbone hash for the weight-free embedder, or --shortlist 0 --source llm)")
    if res["incomplete"]:
        raise typer.Exit(1)


def _backbone_errors():
    try:
        from dart_core.backbone import BackboneError
        return (BackboneError,)
    except ImportError:  # pragma: no cover - the backbone module ships with the package
        return ()


@crg_app.command("tokens")
def tokens(
    classes: str = typer.Option(..., "--classes", help="classes.csv (id,name,split)"),
    shortlist: int = typer.Option(200, "--shortlist", min=0, help="shortlist size to estimate beside the full list"),
    queries: int = typer.Option(3, "--queries", min=1, help="queries per class (paper: 3)"),
    model: str = typer.Option("gpt-4o", "--model", help="picks the tiktoken encoding"),
    backbone: str = typer.Option("ViT-B-16", "--backbone", help="open_clip model for the shortlist's text "
                                 "embeddings ('hash' = weight-free lexical stand-in)"),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag or checkpoint file"),
    approx: bool = typer.Option(False, "--approx", help="use the documented approximation even if tiktoken works"),
) -> None:
    """Print the prompt-token estimate of mining CLASSES_CSV, shortlist vs full list; no API calls."""
    from dart_core.crg.mine import MiningConfig, estimate_prompt_tokens
    from dart_core.crg.tokens import token_counter
    from flows.crg import format_estimate, make_embed_fn, read_vocab

    try:
        vocab = read_vocab(classes)
        cfg = MiningConfig(model=model, queries=queries, shortlist=shortlist)
        cfg.validate()
        counter = token_counter(model, "approx" if approx else "auto")
        embed_fn = make_embed_fn(backbone, pretrained) if shortlist > 0 else None
        for s in ([shortlist, 0] if shortlist > 0 else [0]):
            typer.echo(format_estimate(estimate_prompt_tokens(vocab, cfg, counter, embed_fn, shortlist=s,
                                                              max_exact=512 if s else 32)))
    except _backbone_errors() as e:
        _fail(f"{e} (use --backbone hash for the weight-free embedder)")


@crg_app.command("show")
def show(
    class_: str = typer.Argument(..., metavar="CLASS", help="class id or name"),
    crg: str = typer.Option(..., "--crg", help="crg.json"),
    out: str = typer.Option(..., "--out", help="PNG to write"),
) -> None:
    """Draw CLASS and its CRG neighbours (like the paper's Fig. 9) into a PNG."""
    from dart_core.crg.graph import CRG
    from dart_core.crg.plot import draw_neighbourhood

    graph = CRG.read(crg)
    info = draw_neighbourhood(graph, class_, out)
    names = dict(zip(graph.class_ids, graph.class_names))
    typer.echo(f"wrote {info['path']}: {names.get(info['class'], info['class'])} with "
               f"{len(info['neighbors'])} neighbours: {', '.join(names.get(n, n) for n in info['neighbors'])}")
