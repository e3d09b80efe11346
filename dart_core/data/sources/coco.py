"""MS-COCO: `annotations/instances_<split>.json` + images in `<root>/<split>/<file_name>`.

Vocabulary: the 65 classes of the 48 seen / 17 unseen zero-shot split (Bansal et al. 2018, list in
`coco_zeroshot.json` beside this file), in COCO category-id order; class id = the COCO category
id as a string. COCO is exhaustively annotated for its categories, so every vocabulary class an
image has no instance of is a negative (-1). Instances of the 15 categories outside the split are
ignored; an annotation whose category_id is not in the file's `categories` is an unknown class id
(the image becomes a failed row).

`source.file` is the image's `file_name` (relative to `<root>/<split>/`; the sample key is made
from it)."""
from __future__ import annotations

import json
from importlib import resources

from dart_core.data import records as R
from dart_core.storage import Storage
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import read_text
from dart_core.vocab import Vocabulary


def zeroshot_split() -> tuple[list[str], list[str]]:
    data = json.loads(resources.files("dart_core.data.sources").joinpath("coco_zeroshot.json").read_text())
    return data["seen"], data["unseen"]


INSTANCES = "annotations/instances_{split}.json"


def available_splits(fs: Storage, root: str) -> list[str]:
    """The <split>s of the `annotations/instances_<split>.json` files under `root`, sorted."""
    try:
        names = fs.list(fs.join(root, "annotations"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n[len("instances_"):-len(".json")] for n in names
                  if "/" not in n and n.startswith("instances_") and n.endswith(".json") and len(n) > 15)


def read_coco(root: str, *, fs: Storage | None = None, split: str | None = None,
              images: str | None = None) -> SourceData:
    fs = fs or Storage()
    if split is None:
        candidates = available_splits(fs, root)
        if not candidates:
            raise SourceError(f"{root}: no COCO {INSTANCES} found (pass the folder that holds annotations/ "
                              "and the image folders)")
        if len(candidates) > 1:
            raise SourceError(f"{root}: pass --split: found {INSTANCES} for {', '.join(candidates)}")
        split = candidates[0]
    ann_url = fs.join(root, "annotations", f"instances_{split}.json")
    if not fs.exists(ann_url):
        avail = available_splits(fs, root)
        there = f"available splits: {', '.join(avail)}" if avail else f"no {INSTANCES} in {root}"
        raise SourceError(f"{ann_url}: not found; {there}")
    text = read_text(fs, ann_url, "COCO instances file")
    try:
        data = json.loads(text)
        cats = {int(c["id"]): c["name"] for c in data["categories"]}
        images_meta = data["images"]
        anns = data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{ann_url}: not a COCO instances file ({type(e).__name__}: {e})") from None
    seen, unseen = zeroshot_split()
    by_name = {n: cid for cid, n in cats.items()}
    missing = [n for n in seen + unseen if n not in by_name]
    if missing:
        raise SourceError(f"{ann_url}: categories {missing} of the 48/17 split are missing")
    split_of = {n: "seen" for n in seen} | {n: "unseen" for n in unseen}
    vocab_cats = sorted(by_name[n] for n in split_of)
    vocab = Vocabulary(tuple(str(c) for c in vocab_cats), tuple(cats[c] for c in vocab_cats),
                       tuple(split_of[cats[c]] for c in vocab_cats))
    per_image: dict = {}
    bad: dict = {}
    for a in anns:
        try:
            img, cat = a["image_id"], int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{ann_url}: annotation {a.get('id', '?') if isinstance(a, dict) else a!r} lacks image_id/category_id") from None
        if cat not in cats:
            bad.setdefault(img, (R.UNKNOWN_CLASS, f"{ann_url}: annotation {a.get('id')} has unknown category_id {cat}"))
        else:
            per_image.setdefault(img, set()).add(cat)
    img_root = images or fs.join(root, split)
    vocab_set = set(vocab_cats)
    src = SourceData("coco", split, vocab, _records(images_meta, per_image, bad, vocab_set, img_root, fs, split, ann_url), root)
    src.split_rule = (f"seen = {len(seen)}, unseen = {len(unseen)} categories: the zero-shot split of Bansal et al. "
                      "2018 (coco_zeroshot.json); the file's other categories are ignored")
    return src


def _records(images_meta, per_image, bad, vocab_set, img_root, fs, split, where):
    from dart_core.data.sources.folder import resolve_inside
    for i, im in enumerate(images_meta):
        try:
            img_id, fname = im["id"], str(im["file_name"])
        except (KeyError, TypeError):
            yield InputRecord(sample_key(f"{where}:images[{i}]"), "", {}, {"dataset": "coco", "split": split},
                              (R.MALFORMED_ROW, f"{where}: images[{i}] lacks id/file_name"))
            continue
        key = sample_key(fname)
        src = {"dataset": "coco", "split": split, "image_id": img_id, "file": fname}
        path = resolve_inside(img_root, fname)
        if path is None:
            yield InputRecord(key, fname, {}, src, (R.PATH_ESCAPES_SOURCE, f"{where}: file_name {fname!r} escapes {img_root}"))
            continue
        if img_id in bad:
            yield InputRecord(key, path, {}, src, bad[img_id])
            continue
        pos = per_image.get(img_id, set())
        labels = {str(c): (1 if c in pos else -1) for c in sorted(vocab_set)}
        yield InputRecord(key, path, labels, src)
