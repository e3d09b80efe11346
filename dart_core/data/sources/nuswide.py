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

Files of different lengths are a run-level error; a row that is not all 0/1 values (or has the
wrong number of columns) makes that image a failed row (malformed_label)."""
from __future__ import annotations

from dart_core.data import records as R
from dart_core.data.fs import FileSystem, LocalFS
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import read_text
from dart_core.vocab import Vocabulary

SPLITS = {
    "train": ("ImageList/TrainImagelist.txt", "NUS_WID_Tags/Train_Tags1k.dat", "Groundtruth/TrainTestLabels/Labels_{c}_Train.txt"),
    "test": ("ImageList/TestImagelist.txt", "NUS_WID_Tags/Test_Tags1k.dat", "Groundtruth/TrainTestLabels/Labels_{c}_Test.txt"),
    "all": ("ImageList/Imagelist.txt", "NUS_WID_Tags/AllTags1k.txt", "Groundtruth/AllLabels/Labels_{c}.txt"),
}


def _lines(fs, url, what) -> list[str]:
    # keep empty lines out but do not strip inner whitespace: rows are positional
    return [ln.strip() for ln in read_text(fs, url, what).splitlines() if ln.strip()]


def read_nuswide(root: str, *, fs: FileSystem | None = None, split: str = "train") -> SourceData:
    fs = fs or LocalFS()
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
    paths = _lines(fs, fs.join(root, list_name), "image list")
    tag_rows = _lines(fs, fs.join(root, tags_name), "tag matrix")
    if len(tag_rows) != len(paths):
        raise SourceError(f"{tags_name}: {len(tag_rows)} rows but {list_name} lists {len(paths)} images")
    gt: list[list[str]] = []
    for c in concepts:
        name = gt_pattern.format(c=c)
        col = _lines(fs, fs.join(root, name), f"ground truth for concept {c!r}")
        if len(col) != len(paths):
            raise SourceError(f"{name}: {len(col)} rows but {list_name} lists {len(paths)} images")
        gt.append(col)
    return SourceData("nuswide", split, vocab,
                      _records(root, fs, split, list_name, tags_name, paths, tag_rows, gt, tags, seen_cols, concepts),
                      root)


def _records(root, fs, split, list_name, tags_name, paths, tag_rows, gt, tags, seen_cols, concepts):
    n_tags = len(tags)
    for i, raw in enumerate(paths):
        parts = [p for p in raw.replace("\\", "/").split("/") if p]
        rel = "/".join(parts[-2:])
        key = sample_key(rel)
        src = {"dataset": "nuswide", "split": split, "row": f"{list_name}:{i + 1}", "path": raw}
        if len(parts) < 2 or ".." in parts[-2:]:
            yield InputRecord(key, raw, {}, src, (R.MALFORMED_ROW, f"{list_name}:{i + 1}: cannot map {raw!r} to Flickr/<concept>/<file>"))
            continue
        path = fs.join(root, "Flickr", parts[-2], parts[-1])
        vals = tag_rows[i].split()
        if len(vals) != n_tags or any(v not in ("0", "1") for v in vals):
            yield InputRecord(key, path, {}, src, (R.MALFORMED_LABEL, f"{tags_name}:{i + 1}: expected {n_tags} values of 0/1"))
            continue
        cvals = [col[i] for col in gt]
        bad = [c for c, v in zip(concepts, cvals) if v not in ("0", "1")]
        if bad:
            yield InputRecord(key, path, {}, src, (R.MALFORMED_LABEL, f"ground truth of {bad[0]!r} row {i + 1}: {cvals[concepts.index(bad[0])]!r} is not 0/1"))
            continue
        labels = {tags[j]: (1 if vals[j] == "1" else -1) for j in seen_cols}
        labels.update({c: (1 if v == "1" else -1) for c, v in zip(concepts, cvals)})
        yield InputRecord(key, path, labels, src)
