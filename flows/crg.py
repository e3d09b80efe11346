"""Prefect flow `mine_crg` and the code the `dart crg mine` CLI shares with it.

The work is dart_core.crg; this module adds what dart_core must not know about: the API key (from
OPENAI_API_KEY, or a Prefect Secret block whose *name* is the flow parameter), an S3-or-local
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
from dart_core.settings import settings


@dataclass
class MineOptions:
    classes: str
    out: str
    source: str = "llm"
    base_url: str | None = None
    model: str = "gpt-4o"
    queries: int = 3
    top_p: float = 0.3
    neighbors: int = 8
    shortlist: int = 200
    cache: str | None = None
    concurrency: int = 8
    batch: bool = False
    backbone: str = "ViT-B-16"
    pretrained: str = "openai"
    api_key_block: str | None = None  # name of a Prefect Secret block holding the key
    poll_interval: float = 10.0
    max_retries: int = 6
    retry_base_delay: float = 1.0
    request_timeout: float = 120.0
    estimate: bool = True  # print the prompt-token estimate for both shortlist modes


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


def run_mining(opt: MineOptions, log: Callable[[str], None] = print) -> MineResult:
    """Everything `dart crg mine` and the `mine_crg` flow do. Raises VocabularyError / CRGError /
    CRGMiningError with one-line messages for bad input."""
    from dart_core.crg.client import LLMClient, RetryPolicy
    from dart_core.crg.mine import MiningConfig, build_crg, estimate_prompt_tokens
    from dart_core.crg.tokens import token_counter

    vocab = read_vocab(opt.classes)
    cfg = MiningConfig(model=opt.model, queries=opt.queries, top_p=opt.top_p, neighbors=opt.neighbors,
                       shortlist=opt.shortlist, concurrency=opt.concurrency, batch=opt.batch,
                       poll_interval=opt.poll_interval)
    cfg.validate()
    source, note = opt.source, None
    if source not in ("llm", "similarity", "random"):
        from dart_core.crg.mine import CRGMiningError

        raise CRGMiningError(f"unknown --source {source!r} (llm, similarity or random)")
    api_key = resolve_api_key(opt.api_key_block) if source == "llm" else None
    if source == "llm" and not endpoint_configured(opt.base_url, api_key):
        note = ("no LLM endpoint configured (set OPENAI_API_KEY, OPENAI_BASE_URL or --base-url): "
                "using --source similarity (text-embedding cosine, the paper's 'Sim.' CRG)")
        log(note)
        source = "similarity"
    embed_fn = make_embed_fn(opt.backbone, opt.pretrained) if (source == "similarity" or
                                                                 (source == "llm" and opt.shortlist > 0)) else None
    estimates = []
    if source == "llm" and opt.estimate:
        counter = token_counter(opt.model)
        for s in ([opt.shortlist, 0] if opt.shortlist > 0 else [0]):
            e = estimate_prompt_tokens(vocab, cfg, counter, embed_fn, shortlist=s, max_exact=512 if s else 32)
            estimates.append(e)
            log(format_estimate(e))
    existing = read_existing(opt.out) if source == "llm" else None
    client = None
    if source == "llm":
        client = LLMClient(opt.base_url, api_key, opt.model,
                           RetryPolicy(max_retries=opt.max_retries, base_delay=opt.retry_base_delay,
                                       timeout=opt.request_timeout))
    cache = make_cache(opt.cache or default_cache_dir()) if source == "llm" else None
    crg = build_crg(vocab, source, cfg, client=client, cache=cache, embed_fn=embed_fn, existing=existing, log=log)
    if note:
        crg.meta["source_note"] = note
    if source == "similarity":
        crg.meta["embedder"] = f"{opt.backbone}/{opt.pretrained}" if opt.backbone != "hash" else "hash (lexical)"
    write_crg(crg, opt.out)
    report = crg.meta.get("report", {})
    res = MineResult(opt.out, source, len(vocab), report, estimates, list(crg.meta.get("incomplete", [])), note)
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
        data = storage.read_bytes(url)
    except FileNotFoundError:
        data = b""
    return hashlib.sha256(data).hexdigest()


@task(name="mine-crg", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def mine_crg_task(options: dict, classes_sha256: str) -> dict:
    """Cached across runs by (options, the vocabulary's content hash, this code). `options` holds
    no secret: the key is resolved here, inside the task, from the environment or a Secret block."""
    logger = get_run_logger()
    res = run_mining(MineOptions(**options), log=logger.info)
    return asdict(res)


@flow(name="mine_crg")
def mine_crg(classes: str, out: str, source: str = "llm", base_url: str | None = None, model: str = "gpt-4o",
             queries: int = 3, top_p: float = 0.3, neighbors: int = 8, shortlist: int = 200,
             cache: str | None = None, concurrency: int = 8, batch: bool = False, backbone: str = "ViT-B-16",
             pretrained: str = "openai", api_key_block: str | None = None, poll_interval: float = 10.0,
             retry_base_delay: float = 1.0, request_timeout: float = 120.0) -> dict:
    """Mine the CRG for `classes` (classes.csv) into `out` (crg.json), local or s3://."""
    opts = MineOptions(classes=classes, out=out, source=source, base_url=base_url, model=model, queries=queries,
                       top_p=top_p, neighbors=neighbors, shortlist=shortlist, cache=cache, concurrency=concurrency,
                       batch=batch, backbone=backbone, pretrained=pretrained, api_key_block=api_key_block,
                       poll_interval=poll_interval, retry_base_delay=retry_base_delay,
                       request_timeout=request_timeout)
    exists = storage.exists(out)
    # a cached result whose crg.json was deleted would be a lie: recompute then (answers stay cached)
    t = mine_crg_task.with_options(refresh_cache=not exists)
    return t(asdict(opts), _file_sha(classes))
