"""CRG mining against a real HTTP server on loopback, through the real openai client.

Exact edges from scripted answers, retry counts and Retry-After, failures never cached, zero
calls on rerun, incremental mining, batch mode, the shortlist and its token counts, S3 cache.
"""
from __future__ import annotations

import json
import time


from dart_core.crg.cache import StorageCache
from dart_core.crg.client import LLMClient, RetryPolicy
from dart_core.crg.embed import hashed_embed
from dart_core.crg.mine import MiningConfig, estimate_prompt_tokens, mine_llm
from dart_core.crg.prompt import build_messages
from dart_core.crg.tokens import approx_counter
from dart_core.vocab import Vocabulary
from tests.openai_stub import OpenAIStub, answer

SEEN = ["dog", "cat", "leash", "bone", "kennel", "car", "wheel", "road"]
UNSEEN = ["puppy", "truck"]
KEY = "sk-test-SECRET-d0g-k3y"

DOG_Q2_MESSY = """Sure! Here are the related categories for dog.

**Related Category 1: Leashes**
* **Type of Relationship:** Functional Relationship
* **Association Strength:** **High**
* **Explanation:** walks.

### Related category #2 - KENNEL
- Association strength: medium

3) **Unicorn**
- **Association Strength:** High

Related Category 4: Cats
- Association Strength: Medium

Related Category 5: leash
- **Association Strength:** Low

I hope this helps!"""
DOG_Q3_MALFORMED = "I'm sorry, but I can't list categories right now."


def vocab(extra_seen=(), extra_unseen=()):
    seen, unseen = SEEN + list(extra_seen), UNSEEN + list(extra_unseen)
    return Vocabulary.from_names(seen + unseen, unseen=set(unseen))


def script(stub: OpenAIStub) -> None:
    stub.answers["dog"] = [answer(("leash", "High"), ("bone", "Medium"), ("cat", "Medium")), DOG_Q2_MESSY,
                           DOG_Q3_MALFORMED]
    stub.answers["car"] = [answer(("wheel", "High"), ("road", "High")), answer(("road", "High"), ("wheel", "Medium")),
                           answer(("wheel", "High"), ("road", "Low"), ("truck", "High"))]
    stub.answers["puppy"] = [answer(("dog", "High"), ("puppy", "High"), ("Dogs", "Medium"), ("bone", "Low"))]


EXPECTED = {
    # leash (3+3)/2 ; cat (2+2)/2 named twice beats bone 2/1 and kennel 2/1 ; bone named before kennel
    "dog": (["leash", "cat", "bone", "kennel"], [3.0, 2.0, 2.0, 2.0]),
    # wheel (3+2+3)/3 vs road (3+3+1)/3 ; truck is unseen: not a candidate, dropped
    "car": (["wheel", "road"], [2.6667, 2.3333]),
    # the same answer thrice: dog (High, "Dogs" merged), bone; "puppy" itself dropped
    "puppy": (["dog", "bone"], [3.0, 1.0]),
}


def client(stub, **kw):
    return LLMClient(stub.base_url, KEY, "gpt-4o", RetryPolicy(**{"max_retries": 4, "base_delay": 0.01, "timeout": 5.0, **kw}))


def cfg(**kw):
    return MiningConfig(**{"shortlist": 0, "neighbors": 4, "concurrency": 4, "poll_interval": 0.02, **kw})


def check_expected(crg, others=()):
    for cid, (nbrs, scores) in EXPECTED.items():
        assert crg.neighbors[cid] == nbrs, cid
        assert crg.scores[cid] == scores, cid
    # the other classes' answers ("no related categories") give no edges
    assert all(crg.neighbors[c] == [] for c in crg.class_ids if c not in EXPECTED and c not in others)


