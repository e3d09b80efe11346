"""Text embedders for the shortlist and the similarity CRG: `embed_fn(names) -> (C, D) float array`.

The production embedder is CLIP's text tower (dart_core.backbone.FrozenBackbone.text_embeddings),
wired in flows/. `hashed_embed` is a deterministic, weight-free stand-in: a hashed bag of words and
character trigrams. It is *lexical* ("hot dog" is near "dog", not near "sausage"), so it is only
for tests and for machines without CLIP weights (`--backbone hash`), where it is named as such.
"""
from __future__ import annotations

import hashlib

import numpy as np

from dart_core.crg.parse import normalize, singular


def hashed_embed(names: list[str], dim: int = 256) -> np.ndarray:
    out = np.zeros((len(names), dim), dtype=np.float32)
    for i, name in enumerate(names):
        words = singular(normalize(name)).split()
        feats = [f"w:{w}" for w in words] + [f"t:{w[j:j + 3]}" for w in words for j in range(max(1, len(w) - 2))]
        for f in feats:
            h = hashlib.blake2b(f.encode(), digest_size=8).digest()
            idx = int.from_bytes(h[:4], "little") % dim
            sign = 1.0 if h[4] & 1 else -1.0
            out[i, idx] += sign * (2.0 if f.startswith("w:") else 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.clip(norms, 1e-12, None)


def top_k_similar(emb: np.ndarray, rows: list[int], pool: np.ndarray, k: int, chunk: int = 1024) -> list[list[int]]:
    """For each vocabulary index c in `rows`, the vocabulary indices of the k classes of `pool`
    most cosine-similar to c (by the rows of `emb`, one per vocabulary class), c itself excluded;
    most similar first, ties by index."""
    emb = np.asarray(emb, dtype=np.float32)
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    pool = np.asarray(pool, dtype=np.int64)
    P = emb[pool]
    out: list[list[int]] = []
    for start in range(0, len(rows), chunk):  # chunks: a 7,586 x 7,586 matrix at once is 230 MB
        block = list(rows[start:start + chunk])
        sim = emb[block] @ P.T
        for r, c in enumerate(block):
            row = sim[r].astype(np.float64)
            row[pool == c] = -np.inf
            kk = min(k, len(pool) - int((pool == c).any()))
            if kk <= 0:
                out.append([])
                continue
            part = np.argpartition(-row, kk - 1)[:kk] if kk < len(row) else np.arange(len(row))
            out.append([int(pool[j]) for j in sorted(part, key=lambda j: (-row[j], pool[j]))])
    return out
