"""Mine the Class Relationship Graph from an LLM (paper Sec. 3.4, App. A and C.4).

For every class c of the vocabulary (seen and unseen) we ask `queries` times (3, top_p 0.3 — App. A)
which of the candidate categories relate to c, parse each free-text answer into (class, strength),
aggregate over the queries and keep the top N (8; 12 for Open Images — App. A).

Candidates. The paper lists every known (seen) category in each prompt ("List of Seen
Categories", App. C.4): with 7,186 seen Open Images classes that is ~40-60k prompt tokens a call.
With `shortlist=S>0` the prompt of query q lists instead the S candidates nearest to c by text-
embedding cosine, plus every class that c's earlier queries (0..q-1) named; `shortlist=0` is the
paper's full list. Only *this class's* earlier queries feed its shortlist, so each prompt depends
on nothing but the vocabulary, the embeddings and cached answers: reruns hit the cache exactly,
whatever the order classes are mined in.

Incremental. Given the previous crg.json (mined with the same settings), classes it already holds
are kept and only new (or renamed, or incomplete) classes are mined. Independently, every answer
is cached by (model, prompt hash, query index, sampling), so a rerun with the same inputs makes
zero API calls.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from dart_core.crg.cache import AnswerCache, MemoryCache, cache_key
from dart_core.crg.client import Completion, LLMClient, LLMError
from dart_core.crg.embed import top_k_similar
from dart_core.crg.graph import CRG, random_crg, similarity_crg
from dart_core.crg.parse import NameIndex, ParsedAnswer, parse_answer
from dart_core.crg.prompt import PROMPT_VERSION, build_messages, prompt_hash
from dart_core.crg.tokens import TokenCounter
from dart_core.interrupt import check as check_interrupt
from dart_core.vocab import Vocabulary

EmbedFn = Callable[[list[str]], np.ndarray]


class CRGMiningError(RuntimeError):
    """Mining cannot start (bad settings); the message says which."""


@dataclass
class MiningConfig:
    model: str = "gpt-4o"
    queries: int = 3  # App. A: "queried the LLM 3 times for each class"
    top_p: float = 0.3  # App. A: "a low top-p sampling value of 0.3"
    temperature: float | None = None
    max_tokens: int | None = None
    neighbors: int = 8  # App. A: N=8 (NUS-WIDE, COCO); 12 for Open Images
    shortlist: int = 200  # 0 = the paper's full candidate list
    candidates: str = "seen"  # which classes may be neighbours: "seen" (App. C.4) or "all"
    concurrency: int = 8
    batch: bool = False
    poll_interval: float = 10.0

    def sampling(self) -> dict:
        return {"top_p": self.top_p, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def settings(self) -> dict:
        """What decides the graph: a previous crg.json is reused only if these match."""
        return {"model": self.model, "queries": self.queries, "sampling": self.sampling(),
                "neighbors": self.neighbors, "shortlist": self.shortlist, "candidates": self.candidates,
                "prompt_version": PROMPT_VERSION}

    def validate(self) -> None:
        if self.queries < 1:
            raise CRGMiningError(f"--queries must be >= 1 (got {self.queries})")
        if not 0 < self.top_p <= 1:
            raise CRGMiningError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.neighbors < 1:
            raise CRGMiningError(f"--neighbors must be >= 1 (got {self.neighbors})")
        if self.shortlist < 0:
            raise CRGMiningError(f"--shortlist must be >= 0 (got {self.shortlist})")
        if self.concurrency < 1:
            raise CRGMiningError(f"--concurrency must be >= 1 (got {self.concurrency})")
        if self.candidates not in ("seen", "all"):
            raise CRGMiningError(f"candidates must be 'seen' or 'all' (got {self.candidates!r})")


# ---- aggregation ---------------------------------------------------------------------------------
def aggregate(answers: list[ParsedAnswer], n: int) -> tuple[list[str], list[float]]:
    """Top-n neighbours from the parsed answers of one class.

    Paper Sec. 3.4 ("we perform multiple queries per class and aggregate the results, typically
    averaging scores for consistently identified relationships ... select the top-N scoring
    neighbors") and App. A ("top N based on frequency or LLM confidence"): score = mean strength
    (High 3, Medium 2, Low 1) over the queries that named the neighbour; ties -> named by more
    queries; then -> named earlier (query index, position in the answer)."""
    total: dict[str, int] = {}
    freq: dict[str, int] = {}
    first: dict[str, tuple[int, int]] = {}
    for q, ans in enumerate(answers):
        for pos, (cid, strength) in enumerate(ans.entries):
            total[cid] = total.get(cid, 0) + strength
            freq[cid] = freq.get(cid, 0) + 1
            first.setdefault(cid, (q, pos))
    ranked = sorted(total, key=lambda c: (-total[c] / freq[c], -freq[c], first[c]))[:n]
    return ranked, [round(total[c] / freq[c], 4) for c in ranked]


# ---- candidates ----------------------------------------------------------------------------------
def candidate_pool(vocab: Vocabulary, candidates: str) -> np.ndarray:
    if candidates == "all":
        return np.arange(len(vocab))
    return np.flatnonzero(vocab.seen_mask)


def shortlists(vocab: Vocabulary, pool: np.ndarray, shortlist: int, embed_fn: EmbedFn | None,
               only: list[int] | None = None) -> dict[int, list[int]] | None:
    """Class index -> its S nearest candidates by text-embedding cosine (vocabulary indices, listed
    in vocabulary order so the prompt does not leak the similarity ranking); None = full list."""
    if shortlist <= 0 or shortlist >= len(pool):
        return None
    if embed_fn is None:
        raise CRGMiningError("a shortlist needs text embeddings (embed_fn); use --shortlist 0 for the full list")
    emb = np.asarray(embed_fn(list(vocab.names)), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(vocab):
        raise CRGMiningError(f"embed_fn returned shape {emb.shape} for {len(vocab)} classes")
    rows = list(range(len(vocab))) if only is None else list(only)
    return {c: sorted(near) for c, near in zip(rows, top_k_similar(emb, rows, pool, shortlist))}


def full_candidates(pool: np.ndarray, c: int) -> list[int]:
    return [int(j) for j in pool if j != c]


# ---- the miner -----------------------------------------------------------------------------------
@dataclass
class ClassState:
    idx: int
    answers: list[ParsedAnswer] = field(default_factory=list)
    named: set[int] = field(default_factory=set)
    failed: str | None = None


@dataclass
class MiningReport:
    classes_total: int = 0
    classes_reused: int = 0
    classes_mined: int = 0
    answers_cached: int = 0  # served from the cache
    answers_fetched: int = 0  # bought from the endpoint in this run
    unparseable: list[dict] = field(default_factory=list)  # {"class", "query", "key"}
    unknown_names: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    self_mentions: int = 0
    duplicates: int = 0
    missing_strength: int = 0
    failed: list[dict] = field(default_factory=list)  # {"class", "query", "error"}
    api: dict = field(default_factory=dict)


class Miner:
    def __init__(self, vocab: Vocabulary, config: MiningConfig, client: LLMClient | None,
                 cache: AnswerCache | None = None, embed_fn: EmbedFn | None = None,
                 log: Callable[[str], None] | None = None):
        config.validate()
        self.vocab, self.cfg, self.client = vocab, config, client
        self.cache = cache if cache is not None else MemoryCache()
        self.embed_fn = embed_fn
        self.log = log or (lambda s: None)
        self.pool = candidate_pool(vocab, config.candidates)
        self.pool_set = set(int(j) for j in self.pool)
        self.index_by_class: dict[int, NameIndex] = {}
        self._pool_index = NameIndex([vocab.ids[j] for j in self.pool], [vocab.names[j] for j in self.pool])
        self.report = MiningReport(classes_total=len(vocab))
        self._lock = threading.Lock()
        self._short: dict[int, list[int]] | None = None

    # the names an answer may use: the candidate pool (+ the target, so self-mentions are recognised)
    def _index_for(self, c: int) -> NameIndex:
        if c in self.pool_set:
            return self._pool_index
        idx = NameIndex([self.vocab.ids[c]], [self.vocab.names[c]])
        merged = NameIndex([], [])
        merged.exact = {**idx.exact, **self._pool_index.exact}
        merged.loose = {**idx.loose, **self._pool_index.loose}
        return merged

    def _candidates(self, st: ClassState) -> list[int]:
        if self._short is None:
            return full_candidates(self.pool, st.idx)
        return sorted(set(self._short[st.idx]) | st.named)

    def _request(self, st: ClassState, q: int) -> tuple[list[dict], str]:
        names = [self.vocab.names[j] for j in self._candidates(st)]
        msgs = build_messages(self.vocab.names[st.idx], names)
        return msgs, cache_key(self.cfg.model, prompt_hash(msgs), q, self.cfg.sampling())

    def _absorb(self, st: ClassState, q: int, key: str, rec: dict) -> None:
        cid = self.vocab.ids[st.idx]
        ans = parse_answer(rec.get("text"), self._index_for(st.idx), cid)
        st.answers.append(ans)
        st.named |= {self.vocab.index_of(n) for n, _ in ans.entries}
        with self._lock:
            r = self.report
            r.unknown_names += len(ans.unknown)
            for u in ans.unknown:
                if len(r.unknown_examples) < 20 and u not in r.unknown_examples:
                    r.unknown_examples.append(u)
            r.self_mentions += ans.self_mentions
            r.duplicates += ans.duplicates
            r.missing_strength += ans.missing_strength
            if not ans.parseable:
                r.unparseable.append({"class": cid, "query": q, "key": key})

    @staticmethod
    def _record(comp: Completion, model: str, q: int, sampling: dict, psha: str) -> dict:
        return {"model": model, "prompt_sha256": psha, "query": q, "sampling": sampling,
                "text": comp.text, "finish_reason": comp.finish_reason, "usage": comp.usage,
                "response_model": comp.response_model}

    def _fail(self, st: ClassState, q: int, err: str) -> None:
        st.failed = err
        with self._lock:
            self.report.failed.append({"class": self.vocab.ids[st.idx], "query": q, "error": err})

    # online: one class at a time per worker, its queries in order (query q's prompt needs q-1's answer)
    def _mine_online(self, st: ClassState) -> None:
        for q in range(self.cfg.queries):
            check_interrupt()  # Ctrl-C: queued classes stop here; their cached answers are reused on a rerun
            msgs, key = self._request(st, q)
            rec = self.cache.get(key)
            if rec is not None:
                with self._lock:
                    self.report.answers_cached += 1
            else:
                if self.client is None:
                    raise CRGMiningError("no LLM client configured but answers are missing from the cache")
                name = self.vocab.names[st.idx]
                try:
                    comp = self.client.complete(msgs, self.cfg.sampling(), what=f"class {name!r} query {q + 1}")
                except LLMError as e:
                    self._fail(st, q, str(e))
                    return  # later queries' prompts depend on this one: resume on the next run
                rec = self._record(comp, self.cfg.model, q, self.cfg.sampling(), prompt_hash(msgs))
                self.cache.put(key, rec)
                with self._lock:
                    self.report.answers_fetched += 1
            self._absorb(st, q, key, rec)

    # batch: rounds of one query index each (all queries at once when prompts do not depend on answers)
    def _mine_batch(self, states: list[ClassState]) -> None:
        rounds = [list(range(self.cfg.queries))] if self._short is None else [[q] for q in range(self.cfg.queries)]
        for qs in rounds:
            pending: list[tuple[ClassState, int, list[dict], str]] = []
            hits: list[tuple[ClassState, int, str, dict]] = []
            for st in states:
                if st.failed:
                    continue
                for q in qs:
                    msgs, key = self._request(st, q)
                    rec = self.cache.get(key)
                    if rec is not None:
                        hits.append((st, q, key, rec))
                    else:
                        pending.append((st, q, msgs, key))
            self.report.answers_cached += len(hits)
            results: dict[str, Completion | str] = {}
            if pending:
                if self.client is None:
                    raise CRGMiningError("no LLM client configured but answers are missing from the cache")
                uniq = {key: msgs for _, _, msgs, key in pending}
                self.log(f"batch: {len(uniq)} requests (queries {[q + 1 for q in qs]})")
                try:
                    results = self.client.run_batch([(k, m, self.cfg.sampling()) for k, m in uniq.items()],
                                                    poll_interval=self.cfg.poll_interval)
                except LLMError as e:
                    results = {k: str(e) for k in uniq}
            fetched: dict[str, dict] = {}
            for st, q, msgs, key in pending:
                res = results.get(key)
                if isinstance(res, Completion):
                    if key not in fetched:
                        fetched[key] = self._record(res, self.cfg.model, q, self.cfg.sampling(), prompt_hash(msgs))
                        self.cache.put(key, fetched[key])
                        self.report.answers_fetched += 1
                    hits.append((st, q, key, fetched[key]))
                else:
                    self._fail(st, q, str(res))
            for st, q, key, rec in sorted(hits, key=lambda h: (h[0].idx, h[1])):
                if not st.failed:
                    self._absorb(st, q, key, rec)

    def run(self, existing: CRG | None = None) -> CRG:
        V, cfg = self.vocab, self.cfg
        reuse: dict[str, tuple[list[str], list[float]]] = {}
        if existing is not None and existing.source == "llm" and existing.meta.get("settings") == cfg.settings():
            old_names = dict(zip(existing.class_ids, existing.class_names))
            incomplete = set(existing.meta.get("incomplete", []))
            ids = set(V.ids)
            for cid, nbrs in existing.neighbors.items():
                if (cid in ids and old_names.get(cid) == V.names[V.index_of(cid)] and cid not in incomplete
                        and all(n in ids for n in nbrs)):
                    reuse[cid] = (list(nbrs), list(existing.scores.get(cid, [])))
        elif existing is not None:
            self.log("existing CRG was mined with other settings (or another source): mining every class")
        todo = [c for c in range(len(V)) if V.ids[c] not in reuse]
        self.report.classes_reused = len(V) - len(todo)
        self.report.classes_mined = len(todo)
        self.log(f"{len(todo)} classes to mine, {len(reuse)} reused from the existing CRG")
        # None when shortlist is 0 or covers the whole pool: then every prompt lists all candidates
        self._short = shortlists(V, self.pool, cfg.shortlist, self.embed_fn, only=todo) if todo else None
        states = [ClassState(c) for c in todo]
        if cfg.batch:
            self._mine_batch(states)
        else:
            with ThreadPoolExecutor(max_workers=cfg.concurrency) as ex:
                for done, _ in enumerate(ex.map(self._mine_online, states), 1):
                    if done % 100 == 0 or done == len(states):
                        self.log(f"mined {done}/{len(states)} classes")
        neighbors: dict[str, list[str]] = {}
        scores: dict[str, list[float]] = {}
        incomplete = []
        for c, cid in enumerate(V.ids):
            if cid in reuse:
                neighbors[cid], scores[cid] = reuse[cid]
        for st in states:
            cid = V.ids[st.idx]
            if st.failed:
                incomplete.append(cid)
            nbrs, sc = aggregate(st.answers, cfg.neighbors)
            neighbors[cid], scores[cid] = nbrs, sc
        neighbors = {cid: neighbors[cid] for cid in V.ids}  # vocabulary order
        scores = {cid: scores[cid] for cid in V.ids}
        if self.client is not None:
            self.report.api = self.client.stats.as_dict()
        meta = {"settings": cfg.settings(), "model": cfg.model, "n_neighbors": cfg.neighbors,
                "vocab_hash": V.hash(), "incomplete": incomplete, "report": asdict(self.report)}
        return CRG(list(V.ids), list(V.names), neighbors, "llm", scores, meta)


def mine_llm(vocab: Vocabulary, config: MiningConfig, client: LLMClient | None, cache: AnswerCache | None = None,
             embed_fn: EmbedFn | None = None, existing: CRG | None = None,
             log: Callable[[str], None] | None = None) -> CRG:
    return Miner(vocab, config, client, cache, embed_fn, log).run(existing)


def build_crg(vocab: Vocabulary, source: str, config: MiningConfig, *, client: LLMClient | None = None,
              cache: AnswerCache | None = None, embed_fn: EmbedFn | None = None, existing: CRG | None = None,
              seed: int = 0, log: Callable[[str], None] | None = None) -> CRG:
    """One entry point for the three sources; all write the same crg.json format."""
    config.validate()
    pool_mask = vocab.seen_mask if config.candidates == "seen" else None
    if source == "llm":
        return mine_llm(vocab, config, client, cache, embed_fn, existing, log)
    if source == "similarity":
        if embed_fn is None:
            raise CRGMiningError("--source similarity needs text embeddings")
        return similarity_crg(vocab, embed_fn(list(vocab.names)), config.neighbors, candidate_mask=pool_mask)
    if source == "random":
        return random_crg(vocab, config.neighbors, seed, candidate_mask=pool_mask)
    raise CRGMiningError(f"unknown --source {source!r} (llm, similarity or random)")


# ---- cost estimate -------------------------------------------------------------------------------
def estimate_prompt_tokens(vocab: Vocabulary, config: MiningConfig, counter: TokenCounter,
                           embed_fn: EmbedFn | None, shortlist: int | None = None,
                           max_exact: int = 512) -> dict:
    """Prompt tokens of one mining run over `vocab` (first-query prompts; later queries of a
    shortlist run add the names earlier answers gave, typically 5-20). Counted exactly on every
    class when the vocabulary has <= max_exact classes, else on max_exact evenly spaced classes and
    scaled to the vocabulary ("sampled")."""
    S = config.shortlist if shortlist is None else shortlist
    pool = candidate_pool(vocab, config.candidates)
    C = len(vocab)
    rows = list(range(C)) if C <= max_exact else sorted(set(np.linspace(0, C - 1, max_exact).round().astype(int).tolist()))
    short = shortlists(vocab, pool, S, embed_fn, only=rows) if S > 0 else None
    counts = []
    for c in rows:
        cands = full_candidates(pool, c) if short is None else short[c]
        counts.append(counter.count(build_messages(vocab.names[c], [vocab.names[j] for j in cands])[0]["content"]))
    per_query = float(np.mean(counts))
    return {"shortlist": S, "classes": C, "counted": len(rows), "sampled": len(rows) < C,
            "counter": counter.name, "exact_counter": counter.exact, "counter_note": counter.note,
            "per_query_mean": round(per_query, 1), "per_query_max": int(max(counts)),
            "total_one_query": int(round(per_query * C)),
            "total": int(round(per_query * C * config.queries)), "queries": config.queries}
