"""The LLM side of CRG mining: chat completions with our own retry policy, and the Batch API.

We talk to OpenAI or any OpenAI-compatible endpoint through the official `openai` client, with the
client's own retries switched off (max_retries=0) so that one policy, ours, decides and counts:
  - retried: 429, 408, 409, any 5xx, timeouts, connection errors and garbled (non-JSON) bodies;
  - wait = max(Retry-After (or retry-after-ms) when the server sends one,
               exponential backoff base * 2^attempt with "equal jitter" (half fixed, half random),
               capped at max_delay);
  - not retried: other 4xx (bad request, bad key, unknown model): retrying cannot fix them.
The key is handed to the client object and nowhere else: it is not part of any record we return.
"""
from __future__ import annotations

import email.utils
import io
import json
import random
import threading
import time
from dataclasses import dataclass, field

import openai

from dart_core import interrupt


class LLMError(RuntimeError):
    """A request that failed for good (after retries, or not retryable). Never cached."""


@dataclass
class RetryPolicy:
    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    timeout: float = 120.0  # per request, seconds

    def backoff(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.max_delay, self.base_delay * (2 ** attempt))
        return cap / 2 + rng.uniform(0, cap / 2)  # equal jitter: grows exponentially, never in lockstep


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: dict
    response_model: str | None = None


@dataclass
class CallStats:
    requests: int = 0  # HTTP requests sent for completions (first tries + retries)
    retries: int = 0
    retry_reasons: dict = field(default_factory=dict)  # "429" / "500" / "timeout" / "connection" -> n
    failures: int = 0
    slept_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "retry_reasons": dict(self.retry_reasons),
                "failures": self.failures, "slept_s": round(self.slept_s, 3), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "batches": self.batches}


def retry_after_seconds(headers) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, retry-after (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class LLMClient:
    def __init__(self, base_url: str | None, api_key: str | None, model: str,
                 retry: RetryPolicy | None = None, seed: int | None = None):
        self.model = model
        self.retry = retry or RetryPolicy()
        self.stats = CallStats()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        # A local OpenAI-compatible server (vLLM, llama.cpp, ...) often needs no key, but the
        # client insists on one: send a placeholder that means "none".
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                     timeout=self.retry.timeout)

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                if k == "reason":
                    self.stats.retry_reasons[v] = self.stats.retry_reasons.get(v, 0) + 1
                else:
                    setattr(self.stats, k, getattr(self.stats, k) + v)

    def _with_retries(self, what: str, fn):
        attempt = 0
        while True:
            try:
                return fn()
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError,
                    openai.APIResponseValidationError, json.JSONDecodeError) as e:
                if isinstance(e, (openai.APIResponseValidationError, json.JSONDecodeError)):
                    reason, headers = "bad-response", None  # a truncated/garbled body: a proxy hiccup, ask again
                elif isinstance(e, openai.APITimeoutError):
                    reason, headers = "timeout", None
                elif isinstance(e, openai.APIConnectionError):
                    reason, headers = "connection", None
                else:
                    status = e.status_code
                    if not (status in (408, 409, 429) or status >= 500):
                        self._count(failures=1)
                        raise LLMError(f"{what}: HTTP {status} from the endpoint ({_short(e)}); not retried") from None
                    reason, headers = str(status), e.response.headers
                if attempt >= self.retry.max_retries:
                    self._count(failures=1)
                    raise LLMError(f"{what}: gave up after {attempt + 1} attempts (last: {reason})") from None
                wait = self.retry.backoff(attempt, self._rng)
                ra = retry_after_seconds(headers)
                if ra is not None:
                    wait = max(wait, min(ra, self.retry.max_delay * 10))  # honour the server, within reason
                self._count(retries=1, reason=reason, slept_s=wait)
                interrupt.sleep(wait)
                attempt += 1

    # ---- online ---------------------------------------------------------------
    def complete(self, messages: list[dict], sampling: dict, what: str = "completion") -> Completion:
        def call():
            self._count(requests=1)
            return self._client.chat.completions.create(model=self.model, messages=messages,
                                                        **_sampling_kwargs(sampling))
        resp = self._with_retries(what, call)
        return _completion_from(resp.model_dump() if hasattr(resp, "model_dump") else resp, self)

    # ---- batch ----------------------------------------------------------------
    def run_batch(self, requests: list[tuple[str, list[dict], dict]], poll_interval: float = 10.0,
                  max_wait: float = 26 * 3600) -> dict[str, Completion | str]:
        """Send [(custom_id, messages, sampling)] through the Batch API; wait; return custom_id ->
        Completion, or -> an error string for requests that failed inside the batch."""
        lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": self.model, "messages": msgs, **_sampling_kwargs(sampling)}},
                            ensure_ascii=False)
                 for cid, msgs, sampling in requests]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        f = self._with_retries("batch upload", lambda: self._client.files.create(
            file=("crg_requests.jsonl", io.BytesIO(data), "application/jsonl"), purpose="batch"))
        batch = self._with_retries("batch create", lambda: self._client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"purpose": "dart crg mining"}))
        self._count(batches=1)
        deadline = time.time() + max_wait
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            if time.time() > deadline:
                raise LLMError(f"batch {batch.id}: still {batch.status} after {max_wait:.0f}s")
            interrupt.sleep(poll_interval)
            batch = self._with_retries("batch poll", lambda: self._client.batches.retrieve(batch.id))
        results: dict[str, Completion | str] = {}
        if batch.status != "completed" and not batch.output_file_id:
            errs = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data or [])) if batch.errors else ""
            raise LLMError(f"batch {batch.id} {batch.status}" + (f" ({errs})" if errs else ""))
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = self._with_retries("batch download", lambda: self._client.files.content(file_id)).text
            for line in text.splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                cid = row.get("custom_id")
                resp = row.get("response") or {}
                if resp.get("status_code") == 200 and not row.get("error"):
                    results[cid] = _completion_from(resp.get("body") or {}, self)
                else:
                    err = row.get("error") or (resp.get("body") or {}).get("error") or {}
                    results[cid] = f"HTTP {resp.get('status_code')}: {err.get('message', err) if isinstance(err, dict) else err}"
        for cid, _, _ in requests:
            results.setdefault(cid, f"missing from batch {batch.id} output ({batch.status})")
        return results


def _sampling_kwargs(sampling: dict) -> dict:
    return {k: v for k, v in sampling.items() if v is not None}


def _completion_from(body: dict, client: LLMClient) -> Completion:
    choices = body.get("choices") or [{}]
    msg = choices[0].get("message") or {}
    usage = body.get("usage") or {}
    usage = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if usage.get(k) is not None}
    client._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                  completion_tokens=int(usage.get("completion_tokens") or 0))
    return Completion(msg.get("content") or "", choices[0].get("finish_reason"), usage, body.get("model"))


def _short(e: Exception) -> str:
    s = str(e)
    return s if len(s) < 200 else s[:200] + "..."
