"""NUS-WIDE in its published layout:

    ImageList/{Imagelist,TrainImagelist,TestImagelist}.txt   Windows paths, e.g.
        C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg  -> <root>/Flickr/actor/0001_2124494179.jpg
    NUS_WID_Tags/TagList1k.txt                               the 1,000 tags, one a line
    NUS_WID_Tags/{AllTags1k.txt, Train_Tags1k.dat, Test_Tags1k.dat}   0/1 matrix, one row an image
    Concepts81.txt (or ConceptsList/Concepts81.txt)          the 81 human-labelled concepts
    Groundtruth/AllLabels/Labels_<c>.txt, Groundtruth/TrainTestLabels/Labels_<c>_{Train,Test}.txt
                                                             one 0/1 a line per image

Vocabulary (the OV-MLR setting): seen = the 1k tags minus those that are also one of the 81
concepts (925 with the real files), in TagList1k order; unseen = the 81 concepts. Labels are +1/-1
for every class (NUS-WIDE is treated as fully labelled): tag columns for seen classes, concept
ground truth for unseen ones. Split `all` uses Imagelist.txt / AllTags1k.txt / AllLabels.

Every file is positional (line i = image i): files of different lengths are a run-level error.
A tag-matrix row with the wrong number of columns makes that image a failed row (malformed_label,
naming file:line). A single cell that is not 0/1 — in the tag matrix or in a ground-truth file
`Groundtruth/TrainTestLabels/Labels_<concept>_<split>.txt` — makes only that (image, class)
unknown, with a warning naming file:line (logger `dart_core.data.sources`).

`source.file` is `<dir>/<file>` under Flickr/ (what the sample key is made from); `source.listed`
the image list's own text."""
from __future__ import annotations

from dart_core.data import records as R
from dart_core.storage import Storage
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import CellWarnings, positional_lines, read_text
from dart_core.vocab import Vocabulary

SPLITS = {
    "train": ("ImageList/TrainImagelist.txt", "NUS_WID_Tags/Train_Tags1k.dat", "Groundtruth/TrainTestLabels/Labels_{c}_Train.txt"),
    "test": ("ImageList/TestImagelist.txt", "NUS_WID_Tags/Test_Tags1k.dat", "Groundtruth/TrainTestLabels/Labels_{c}_Test.txt"),
    "all": ("ImageList/Imagelist.txt", "NUS_WID_Tags/AllTags1k.txt", "Groundtruth/AllLabels/Labels_{c}.txt"),
}


def _lines(fs, url, what) -> list[str]:
    # lists (tags, concepts): blank lines are not entries
    return [ln.strip() for ln in read_text(fs, url, what).splitlines() if ln.strip()]


def _rel_path(raw: str) -> tuple[list[str], str]:
    parts = [p for p in raw.replace("\\", "/").split("/") if p]
    return parts, "/".join(parts[-2:])


def _rel(fs, root: str, url: str) -> str:
    base = fs.join(root, "")
    base = base if base.endswith(("/", "\\")) else base + "/"
    return url[len(base):] if url.startswith(base) else url


def read_nuswide(root: str, *, fs: Storage | None = None, split: str = "train") -> SourceData:
    fs = fs or Storage()
    if split not in SPLITS:
        raise SourceError(f"--split {split!r}: NUS-WIDE splits are {', '.join(SPLITS)}")
    list_name, tags_name, gt_pattern = SPLITS[split]
    tags = _lines(fs, fs.join(root, "NUS_WID_Tags/TagList1k.txt"), "tag list")
    concepts_url = fs.join(root, "Concepts81.txt")
    if not fs.exists(concepts_url):
        concepts_url = fs.join(root, "ConceptsList/Concepts81.txt")
    concepts = _lines(fs, concepts_url, "concept list (Concepts81.txt)")
    cset = set(concepts)
    seen_cols = [i for i, t in enumerate(tags) if t not in cset]
    vocab = Vocabulary(tuple(tags[i] for i in seen_cols) + tuple(concepts),
                       tuple(tags[i] for i in seen_cols) + tuple(concepts),
                       ("seen",) * len(seen_cols) + ("unseen",) * len(concepts))
    paths = positional_lines(read_text(fs, fs.join(root, list_name), "image list"))
    tag_rows = positional_lines(read_text(fs, fs.join(root, tags_name), "tag matrix"))
    if len(tag_rows) != len(paths):
        raise SourceError(f"{tags_name}: {len(tag_rows)} rows but {list_name} lists {len(paths)} images")
    gt: list[list[str]] = []
    warnings = CellWarnings()
    for c in concepts:
        name = gt_pattern.format(c=c)
        col = positional_lines(read_text(fs, fs.join(root, name), f"ground truth for concept {c!r}"))
        if len(col) != len(paths):
            raise SourceError(f"{name}: {len(col)} rows but {list_name} lists {len(paths)} images")
        for i, v in enumerate(col):
            if v not in ("0", "1"):
                warnings.warn(name, i + 1, f"{v!r} is not 0/1; {c!r} is unknown for image "
                                           f"{_rel_path(paths[i])[1] or paths[i]!r} ({list_name}:{i + 1})")
        gt.append(col)
    warnings.finish()
    src = SourceData("nuswide", split, vocab,
                     _records(root, fs, split, list_name, tags_name, paths, tag_rows, gt, tags, seen_cols, concepts),
                     root)
    src.split_rule = (f"seen = {len(seen_cols)} tags: TagList1k.txt ({len(tags)}) minus the concepts "
                      f"({len(tags) - len(seen_cols)} in both lists); unseen = {len(concepts)} concepts: "
                      f"{_rel(fs, root, concepts_url)}")
    return src


def _records(root, fs, split, list_name, tags_name, paths, tag_rows, gt, tags, seen_cols, concepts):
    n_tags = len(tags)
    warnings = CellWarnings()
    for i, raw in enumerate(paths):
        parts, rel = _rel_path(raw)
        key = sample_key(rel) if rel else sample_key(f"{list_name}:{i + 1}")
        src = {"dataset": "nuswide", "split": split, "row": f"{list_name}:{i + 1}", "file": rel, "listed": raw}
        if len(parts) < 2 or ".." in parts[-2:]:
            yield InputRecord(key, raw, {}, src, (R.MALFORMED_ROW, f"{list_name}:{i + 1}: cannot map {raw!r} to Flickr/<dir>/<file>"))
            continue
        path = fs.join(root, "Flickr", parts[-2], parts[-1])
        vals = tag_rows[i].split()
        if len(vals) != n_tags:
            yield InputRecord(key, path, {}, src, (R.MALFORMED_LABEL, f"{tags_name}:{i + 1}: expected {n_tags} values of 0/1, got {len(vals)}"))
            continue
        labels = {}
        for j in seen_cols:
            if vals[j] in ("0", "1"):
                labels[tags[j]] = 1 if vals[j] == "1" else -1
            else:
                warnings.warn(tags_name, i + 1, f"column {j + 1} ({tags[j]!r}) is {vals[j]!r}, not 0/1; "
                                                f"{tags[j]!r} is unknown for image {rel!r}")
        for c, col in zip(concepts, gt):
            if col[i] in ("0", "1"):   # anything else was warned about when the file was read
                labels[c] = 1 if col[i] == "1" else -1
        yield InputRecord(key, path, labels, src)
    warnings.finish()
