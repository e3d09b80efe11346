"""Open Images v4-v7, image-level human labels.

Files read from `root` (any of the published names of v4-v7):
- class descriptions: `oidv7-class-descriptions.csv` / `oidv6-class-descriptions.csv` (header
  LabelName,DisplayName) or `class-descriptions.csv` (v4/v5, no header): MID -> display name;
- trainable classes: `*classes-trainable.txt` (one MID a line): the seen classes;
- labels: `[oidvN-]<split>-annotations-human-imagelabels[-boxable].csv` with columns
  ImageID,Source,LabelName,Confidence (Confidence 1 -> +1, 0 -> -1, absent -> unknown);
- images: `<root>/<split>/<ImageID>.jpg` (as the official downloader writes them).

Unseen classes (the OV-MLR split of Huynh & Elhamifar, 7,186 seen / 400 unseen): taken from
`unseen.txt` (one MID a line) when the root has it — pass the list published with the split for
exact comparability; otherwise computed as the `n_unseen` (400) non-trainable classes with the most
positive human labels in the *test* label file (the split's own file if there is no test file),
ties broken by MID. The computed list is deterministic for a given set of files.

Labels for MIDs that have a description but are outside the vocabulary are dropped (OI labels
~20k classes); a MID without a description is an unknown class id -> the image is a failed row;
so is a confidence that is not 0/1. The labels CSV must be grouped by ImageID (the published files
are sorted): rows are streamed, and an ImageID reappearing later is a duplicate id."""
from __future__ import annotations

import csv
import io
from collections import Counter

from dart_core.data import records as R
from dart_core.data.fs import FileSystem, LocalFS
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import csv_rows, lines, read_text
from dart_core.vocab import Vocabulary

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


PREFIXES = ("oidv7-", "oidv6-", "")  # newest first


def _first_existing(fs: FileSystem, root: str, names: list[str]) -> str | None:
    """Probe the published names one by one (a recursive listing of an image bucket would be huge)."""
    for name in names:
        if fs.exists(fs.join(root, name)):
            return name
    return None


def _label_names(split: str) -> list[str]:
    return [f"{p}{a}-annotations-human-imagelabels{b}.csv"
            for p in PREFIXES for a in SPLIT_ALIASES.get(split, (split,)) for b in ("", "-boxable")]


def read_descriptions(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, row in enumerate(csv_rows(text), start=1):
        if not row:
            continue
        if i == 1 and row[0].strip() == "LabelName":
            continue  # v6+ header
        if len(row) < 2 or not row[0].strip():
            raise SourceError(f"{where} line {i}: expected MID,name")
        out[row[0].strip()] = row[1].strip()
    return out


def _conf(value: str) -> int | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return 1 if f == 1.0 else -1 if f == 0.0 else None


def _unique_names(mids: list[str], desc: dict[str, str]) -> list[str]:
    """Display names are not unique in Open Images (e.g. two 'Bow' MIDs); disambiguate with the MID."""
    counts = Counter(" ".join(desc[m].lower().split()) for m in mids)
    return [desc[m] if counts[" ".join(desc[m].lower().split())] == 1 else f"{desc[m]} ({m})" for m in mids]


def read_openimages(root: str, *, fs: FileSystem | None = None, split: str = "train",
                    n_unseen: int = 400, images: str | None = None) -> SourceData:
    fs = fs or LocalFS()
    desc_name = _first_existing(fs, root, [f"{p}class-descriptions.csv" for p in PREFIXES])
    train_name = _first_existing(fs, root, [f"{p}classes-trainable.txt" for p in PREFIXES])
    labels_name = _first_existing(fs, root, _label_names(split))
    for what, name in (("class descriptions (class-descriptions.csv)", desc_name),
                       ("trainable classes (classes-trainable.txt)", train_name),
                       (f"{split} image labels ({split}-annotations-human-imagelabels.csv)", labels_name)):
        if name is None:
            raise SourceError(f"{root}: no Open Images {what} file found")
    desc = read_descriptions(read_text(fs, fs.join(root, desc_name), "class descriptions"), desc_name)
    trainable = [m for m in lines(read_text(fs, fs.join(root, train_name), "trainable classes"))]
    missing = [m for m in trainable if m not in desc]
    if missing:
        raise SourceError(f"{train_name}: trainable MID {missing[0]!r} has no class description")
    labels_url = fs.join(root, labels_name)
    labels_text = read_text(fs, labels_url, "image labels")

    if fs.exists(fs.join(root, "unseen.txt")):
        unseen = lines(read_text(fs, fs.join(root, "unseen.txt"), "unseen class list"))
        bad = [m for m in unseen if m not in desc]
        if bad:
            raise SourceError(f"unseen.txt: MID {bad[0]!r} has no class description")
    else:
        test_name = _first_existing(fs, root, _label_names("test"))
        text = labels_text if test_name in (None, labels_name) else read_text(fs, fs.join(root, test_name), "test labels")
        unseen = most_frequent_unseen(text, set(trainable), desc, n_unseen)
    tset = set(trainable)
    unseen = [m for m in unseen if m not in tset]
    mids = trainable + unseen
    vocab = Vocabulary(tuple(mids), tuple(_unique_names(mids, desc)),
                       tuple(["seen"] * len(trainable) + ["unseen"] * len(unseen)))
    img_root = images or fs.join(root, split)
    return SourceData("openimages", split, vocab,
                      _records(labels_text, labels_name, desc, set(mids), img_root, fs, split), root)


def most_frequent_unseen(labels_text: str, trainable: set[str], desc: dict[str, str], n: int) -> list[str]:
    counts: Counter[str] = Counter()
    reader = csv.reader(io.StringIO(labels_text))
    next(reader, None)
    for row in reader:
        if len(row) >= 4 and row[2] in desc and row[2] not in trainable and _conf(row[3]) == 1:
            counts[row[2]] += 1
    return [m for m, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _records(text: str, where: str, desc: dict[str, str], vocab_ids: set[str], img_root: str,
             fs: FileSystem, split: str):
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or [h.strip() for h in header[:4]] != ["ImageID", "Source", "LabelName", "Confidence"]:
        raise SourceError(f"{where}: header must be ImageID,Source,LabelName,Confidence")
    cur: str | None = None
    labels: dict[str, int] = {}
    err: tuple[str, str] | None = None
    first_line = 2

    def emit():
        key = sample_key(f"{cur}.jpg")
        src = {"dataset": "openimages", "split": split, "image_id": cur, "row": f"{where}:{first_line}"}
        return InputRecord(key, fs.join(img_root, f"{cur}.jpg"), {} if err else labels, src, err)

    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        image_id = row[0].strip()
        if image_id != cur:
            if cur is not None:
                yield emit()
            cur, labels, err, first_line = image_id, {}, None, lineno
        if err is not None:
            continue
        if len(row) != 4 or not image_id:
            err = (R.MALFORMED_ROW, f"{where}:{lineno}: expected 4 columns, got {row!r}")
            continue
        mid, conf = row[2].strip(), _conf(row[3].strip())
        if mid not in desc:
            err = (R.UNKNOWN_CLASS, f"{where}:{lineno}: unknown class id {mid!r}")
        elif conf is None:
            err = (R.MALFORMED_LABEL, f"{where}:{lineno}: confidence {row[3]!r} is not 0 or 1")
        elif mid in vocab_ids:
            labels[mid] = max(labels.get(mid, -1), conf)  # a human positive wins over a negative
    if cur is not None:
        yield emit()
