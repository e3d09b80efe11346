"""Evaluation metrics (paper App. B; docs/annotate.md). NumPy in; labels in {1, -1, 0 (unknown)}.

Unknown labels (0) are masked out of every metric: they are neither positives nor negatives.
ZSL = restricted to the unseen classes, GZSL = all classes.
"""
from __future__ import annotations

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same (N, C) shape")
    bad = ~np.isin(labels, (-1, 0, 1))
    if bad.any():
        n, c = np.argwhere(bad)[0]
        raise ValueError(f"label at row {n}, class {c} is {labels[n, c]!r}; labels must be -1, 0 or 1")
    return scores, labels


def ranked_known(scores: np.ndarray, labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Class c's known-label images ranked by score (stable: ties keep image order):
    (sorted scores, positive flags in that order, number of positives)."""
    known = labels[:, c] != 0
    s, y = scores[known, c], labels[known, c] == 1
    order = np.argsort(-s, kind="stable")
    return s[order], y[order], int(y.sum())


def average_precision(scores, labels, empty_as_zero: bool = False) -> np.ndarray:
    """(C,) AP per class (B.1): the mean over positives of the precision at that positive's rank,
    ranking only the images whose label for the class is known; no interpolation. Ties are broken
    by image order (a stable sort). NaN for a class with no positive, or 0 with `empty_as_zero`
    (the legacy convention)."""
    scores, labels = _check(scores, labels)
    N, C = scores.shape
    ap = np.full(C, 0.0 if empty_as_zero else np.nan)
    for c in range(C):
        _, hits, n_pos = ranked_known(scores, labels, c)
        if n_pos == 0:
            continue
        ranks = np.flatnonzero(hits) + 1  # 1-based rank of each positive
        precision_at_hits = np.arange(1, n_pos + 1) / ranks
        ap[c] = precision_at_hits.mean()
    return ap


def mean_average_precision(scores, labels, empty_as_zero: bool = False) -> float:
    """Mean of the per-class APs (B.2) over classes with at least one positive (all classes under
    `empty_as_zero`). NaN when no class has a positive."""
    ap = average_precision(scores, labels, empty_as_zero)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def precision_recall_f1_at_k(scores, labels, k: int) -> tuple[float, float, float]:
    """Micro P/R/F1 over every image's top-k classes (B.3-B.4): TP = positives in the top-k,
    P = TP / (N·k), R = TP / #positives, F1 = 2PR / (P+R) (0 when P+R = 0). Every image counts."""
    scores, labels = _check(scores, labels)
    N, C = scores.shape
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(k, C)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    tp = int((np.take_along_axis(labels, top, axis=1) == 1).sum())
    n_pos = int((labels == 1).sum())
    p = tp / (N * k) if N else 0.0
    r = tp / n_pos if n_pos else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def evaluate(scores, labels, unseen_mask, ks=(3, 5), empty_as_zero: bool = False) -> dict[str, dict[str, float]]:
    """ZSL (unseen classes only) and GZSL (all classes): mAP and P/R/F1@k, as fractions."""
    scores, labels = _check(scores, labels)
    unseen_mask = np.asarray(unseen_mask, dtype=bool)
    out = {}
    for setting, cols in (("zsl", unseen_mask), ("gzsl", np.ones_like(unseen_mask))):
        if not cols.any():
            continue
        s, y = scores[:, cols], labels[:, cols]
        row = {"mAP": mean_average_precision(s, y, empty_as_zero)}
        for k in ks:
            p, r, f1 = precision_recall_f1_at_k(s, y, k)
            row.update({f"P@{k}": p, f"R@{k}": r, f"F1@{k}": f1})
        out[setting] = row
    return out
