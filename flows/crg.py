"""Prefect flow `mine_crg`, which `dart crg mine` runs, and the code `dart crg tokens` and annotate
share with it.

The work is dart_core.crg; this module adds what dart_core must not know about: the API key (from
OPENAI_API_KEY, or a Prefect Secret block whose *name* is the option `api_key_block`), an S3-or-local
answer cache (dart_core.crg.cache.StorageCache), the CLIP text embedder, and Prefect caching of the whole task by
INPUTS + TASK_SOURCE (the inputs include the vocabulary's content hash, not just its path).

Secrets: the key goes from the environment / Secret block straight into the openai client. It is
not a flow or task parameter, not in the task's result, not in any log line, not in the answer
cache and not in crg.json.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from dart_core import storage
from dart_core.options.crg import MineOptions
from dart_core.settings import settings


@dataclass
class MineResult:
    out: str
    source: str
    classes: int
    report: dict = field(default_factory=dict)
    estimate: list[dict] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    note: str | None = None


def default_cache_dir() -> str:
    return os.path.join(settings().xdg_cache_home, "dart-annotate", "crg-answers")


def read_vocab(url: str):
    from dart_core.vocab import Vocabulary

    return Vocabulary.read_csv(url)  # local or s3://


def read_existing(url: str):
    """The previous crg.json at `url`, or None (missing or unreadable: then everything is mined)."""
    from dart_core.crg.graph import CRG, CRGError

    try:
        return CRG.read(url)  # local or s3://
    except CRGError:
        return None


def write_crg(crg, url: str) -> None:
    crg.write(url)  # local or s3://


def make_cache(url: str):
    from dart_core.crg.cache import StorageCache

    return StorageCache(url)  # local or s3://


def make_embed_fn(backbone: str, pretrained: str) -> Callable:
    """CLIP text embeddings (memoised: the estimate and the miner ask for the same names);
    backbone "hash" = the weight-free lexical stand-in of dart_core.crg.embed."""
    memo: dict = {}

    def embed(names: list[str]):
        key = tuple(names)
        if key not in memo:
            if backbone == "hash":
                from dart_core.crg.embed import hashed_embed

                memo[key] = hashed_embed(names)
            else:
                from dart_core.backbone import FrozenBackbone

                if "model" not in memo:
                    memo["model"] = FrozenBackbone(model_name=backbone, pretrained=pretrained,
                                                   prompt_template="a photo of a {}.", device="cpu")
                memo[key] = memo["model"].text_embeddings(list(names)).float().cpu().numpy()
        return memo[key]

    return embed


def resolve_api_key(api_key_block: str | None) -> str | None:
    key = settings().openai_api_key  # never logged: Settings' repr leaves it out
    if key:
        return key
    if api_key_block:
        from prefect.blocks.system import Secret

        return Secret.load(api_key_block).get()
    return None


def endpoint_configured(base_url: str | None, api_key: str | None) -> bool:
    """An LLM endpoint to mine from: `base_url`, else OPENAI_BASE_URL, or an API key."""
    return bool(base_url or settings().openai_base_url or api_key)


def run_mining(options: MineOptions, log: Callable[[str], None] = print) -> MineResult:
    """What the task of the `mine_crg` flow does; annotate (new classes) and the demo call it inside
    their own tasks. Raises VocabularyError / CRGError / CRGMiningError with one-line messages for
    bad input."""
    from dart_core.crg.client import LLMClient, RetryPolicy
    from dart_core.crg.mine import MiningConfig, build_crg, estimate_prompt_tokens
    from dart_core.crg.tokens import token_counter

    vocab = read_vocab(options.classes)
    cfg = MiningConfig(model=options.model, queries=options.queries, top_p=options.top_p,
                       neighbors=options.neighbors, shortlist=options.shortlist, concurrency=options.concurrency,
                       batch=options.batch, poll_interval=options.poll_interval)
    cfg.validate()
    source, note = options.source, None
    api_key = resolve_api_key(options.api_key_block) if source == "llm" else None
    if source == "llm" and not endpoint_configured(options.base_url, api_key):
        note = ("no LLM endpoint configured (set OPENAI_API_KEY, OPENAI_BASE_URL or --base-url): "
                "using --source similarity (text-embedding cosine, the paper's 'Sim.' CRG)")
        log(note)
        source = "similarity"
    embed_fn = make_embed_fn(options.backbone, options.pretrained) if (
        source == "similarity" or (source == "llm" and options.shortlist > 0)) else None
    estimates = []
    if source == "llm" and options.estimate:
        counter = token_counter(options.model)
        for s in ([options.shortlist, 0] if options.shortlist > 0 else [0]):
            e = estimate_prompt_tokens(vocab, cfg, counter, embed_fn, shortlist=s, max_exact=512 if s else 32)
            estimates.append(e)
            log(format_estimate(e))
    existing = read_existing(options.out) if source == "llm" else None
    client = None
    if source == "llm":
        client = LLMClient(options.base_url, api_key, options.model,
                           RetryPolicy(max_retries=options.max_retries, base_delay=options.retry_base_delay,
                                       timeout=options.request_timeout))
    cache = make_cache(options.cache or default_cache_dir()) if source == "llm" else None
    crg = build_crg(vocab, source, cfg, client=client, cache=cache, embed_fn=embed_fn, existing=existing, log=log)
    if note:
        crg.meta["source_note"] = note
    if source == "similarity":
        crg.meta["embedder"] = (f"{options.backbone}/{options.pretrained}" if options.backbone != "hash"
                                else "hash (lexical)")
    write_crg(crg, options.out)
    report = crg.meta.get("report", {})
    res = MineResult(options.out, source, len(vocab), report, estimates, list(crg.meta.get("incomplete", [])), note)
    for line in summary_lines(res, crg):
        log(line)
    return res


def format_estimate(e: dict) -> str:
    mode = f"shortlist {e['shortlist']}" if e["shortlist"] else "full list (--shortlist 0)"
    how = f"mean of {e['counted']} sampled prompts x {e['classes']}" if e["sampled"] else f"all {e['classes']} prompts"
    return (f"prompt tokens, {mode}: {e['per_query_mean']:.0f}/query (max {e['per_query_max']}), "
            f"{e['total']:,} for {e['queries']} queries x {e['classes']} classes "
            f"[{e['counter']}{'' if e['exact_counter'] else ' (' + (e.get('counter_note') or 'approximate') + ')'}; {how}]")


def summary_lines(res: MineResult, crg) -> list[str]:
    r = res.report
    n_edges = sum(len(v) for v in crg.neighbors.values())
    lines = [f"wrote {res.out}: {res.classes} classes, {n_edges} edges (source {res.source})"]
    if res.source == "llm":
        api = r.get("api", {})
        lines.append(f"classes mined {r.get('classes_mined', 0)}, reused {r.get('classes_reused', 0)}; answers from "
                     f"cache {r.get('answers_cached', 0)}, fetched {r.get('answers_fetched', 0)}; HTTP requests "
                     f"{api.get('requests', 0)}, retries {api.get('retries', 0)} {api.get('retry_reasons', {})}, "
                     f"batches {api.get('batches', 0)}")
        lines.append(f"names not in the candidate list dropped: {r.get('unknown_names', 0)}"
                     + (f" (e.g. {', '.join(r.get('unknown_examples', [])[:5])})" if r.get("unknown_examples") else "")
                     + f"; duplicates merged: {r.get('duplicates', 0)}; self-mentions dropped: {r.get('self_mentions', 0)}")
        if r.get("unparseable"):
            ex = ", ".join(f"{u['class']}#{u['query'] + 1}" for u in r["unparseable"][:10])
            lines.append(f"unparseable answers (cached raw, no edges): {len(r['unparseable'])}: {ex}")
        if res.incomplete:
            lines.append(f"{len(res.incomplete)} classes incomplete after retries (not cached; rerun to retry): "
                         + ", ".join(res.incomplete[:10]))
    return lines


# ---- Prefect -------------------------------------------------------------------------------------
def _file_sha(url: str) -> str:
    try:
        return storage.sha256(url)
    except FileNotFoundError:
        return hashlib.sha256(b"").hexdigest()


@task(name="mine-crg", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def mine_crg_task(options: dict, classes_sha256: str) -> dict:
    """Cached across runs by (options, the vocabulary's content hash, this code). `options` holds
    no secret: the key is resolved here, inside the task, from the environment or a Secret block."""
    logger = get_run_logger()
    res = run_mining(MineOptions(**options), log=logger.info)
    return asdict(res)


@flow(name="mine_crg")
def mine_crg(options: MineOptions) -> dict:
    """Mine the CRG for `options.classes` (classes.csv) into `options.out` (crg.json), local or s3://.
    Returns the run's MineResult as a dict; `incomplete` lists the classes to mine again."""
    written = read_existing(options.out)
    # a cached result must describe the crg.json that is there and what a run would make now, so
    # recompute (answers stay cached) when that file was deleted or is unreadable, when it is not
    # of the source asked for (an LLM run that fell back to similarity: an endpoint may be set now),
    # or when it lists incomplete classes, which a rerun is to retry
    stale = written is None or written.source != options.source or bool(written.meta.get("incomplete"))
    state = mine_crg_task.with_options(refresh_cache=stale)(options.model_dump(), _file_sha(options.classes),
                                                             return_state=True)
    res = state.result()
    if state.name == "Cached":  # nothing ran, so nothing was logged: say why
        get_run_logger().info(f"{options.out} is up to date: an earlier run with the same options and vocabulary "
                              f"wrote it ({res['classes']} classes, source {res['source']}; Prefect task cache)")
    return res