def test_exact_edges_report_and_cache(tmp_path):
    with OpenAIStub() as stub:
        script(stub)
        c = client(stub)
        crg = mine_llm(vocab(), cfg(), c, StorageCache(tmp_path / "cache"))
        check_expected(crg)
        assert stub.chat_calls() == 10 * 3
        # every request carried the key, top_p 0.3 and the full candidate list (seen classes only)
        assert {r["authorization"] for r in stub.log} == {f"Bearer {KEY}"}
        assert {r["top_p"] for r in stub.log} == {0.3}
        dog_req = stub.chat_requests("dog")[0]
        assert dog_req["candidates"] == [n for n in SEEN if n != "dog"]
        assert stub.chat_requests("truck")[0]["candidates"] == SEEN
    rep = crg.meta["report"]
    assert rep["unparseable"] == [{"class": "dog", "query": 2, "key": rep["unparseable"][0]["key"]}]
    assert rep["unknown_names"] == 2  # "Unicorn" (dog, 2nd answer) and "truck" (car, 3rd: unseen, not a candidate)
    assert rep["duplicates"] == 1 + 3 and rep["self_mentions"] == 3  # leash twice; puppy's "Dogs" and "puppy" x3
    assert rep["answers_fetched"] == 30 and rep["answers_cached"] == 0
    assert rep["api"]["requests"] == 30 and rep["api"]["retries"] == 0
    # the unparseable answer is cached raw
    rec = StorageCache(tmp_path / "cache").get(rep["unparseable"][0]["key"])
    assert rec["text"] == DOG_Q3_MALFORMED and rec["query"] == 2 and rec["model"] == "gpt-4o"
    # the key is nowhere in the cache or the graph
    blobs = [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert len(blobs) == 30 and not any(KEY in b for b in blobs)
    assert KEY not in json.dumps(crg.to_json())


def test_retries_honour_retry_after_and_count(tmp_path):
    with OpenAIStub(retry_after="1", slow_s=2.0) as stub:
        script(stub)
        stub.faults["car"] = ["429", "500", "slow"]
        stub.faults["road"] = ["badjson"]
        c = client(stub, timeout=0.8)
        crg = mine_llm(vocab(), cfg(), c, StorageCache(tmp_path / "cache"))
        check_expected(crg)
        car = stub.chat_requests("car")
        assert len(car) == 3 + 3  # three queries, three retries
        assert len(stub.chat_requests("road")) == 3 + 1
        assert c.stats.retries == 4
        assert c.stats.retry_reasons == {"429": 1, "500": 1, "timeout": 1, "bad-response": 1}
        assert c.stats.requests == 34 and c.stats.failures == 0
        # the retry after the 429 waited for Retry-After (1 s), the one after the 500 only the tiny backoff
        assert car[1]["time"] - car[0]["time"] >= 1.0
        assert car[2]["time"] - car[1]["time"] < 0.5


def test_failures_never_cached_then_resumed(tmp_path):
    out = None
    with OpenAIStub() as stub:
        script(stub)
        stub.faults["wheel"] = ["500"] * 3 + ["503"]  # max_retries=2: 3 attempts fail, the class is incomplete
        stub.faults["road"] = ["400"]  # not retryable
        c = client(stub, max_retries=2)
        crg = mine_llm(vocab(), cfg(), c, StorageCache(tmp_path / "cache"))
        check_expected(crg)
        assert sorted(crg.meta["incomplete"]) == ["road", "wheel"]
        assert len(stub.chat_requests("wheel")) == 3 and len(stub.chat_requests("road")) == 1
        assert c.stats.failures == 2 and c.stats.retries == 2
        failed = {f["class"]: f for f in crg.meta["report"]["failed"]}
        assert failed["wheel"]["query"] == 0 and "gave up after 3 attempts" in failed["wheel"]["error"]
        assert "HTTP 400" in failed["road"]["error"]
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 30 - 6  # nothing for wheel/road
        # rerun on top of the previous graph: only the incomplete classes are asked again
        stub.reset_log()
        crg2 = mine_llm(vocab(), cfg(), client(stub), StorageCache(tmp_path / "cache"), existing=crg)
        assert {r["target"] for r in stub.log} == {"wheel", "road"}
        assert len(stub.chat_requests("wheel")) == 3 + 1  # the leftover 503 is retried once
        assert len(stub.chat_requests("road")) == 3
        assert crg2.meta["incomplete"] == [] and crg2.meta["report"]["classes_reused"] == 8
        check_expected(crg2)


def test_rerun_zero_calls_and_incremental(tmp_path):
    with OpenAIStub() as stub:
        script(stub)
        cache = StorageCache(tmp_path / "cache")
        crg = mine_llm(vocab(), cfg(), client(stub), cache)
        assert stub.chat_calls() == 30
        # same inputs, no previous graph: every answer comes from the cache
        stub.reset_log()
        again = mine_llm(vocab(), cfg(), client(stub), cache)
        assert stub.chat_calls() == 0 and again.meta["report"]["answers_cached"] == 30
        assert again.neighbors == crg.neighbors and again.scores == crg.scores
        # with the previous graph: nothing mined at all
        again2 = mine_llm(vocab(), cfg(), client(stub), cache, existing=crg)
        assert stub.chat_calls() == 0 and again2.meta["report"]["classes_reused"] == 10
        # a bigger vocabulary: only the new classes are asked (the seen list grew, old prompts would differ)
        stub.answers["collar"] = [answer(("leash", "High"), ("dog", "High"))]
        bigger = vocab(extra_seen=["collar"], extra_unseen=["wolf"])
        crg3 = mine_llm(bigger, cfg(), client(stub), cache, existing=crg)
        assert {r["target"] for r in stub.log} == {"collar", "wolf"} and stub.chat_calls() == 6
        assert crg3.neighbors["collar"] == ["leash", "dog"]
        assert crg3.meta["report"]["classes_mined"] == 2 and crg3.meta["report"]["classes_reused"] == 10
        check_expected(crg3, others={"collar"})
        # other settings (N=2): the previous graph is not reused, but the answers still are
        stub.reset_log()
        crg4 = mine_llm(vocab(), cfg(neighbors=2), client(stub), cache, existing=crg)
        assert stub.chat_calls() == 0 and crg4.neighbors["dog"] == ["leash", "cat"]


def test_batch_mode_same_edges(tmp_path):
    with OpenAIStub(batch_polls=2) as stub:
        script(stub)
        stub.faults["kennel"] = ["500"]  # fails inside the batch: reported, not cached
        c = client(stub)
        crg = mine_llm(vocab(), cfg(batch=True), c, StorageCache(tmp_path / "cache"))
        check_expected(crg)
        assert stub.chat_calls() == 0 and stub.batch_lines() == 30
        assert stub.calls("/v1/files") == 1 + 2  # upload; download output + error files
        assert c.stats.batches == 1
        assert crg.meta["incomplete"] == ["kennel"]
        # with the full list the three queries are independent: kennel's 2nd and 3rd answers are cached
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 29
        # rerun: only kennel is mined, and only its failed query is asked
        stub.reset_log()
        crg2 = mine_llm(vocab(), cfg(batch=True), client(stub), StorageCache(tmp_path / "cache"), existing=crg)
        assert stub.batch_lines() == 1 and {r["target"] for r in stub.log if r["target"]} == {"kennel"}
        assert crg2.meta["incomplete"] == []


def test_shortlist_candidates_and_token_counts(tmp_path):
    v = vocab()
    with OpenAIStub() as stub:
        script(stub)
        # dog's first answer names "wheel" (not among its 3 nearest): later queries must list it
        stub.answers["dog"] = [answer(("leash", "High"), ("wheel", "Low")), answer(("leash", "High"))]
        conf = cfg(shortlist=3)
        crg = mine_llm(v, conf, client(stub), StorageCache(tmp_path / "c"), embed_fn=hashed_embed)
        dog = stub.chat_requests("dog")
        assert len(dog[0]["candidates"]) == 3 and "wheel" not in dog[0]["candidates"]
        assert set(dog[1]["candidates"]) == set(dog[0]["candidates"]) | {"wheel", "leash"} - {"dog"}
        assert dog[2]["candidates"] == dog[1]["candidates"]
        assert crg.neighbors["dog"] == ["leash", "wheel"]
        assert all(len(stub.chat_requests(n)[0]["candidates"]) == 3 for n in v.names)
        counter = approx_counter()
        est = estimate_prompt_tokens(v, conf, counter, hashed_embed)
        first = [stub.chat_requests(n)[0]["prompt"] for n in v.names]
        # the estimate counts exactly the first-query prompts that were sent, x 3 queries
        assert est["total"] == 3 * sum(counter.count(p) for p in first)
        assert est["counted"] == 10 and not est["sampled"] and est["shortlist"] == 3
    full = estimate_prompt_tokens(v, conf, counter, None, shortlist=0)
    expect_full = sum(counter.count(build_messages(n, [s for s in SEEN if s != n])[0]["content"]) for n in v.names)
    assert full["total"] == 3 * expect_full and full["total"] > est["total"]


def test_answer_cache_on_s3(s3_bucket, tmp_path):
    from flows.crg import make_cache
    from dart_core import storage

    url = f"s3://{s3_bucket}/crg-cache"
    with OpenAIStub() as stub:
        script(stub)
        crg = mine_llm(vocab(), cfg(), client(stub), make_cache(url))
        check_expected(crg)
        keys = storage.list_objects(url)
        assert len(keys) == 30 and all(k.key.endswith(".json") for k in keys)
        assert not any(KEY.encode() in storage.read_bytes(k.url) for k in keys)
        stub.reset_log()
        again = mine_llm(vocab(), cfg(), client(stub), make_cache(url))
        assert stub.chat_calls() == 0 and again.neighbors == crg.neighbors


def test_batch_with_shortlist_runs_one_round_per_query(tmp_path):
    # query q's shortlist holds what queries < q named, so each query index is its own batch
    with OpenAIStub(batch_polls=1) as stub:
        script(stub)
        c = client(stub)
        crg = mine_llm(vocab(), cfg(batch=True, shortlist=3), c, StorageCache(tmp_path / "c"), embed_fn=hashed_embed)
        assert c.stats.batches == 3 and stub.batch_lines() == 30 and stub.calls("/v1/batches") >= 3 + 3
        online = mine_llm(vocab(), cfg(shortlist=3), c, StorageCache(tmp_path / "c"), embed_fn=hashed_embed)
        assert stub.chat_calls() == 0  # same prompts: the batch answers serve the online run
        assert online.neighbors == crg.neighbors


def test_concurrency_is_bounded(tmp_path):
    with OpenAIStub() as stub:
        script(stub)
        stub.delay = 0.05
        crg = mine_llm(vocab(), cfg(concurrency=3), client(stub), StorageCache(tmp_path / "c"))
        assert stub.max_in_flight == 3 and stub.chat_calls() == 30
        check_expected(crg)
