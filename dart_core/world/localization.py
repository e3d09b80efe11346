"""The localization metric of the embedded world: for each positive (image, class) pair that has
boxes, is the class's top-scoring patch inside one of that class's boxes?

A patch counts as inside a box when its centre is: patch (r, c) of a gh×gw grid over a W×H image
has centre ((c + 0.5)·W/gw, (r + 0.5)·H/gh), and box (x0, y0, x1, y1) (x1, y1 exclusive, as written
in boxes.jsonl) holds it when x0 <= cx < x1 and y0 <= cy < y1. Classes without boxes in an image
(scene classes) are not counted. Patches are in row-major order, as in the ViT's token sequence.
"""
from __future__ import annotations

import numpy as np


def patch_centres(grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(P, 2) centres (x, y) in pixels of the row-major patch grid (gh, gw) over a (W, H) image."""
    gh, gw = grid
    W, H = image_size
    r, c = np.divmod(np.arange(gh * gw), gw)
    return np.stack([(c + 0.5) * W / gw, (r + 0.5) * H / gh], axis=1)


def localization_counts(patch_scores, grid: tuple[int, int], boxes: list[list[dict]],
                        class_ids: list[str], image_sizes, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (hits, pairs). `patch_scores` (N, P, C); `boxes[n]` the objects of image n as
    in boxes.jsonl ({"box": [x0, y0, x1, y1], "classes": [...]}); `image_sizes` one (W, H) for all
    images or a list of them; `labels` (N, C) in {-1, 0, 1}, when given, restricts the pairs to
    label 1 (otherwise every class with a box in the image is a positive)."""
    s = np.asarray(patch_scores)
    N, P, C = s.shape
    if P != grid[0] * grid[1]:
        raise ValueError(f"patch_scores has {P} patches, grid {grid} has {grid[0] * grid[1]}")
    if len(boxes) != N or len(class_ids) != C:
        raise ValueError(f"boxes for {len(boxes)} images / {len(class_ids)} class ids, scores are {s.shape}")
    index = {c: i for i, c in enumerate(class_ids)}
    sizes = [tuple(image_sizes)] * N if np.ndim(image_sizes) == 1 else [tuple(x) for x in image_sizes]
    top = s.argmax(axis=1)  # (N, C): the first patch wins ties
    hits = np.zeros(C, np.int64)
    pairs = np.zeros(C, np.int64)
    for n in range(N):
        centres = patch_centres(grid, sizes[n])
        by_class: dict[int, list] = {}
        for obj in boxes[n]:
            for cid in obj["classes"]:
                if cid in index:
                    by_class.setdefault(index[cid], []).append(obj["box"])
        for c, bs in by_class.items():
            if labels is not None and labels[n][c] != 1:
                continue
            x, y = centres[top[n, c]]
            pairs[c] += 1
            hits[c] += any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in bs)
    return hits, pairs


def localization_accuracy(patch_scores, grid: tuple[int, int], boxes: list[list[dict]], class_ids: list[str],
                          image_sizes, labels=None, class_mask=None) -> float:
    """Fraction of counted positive (image, class) pairs whose top patch lies in one of the
    class's boxes; `class_mask` (C,) bool restricts to some classes (e.g. the unseen ones for ZSL).
    NaN when no pair counts."""
    hits, pairs = localization_counts(patch_scores, grid, boxes, class_ids, image_sizes, labels)
    if class_mask is not None:
        m = np.asarray(class_mask, bool)
        hits, pairs = hits[m], pairs[m]
    total = int(pairs.sum())
    return float(hits.sum() / total) if total else float("nan")


def top_patch_localization(pred_dir: str, boxes_jsonl: str, unseen: set[str]) -> dict:
    """Fraction of positive (image, class) pairs whose top patch lies in one of the class's boxes,
    from the tags table (patches are stored best first), for ZSL (unseen) and GZSL classes."""
    import json
    from pathlib import Path

    import duckdb

    import sql as sqlfiles
    from dart_core.data.sources.folder import key_for
    from dart_core.world.generator import read_boxes

    run = json.loads(Path(pred_dir, "run.json").read_text())
    grid = tuple(run["grid"])
    boxes = {key_for(p): objs for p, objs in read_boxes(boxes_jsonl).items()}
    con = duckdb.connect()
    rows = con.execute(sqlfiles.load("world_localization_top_patch"), [pred_dir, pred_dir]).fetchall()
    centres = patch_centres(grid, (64, 64))
    hit = {"zsl": [0, 0], "gzsl": [0, 0]}
    for image_id, cid, patch in rows:
        bs = [o["box"] for o in boxes.get(image_id, []) if cid in o["classes"]]
        if not bs:
            continue  # scene classes have no box
        x, y = centres[patch]
        ok = any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in bs)
        for setting in (("zsl", "gzsl") if cid in unseen else ("gzsl",)):
            hit[setting][0] += ok
            hit[setting][1] += 1
    return {s: (h / n if n else float("nan")) for s, (h, n) in hit.items()}
