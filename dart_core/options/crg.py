"""Options of `dart crg mine` (flow `mine_crg`, flows/crg.py)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from dart_core.options._fields import Cli, Options, positive, share


class MineOptions(Options):
    """One CRG mining run. It holds no secret: the API key is resolved inside the flow's task, from
    $OPENAI_API_KEY or the Prefect Secret block named by `api_key_block`."""

    classes: str = Field(description="classes.csv (id,name,split), local or s3://")
    out: str = Field(description="crg.json to write (an existing one is extended incrementally)")
    source: Literal["llm", "similarity", "random"] = Field(
        "llm", description="who names each class's neighbours (similarity: text embeddings; random: a control)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (default: OpenAI, or $OPENAI_BASE_URL)")
    model: str = Field("gpt-4o", description="chat model name")
    queries: int = Field(3, ge=1, description="queries per class (paper: 3)")
    top_p: Annotated[float, AfterValidator(share)] = Field(0.3, description="nucleus sampling (paper: 0.3)")
    neighbors: int = Field(8, ge=1, description="top-N neighbours per class (paper: 8; Open Images 12)")
    shortlist: int = Field(200, ge=0, description="candidates per prompt by text-embedding similarity; 0 = all seen "
                                                  "classes (paper)")
    cache: str | None = Field(None, description="answer cache dir, local or s3:// (default "
                                                "~/.cache/dart-annotate/crg-answers)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    # no --no-batch: the flag is off unless given
    batch: Annotated[bool, Cli("--batch")] = Field(False, description="use the OpenAI Batch API (cheaper, slower)")
    backbone: str = Field("ViT-B-16", description="open_clip model for text embeddings ('hash' = weight-free lexical "
                                                  "stand-in)")
    pretrained: str = Field("openai", description="open_clip pretrained tag or checkpoint file")
    poll_interval: Annotated[float, AfterValidator(positive)] = Field(
        10.0, description="seconds between batch status polls")
    retry_base_delay: float = Field(1.0, ge=0, description="first backoff step in seconds (doubles per retry, "
                                                           "jittered)")
    request_timeout: Annotated[float, AfterValidator(positive)] = Field(
        120.0, description="seconds before a request is retried as timed out")
    api_key_block: Annotated[str | None, Cli(hidden=True)] = Field(
        None, description="name of a Prefect Secret block holding the API key (read when $OPENAI_API_KEY is unset)")
    max_retries: Annotated[int, Cli(hidden=True)] = Field(
        6, ge=0, description="retries of a failed request before its class is left incomplete (a rerun retries it)")
    estimate: Annotated[bool, Cli(hidden=True)] = Field(
        True, description="log the prompt-token estimate for both shortlist modes before mining")
