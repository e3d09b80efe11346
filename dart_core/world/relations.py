"""The relations the world's rules put between its classes, as a CRG: a stand-in, in this offline
world, for what an LLM knows about real classes (the paper's "LLM" row of Tab. 6).

The generator's rules create hierarchy (a star is spiky), parts (a snowman is white circles),
and co-occurrence (snowmen in winter, no yellow on the beach). An LLM asked about real classes
answers from such knowledge; here it is measured instead: each class's neighbours are the classes
with the highest lift P(a, b) / (P(a) P(b)) > 1 over the labels of images drawn from their own
stream ("relations", neither the VLP's nor the dataset's). Like the LLM miner (App. C.4), the
neighbours are seen classes by default.
"""
from __future__ import annotations

import numpy as np

from dart_core.crg.graph import CRG
from dart_core.world import generator as G


def label_matrix(n_images: int, seed: int = 0) -> np.ndarray:
    """(n_images, C) 0/1 labels in G.CLASS_NAMES order, from the "relations" stream."""
    y = np.zeros((n_images, len(G.CLASS_NAMES)), dtype=np.float64)
    for r, s in enumerate(G.generate(n_images, seed, stream="relations")):
        y[r] = [s.labels[c] == 1 for c in G.CLASS_NAMES]
    return y


def world_crg(n_images: int = 4000, seed: int = 0, n_neighbors: int = 8, seen_only: bool = True) -> CRG:
    vocab = G.vocabulary()
    y = label_matrix(n_images, seed)
    p = y.mean(axis=0)
    joint = (y.T @ y) / n_images
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = joint / np.outer(p, p)
    lift[~np.isfinite(lift)] = 0.0
    np.fill_diagonal(lift, 0.0)
    allowed = ~vocab.unseen_mask if seen_only else np.ones(len(vocab), bool)
    lift[:, ~allowed] = 0.0
    neighbors, scores = {}, {}
    for c, cid in enumerate(vocab.ids):
        order = np.argsort(-lift[c], kind="stable")
        row = [j for j in order[:n_neighbors] if lift[c, j] > 1.0]
        neighbors[cid] = [vocab.ids[j] for j in row]
        scores[cid] = [round(float(lift[c, j]), 4) for j in row]
    return CRG(list(vocab.ids), list(vocab.names), neighbors, "world", scores,
               {"n_neighbors": n_neighbors, "n_images": n_images, "seed": seed, "measure": "lift",
                "seen_only": seen_only})
