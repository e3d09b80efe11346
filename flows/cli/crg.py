"""CLI for the Class Relationship Graph: `dart crg mine`, `dart crg show`, `dart crg tokens`.

Heavy modules (openai, numpy, torch, prefect, matplotlib) are imported inside the commands so
that `dart --help` stays fast. Bad input ends with one line on stderr naming the file/row/class
and exit code 2; no traceback (flows.cli._guard).
"""
from __future__ import annotations

from typing import Literal, Optional

import typer

from flows.cli import _options as check
from flows.cli._app import app

crg_app = typer.Typer(help="Class Relationship Graph: mine it from an LLM (or fallbacks), look at it.",
                      no_args_is_help=True)
app.add_typer(crg_app, name="crg")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@crg_app.command("mine")
def mine(
    classes: str = typer.Option(..., "--classes", help="classes.csv (id,name,split), local or s3://"),
    out: str = typer.Option(..., "--out", help="crg.json to write (an existing one is extended incrementally)"),
    source: Literal["llm", "similarity", "random"] = typer.Option(
        "llm", "--source", help="who names each class's neighbours (similarity: text embeddings; random: a control)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (default: OpenAI, or $OPENAI_BASE_URL)"),
    model: str = typer.Option("gpt-4o", "--model", help="chat model name"),
    queries: int = typer.Option(3, "--queries", min=1, help="queries per class (paper: 3)"),
    top_p: float = typer.Option(0.3, "--top-p", callback=check.share, help="nucleus sampling (paper: 0.3)"),
    neighbors: int = typer.Option(8, "--neighbors", min=1, help="top-N neighbours per class (paper: 8; Open Images 12)"),
    shortlist: int = typer.Option(200, "--shortlist", min=0, help="candidates per prompt by text-embedding similarity; 0 = all seen classes (paper)"),
    cache: Optional[str] = typer.Option(None, "--cache", help="answer cache dir, local or s3:// (default ~/.cache/dart-annotate/crg-answers)"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="requests in flight at once"),
    batch: bool = typer.Option(False, "--batch", help="use the OpenAI Batch API (cheaper, slower)"),
    backbone: str = typer.Option("ViT-B-16", "--backbone", help="open_clip model for text embeddings ('hash' = weight-free lexical stand-in)"),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag or checkpoint file"),
    poll_interval: float = typer.Option(10.0, "--poll-interval", callback=check.positive, help="seconds between batch status polls"),
    retry_base_delay: float = typer.Option(1.0, "--retry-base-delay", min=0, help="first backoff step in seconds (doubles per retry, jittered)"),
    request_timeout: float = typer.Option(120.0, "--request-timeout", callback=check.positive, help="seconds before a request is retried as timed out"),
) -> None:
    """Mine the CRG for CLASSES_CSV into CRG_JSON. The API key comes from $OPENAI_API_KEY."""
    from flows.crg import MineOptions, run_mining

    opt = MineOptions(classes=classes, out=out, source=source, base_url=base_url, model=model, queries=queries,
                      top_p=top_p, neighbors=neighbors, shortlist=shortlist, cache=cache, concurrency=concurrency,
                      batch=batch, backbone=backbone, pretrained=pretrained, poll_interval=poll_interval,
                      retry_base_delay=retry_base_delay, request_timeout=request_timeout)
    try:
        res = run_mining(opt, log=lambda s: typer.echo(s, err=True))
    except _backbone_errors() as e:
        _fail(f"{e} (use --backbone hash for the weight-free embedder, or --shortlist 0 --source llm)")
    if res.incomplete:
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
