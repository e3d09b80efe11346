"""The Class Relationship Graph (paper Sec. 3.4, App. C.4): `crg.json` and the `edge_index` the ATM uses.

crg.json (version 1):
    {"version": 1,
     "source": "llm" | "similarity" | "random" | "file",
     "classes": [{"id": ..., "name": ...}, ...],          # vocabulary order
     "neighbors": {"<class id>": ["<class id>", ...]},     # top-N, best first, no self
     "scores": {"<class id>": [float, ...]},               # optional, aligned with neighbors
     "meta": {...}}                                        # model, N, counts, ... (never secrets)

The graph is unweighted (the paper's CRG has no edge weights); edges point neighbour -> class so
that GATv2 aggregates each class's neighbours into it, and every class gets a self-loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dart_core.vocab import Vocabulary


class CRGError(ValueError):
    """A crg.json that does not fit the vocabulary; the message names the offending class."""


@dataclass
class CRG:
    class_ids: list[str]
    class_names: list[str]
    neighbors: dict[str, list[str]]
    source: str = "file"
    scores: dict[str, list[float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- io ---------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> "CRG":
        """A crg.json, local or s3:// (dart_core.storage)."""
        from dart_core import storage

        path = storage.join(path)
        try:
            doc = json.loads(storage.read_bytes(path).decode("utf-8"))
        except FileNotFoundError:
            raise CRGError(f"{path}: CRG file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CRGError(f"{path}: not valid JSON ({e})") from None
        for key in ("classes", "neighbors"):
            if key not in doc:
                raise CRGError(f"{path}: missing key {key!r}")
        classes = doc["classes"]
        ids = [str(c["id"]) for c in classes]
        names = [str(c.get("name", c["id"])) for c in classes]
        known = set(ids)
        neighbors: dict[str, list[str]] = {}
        for cid, nbrs in doc["neighbors"].items():
            if cid not in known:
                raise CRGError(f"{path}: neighbors given for unknown class {cid!r}")
            for n in nbrs:
                if n not in known:
                    raise CRGError(f"{path}: class {cid!r} names unknown neighbour {n!r}")
            neighbors[cid] = list(nbrs)
        return cls(ids, names, neighbors, doc.get("source", "file"), doc.get("scores", {}), doc.get("meta", {}))

    def to_json(self) -> dict:
        return {"version": 1, "source": self.source,
                "classes": [{"id": i, "name": n} for i, n in zip(self.class_ids, self.class_names)],
                "neighbors": self.neighbors, "scores": self.scores, "meta": self.meta}

    def write(self, path: str | Path) -> None:
        """Atomically (temp + rename locally; one PUT on s3://)."""
        from dart_core import storage

        storage.write_bytes(path, json.dumps(self.to_json(), indent=1, ensure_ascii=False).encode("utf-8"))

    # ---- graph ------------------------------------------------------------
    def edge_index(self, vocab: Vocabulary) -> torch.Tensor:
        """(2, E) long tensor over `vocab`'s class indices: neighbour -> class edges plus self-loops.

        Every neighbour must be in `vocab`; a vocabulary class the CRG does not know gets only
        its self-loop (so a class added at inference time without edges still works)."""
        index = {cid: i for i, cid in enumerate(vocab.ids)}
        src, dst = [], []
        for cid, nbrs in self.neighbors.items():
            if cid not in index:
                continue  # a class of the CRG that this vocabulary does not use
            for n in nbrs:
                if n not in index:
                    raise CRGError(f"CRG edge {n!r} -> {cid!r}: class {n!r} is not in the vocabulary")
                if n != cid:
                    src.append(index[n])
                    dst.append(index[cid])
        loops = list(range(len(vocab)))
        ei = torch.tensor([src + loops, dst + loops], dtype=torch.long)
        return torch.unique(ei, dim=1)  # drop duplicate edges


def similarity_crg(vocab: Vocabulary, text_embeddings: np.ndarray, n_neighbors: int = 8,
                   candidate_mask: np.ndarray | None = None) -> CRG:
    """Top-N neighbours by cosine of text embeddings (the paper's "Sim." row of Tab. 6).

    `candidate_mask` (bool, per class) limits which classes may be neighbours (the LLM miner's
    default is the seen classes, App. C.4); None = any class."""
    emb = np.asarray(text_embeddings, dtype=np.float32)
    if emb.shape[0] != len(vocab):
        raise CRGError(f"{emb.shape[0]} text embeddings for {len(vocab)} classes")
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    allowed = np.ones(len(vocab), dtype=bool) if candidate_mask is None else np.asarray(candidate_mask, dtype=bool)
    sim[:, ~allowed] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")
    neighbors, scores = {}, {}
    for c in range(len(vocab)):
        row = [j for j in order[c][:n_neighbors + 1] if np.isfinite(sim[c, j])][:n_neighbors]
        neighbors[vocab.ids[c]] = [vocab.ids[j] for j in row]
        scores[vocab.ids[c]] = [float(sim[c, j]) for j in row]
    n = min(n_neighbors, max(int(allowed.sum()) - 1, 0)) if candidate_mask is not None else min(n_neighbors, len(vocab) - 1)
    return CRG(list(vocab.ids), list(vocab.names), neighbors, "similarity", scores, {"n_neighbors": n})


def random_crg(vocab: Vocabulary, n_neighbors: int = 8, seed: int = 0,
               candidate_mask: np.ndarray | None = None) -> CRG:
    """N uniformly random neighbours per class (the "Rand." ablation of Tab. 6)."""
    rng = np.random.default_rng(seed)
    C = len(vocab)
    allowed = np.ones(C, dtype=bool) if candidate_mask is None else np.asarray(candidate_mask, dtype=bool)
    neighbors = {}
    n = min(n_neighbors, C - 1)
    for c in range(C):
        others = np.flatnonzero(allowed & (np.arange(C) != c))
        k = min(n_neighbors, len(others))
        neighbors[vocab.ids[c]] = [vocab.ids[j] for j in rng.choice(others, size=k, replace=False)] if k else []
    return CRG(list(vocab.ids), list(vocab.names), neighbors, "random", {}, {"n_neighbors": n, "seed": seed})
