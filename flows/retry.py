"""Which task failures Prefect may retry: transient faults only.

A retry helps when the same call can succeed a moment later: a dropped connection, a timeout,
S3 answering 5xx or "slow down", an LLM endpoint answering 429 or 5xx. It cannot fix a missing
file, a malformed CSV or a checkpoint that does not fit, and retrying those only repeats the
error (and its log) after a delay. Tasks that declare `retries` pass
`retry_condition_fn=retry_if_transient`.
"""
from __future__ import annotations

# S3 error codes that mean "try again" (botocore's standard retry mode retries the same ones)
S3_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                      "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded"}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):  # socket-level, any client
        return True
    module = type(exc).__module__ or ""
    if module.startswith("botocore"):
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # endpoint unreachable, read timeout, reset
            return True
        if isinstance(exc, ClientError):
            meta = exc.response.get("ResponseMetadata", {})
            code = exc.response.get("Error", {}).get("Code", "")
            return meta.get("HTTPStatusCode", 0) >= 500 or code in S3_TRANSIENT_CODES
        return False
    if module.startswith("openai"):
        import openai

        if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code == 429 or exc.status_code >= 500
        return False
    if module.startswith("httpx"):
        import httpx

        return isinstance(exc, httpx.TransportError)
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run only when its exception is transient."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)
