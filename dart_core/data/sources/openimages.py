"""Open Images v4-v7, image-level human labels.

Files read (any of the published names of v4-v7):
- class descriptions, in ROOT: `oidv7-class-descriptions.csv` / `oidv6-class-descriptions.csv`
  (header LabelName,DisplayName) or `class-descriptions.csv` (v4/v5, no header): MID -> name;
- trainable classes, in ROOT: `[oidvN-]classes-trainable.txt` (one MID a line);
- labels, in ROOT or ROOT/<split>/ (the official URL layout):
  `[oidvN-]<split>-annotations-human-imagelabels[-boxable].csv` with columns
  ImageID,Source,LabelName,Confidence (Confidence 1 -> +1, 0 -> -1, absent -> unknown);
- images: `ROOT/<split>/<ImageID>.jpg` (the official downloader) or
  `ROOT/<split>_<d>/<ImageID>.jpg`, d = the ImageID's first hex digit (the CVDF tarballs
  train_0 ... train_f). Each folder is listed once (not one existence check per image).

The seen/unseen split, first rule that applies (`SourceData.split_rule` states it in one line):
1. `ROOT/unseen.txt` (one MID a line): those MIDs are unseen;
2. `ROOT/top_400_unseen.csv` + `ROOT/unseen_labels.pkl`, the files the OV-MLR split of Huynh &
   Elhamifar (LESA; also BiAM, MKT) is published as: the pickle holds an array of 2,594 MIDs, the
   CSV (no header) 400 row indices into it; unseen = those rows, in CSV order. The pickle is read
   with an unpickler that builds nothing but a numpy array (or list) of strings;
3. otherwise the `n_unseen` (400) non-trainable classes with the most positive human labels in the
   *test* label file (the split's own file if there is none), ties broken by MID.
seen = the trainable classes minus the unseen ones: an unseen list always wins over the trainable
list. With the V4 files (classes-trainable.txt: 7,186 MIDs) rule 2 gives the papers' 7,186 / 400.

Labels for MIDs that have a description but are outside the vocabulary are dropped (OI labels
~20k classes); a MID without a description is an unknown class id -> the image is a failed row.
A confidence that is not 0/1 leaves that one (image, class) unknown, with a warning naming
file:line (the image's other labels stand). The labels CSV must be grouped by ImageID (the
published files are sorted): rows are streamed, and an ImageID reappearing later is a duplicate."""
from __future__ import annotations

import csv
import io
import math
import pickle
import re
from collections import Counter

import numpy as np

from dart_core.data import records as R
from dart_core.storage import Storage
from dart_core.data.records import InputRecord, SourceData, SourceError, sample_key
from dart_core.data.sources._util import LOG, CellWarnings, csv_rows, read_text
from dart_core.vocab import Vocabulary

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}
PREFIXES = ("oidv7-", "oidv6-", "")  # newest first
UNSEEN_TXT = "unseen.txt"
TOP_UNSEEN_CSV = "top_400_unseen.csv"
UNSEEN_PKL = "unseen_labels.pkl"
HEX = "0123456789abcdef"


def _first_existing(fs: Storage, dirs: list[str], names: list[str]) -> str | None:
    """The url of the first published name present (probed one by one: a recursive listing of
    an image bucket would be huge)."""
    for d in dirs:
        for name in names:
            url = fs.join(d, name)
            if fs.exists(url):
                return url
    return None


def _label_names(split: str) -> list[str]:
    return [f"{p}{a}-annotations-human-imagelabels{b}.csv"
            for p in PREFIXES for a in SPLIT_ALIASES.get(split, (split,)) for b in ("", "-boxable")]


def _label_pattern(split: str) -> str:
    aliases = SPLIT_ALIASES.get(split, (split,))
    a = aliases[0] if len(aliases) == 1 else "{" + ",".join(aliases) + "}"
    return f"[oidv7-|oidv6-]{a}-annotations-human-imagelabels[-boxable].csv"


def _rel(fs: Storage, root: str, url: str) -> str:
    """`url` relative to `root` for messages and provenance (posix separators)."""
    base = fs.join(root, "")
    base = base if base.endswith(("/", "\\")) else base + ("/" if "/" in base else "\\")
    return url[len(base):].replace("\\", "/") if url.startswith(base) else url


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


# ---- the published split files ---------------------------------------------------------------

class _NdarrayToken:
    """What `numpy.ndarray` unpickles to: only `_reconstruct` accepts it (no NEWOBJ of a real class)."""


_NDARRAY = _NdarrayToken()
_MAX_ELEMENTS = 10_000_000


def _numpy_internals():
    try:
        from numpy._core import multiarray, numeric          # numpy >= 2
    except ImportError:                                       # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray._reconstruct, numeric._frombuffer


def _string_dtype(spec, *args):
    dt = np.dtype(spec)
    if dt.kind not in "USO":
        raise pickle.UnpicklingError(f"dtype {dt} is not a string dtype")
    return dt


def _small_shape(shape) -> None:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) \
            or math.prod(shape) > _MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"array shape {shape!r} refused")


def _reconstruct(subtype, shape, code):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    _small_shape(shape)
    return _numpy_internals()[0](np.ndarray, shape, code)


def _frombuffer(buf, dtype, shape, order):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "US":
        raise pickle.UnpicklingError("_frombuffer of a non-string dtype")
    _small_shape(shape)
    return _numpy_internals()[1](buf, dtype, shape, order)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _string_dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _MidUnpickler(pickle.Unpickler):
    """Rebuilds a numpy array of str/bytes/objects or plain containers and nothing else: every
    global other than the few numpy needs to rebuild an array is refused before it is looked up."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")  # python-2 pickles (2018) too
        self.where = where

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise SourceError(f"{self.where}: refused to unpickle {module}.{name}: only a numpy array or list "
                              "of MID strings is read from this file")
        return obj


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def load_mid_pickle(data: bytes, where: str) -> list[str]:
    """The MIDs of `unseen_labels.pkl` (a pickled 1-D numpy array of strings, or a list of str),
    unpickled without building anything else. Anything else: SourceError naming `where`."""
    try:
        obj = _MidUnpickler(io.BytesIO(data), where).load()
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted pickle is the file's
        raise SourceError(f"{where}: not a pickled array of MIDs ({_one_line(e)})") from None
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1 or obj.dtype.kind not in "USO":
            raise SourceError(f"{where}: expected a 1-D array of MID strings, got a {obj.dtype} array of shape {obj.shape}")
        items = obj.tolist()
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        raise SourceError(f"{where}: expected an array or list of MID strings, got {type(obj).__name__}")
    out = []
    for i, v in enumerate(items):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                v = None
        if not isinstance(v, str) or not v.strip():
            raise SourceError(f"{where}: item {i} ({v!r}) is not a MID string")
        out.append(v.strip())
    return out


def read_row_indices(text: str, where: str, n_rows: int, rows_of: str = UNSEEN_PKL) -> list[int]:
    """`top_400_unseen.csv`: one row index a line (first field; no header; BOM, CRLF and blank
    lines are fine). A non-integer, out-of-range or repeated index is a SourceError naming file:line."""
    out: list[int] = []
    first: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        field = line.split(",")[0].strip()
        if not field:
            continue
        try:
            i = int(field)
        except ValueError:
            raise SourceError(f"{where}:{lineno}: {field!r} is not a row index of {rows_of}") from None
        if not 0 <= i < n_rows:
            raise SourceError(f"{where}:{lineno}: row index {i} is outside {rows_of} (rows 0..{n_rows - 1})")
        if i in first:
            raise SourceError(f"{where}:{lineno}: row index {i} repeats line {first[i]}")
        first[i] = lineno
        out.append(i)
    if not out:
        raise SourceError(f"{where}: no row indices")
    return out


def _mid_lines(text: str, where: str) -> list[str]:
    out: list[str] = []
    first: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = line.strip()
        if not m:
            continue
        if m in first:
            raise SourceError(f"{where}:{lineno}: MID {m!r} repeats line {first[m]}")
        first[m] = lineno
        out.append(m)
    return out


def _unseen_classes(fs: Storage, root: str, desc: dict[str, str], trainable: list[str], labels_text: str,
                    labels_url: str, n_unseen: int) -> tuple[list[str], str]:
    """(unseen MIDs, the rule that chose them in words)."""
    txt, csv_url, pkl_url = (fs.join(root, n) for n in (UNSEEN_TXT, TOP_UNSEEN_CSV, UNSEEN_PKL))
    has_csv, has_pkl = fs.exists(csv_url), fs.exists(pkl_url)
    if fs.exists(txt):
        unseen = _mid_lines(read_text(fs, txt, "unseen class list"), txt)
        bad = [m for m in unseen if m not in desc]
        if bad:
            raise SourceError(f"{txt}: MID {bad[0]!r} has no class description")
        also = f" ({UNSEEN_TXT} takes precedence over {TOP_UNSEEN_CSV})" if has_csv or has_pkl else ""
        return unseen, f"unseen = {len(unseen)} MIDs listed in {UNSEEN_TXT}{also}"
    if has_csv != has_pkl:
        there, absent = (csv_url, UNSEEN_PKL) if has_csv else (pkl_url, TOP_UNSEEN_CSV)
        raise SourceError(f"{there}: the published split needs {absent} beside it (not found in {root})")
    if has_csv:
        try:
            data = fs.read_bytes(pkl_url)
        except FileNotFoundError:
            raise SourceError(f"{pkl_url}: unseen label pickle not found") from None
        pool = load_mid_pickle(data, pkl_url)
        rows = read_row_indices(read_text(fs, csv_url, "top unseen row indices"), csv_url, len(pool))
        unseen = [pool[i] for i in rows]
        seen_at: dict[str, int] = {}
        for i in rows:
            if pool[i] in seen_at:
                raise SourceError(f"{pkl_url}: rows {seen_at[pool[i]]} and {i} (both in {TOP_UNSEEN_CSV}) are the same MID {pool[i]!r}")
            seen_at[pool[i]] = i
        bad = [i for i in rows if pool[i] not in desc]
        if bad:
            raise SourceError(f"{pkl_url}: MID {pool[bad[0]]!r} (row {bad[0]}, chosen by {TOP_UNSEEN_CSV}) has no class description")
        return unseen, (f"unseen = {len(unseen)} MIDs: the rows of {UNSEEN_PKL} ({len(pool)} MIDs) listed in "
                        f"{TOP_UNSEEN_CSV}")
    test_url = _first_existing(fs, [root, fs.join(root, "test")], _label_names("test"))
    text = labels_text if test_url in (None, labels_url) else read_text(fs, test_url, "test labels")
    counted = _rel(fs, root, test_url or labels_url)
    unseen = most_frequent_unseen(text, set(trainable), desc, n_unseen)
    short = f", only {len(unseen)} found" if len(unseen) < n_unseen else ""
    rule = (f"unseen = {len(unseen)} MIDs: the non-trainable classes with the most positive human labels in "
            f"{counted} (asked for {n_unseen}{short}; no {UNSEEN_TXT} or {TOP_UNSEEN_CSV} + {UNSEEN_PKL} in {root})")
    if short:
        LOG.warning("%s: %d unseen classes instead of %d; put the published %s and %s in %s for the papers' split",
                    counted, len(unseen), n_unseen, TOP_UNSEEN_CSV, UNSEEN_PKL, root)
    return unseen, rule


def most_frequent_unseen(labels_text: str, trainable: set[str], desc: dict[str, str], n: int) -> list[str]:
    counts: Counter[str] = Counter()
    reader = csv.reader(io.StringIO(labels_text))
    next(reader, None)
    for row in reader:
        if len(row) >= 4 and row[2] in desc and row[2] not in trainable and _conf(row[3]) == 1:
            counts[row[2]] += 1
    return [m for m, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


# ---- images ----------------------------------------------------------------------------------

_ID_JPG = re.compile(r"[0-9a-f]{16}\.jpg")


class _Names:
    """The `.jpg` names directly in one folder; 16-hex-digit Open Images ids as a sorted uint64
    array (8 bytes an image: 9M train images -> 72 MB), any other name in a set."""

    def __init__(self, names):
        other: set[str] = set()

        def ids():
            for n in names:
                if "/" in n or not n.endswith(".jpg"):
                    continue  # sub-folders, label CSVs beside the images, ...
                if len(n) == 20 and _ID_JPG.fullmatch(n):
                    yield int(n[:16], 16)
                else:
                    other.add(n)

        self.ids = np.sort(np.fromiter(ids(), dtype=np.uint64))
        self.other = other

    def __len__(self) -> int:
        return len(self.ids) + len(self.other)

    def __contains__(self, name: str) -> bool:
        if len(name) == 20 and _ID_JPG.fullmatch(name):
            v = np.uint64(int(name[:16], 16))
            i = int(np.searchsorted(self.ids, v))
            return i < len(self.ids) and self.ids[i] == v
        return name in self.other


class ImageFinder:
    """Where `<ImageID>.jpg` is: `base` (ROOT/<split>) or `base_<d>` (d = first hex digit of the id,
    the CVDF tarball folders). Each folder is listed once, when first needed."""

    def __init__(self, fs: Storage, base: str):
        self.fs = fs
        self.base = base.rstrip("/\\") or base
        self.folders = {"": self.base, **{d: f"{self.base}_{d}" for d in HEX}}
        self._names: dict[str, _Names] = {}

    def names(self, d: str) -> _Names:
        if d not in self._names:
            self._names[d] = _Names(self.fs.list(self.folders[d]))
        return self._names[d]

    def count_any(self) -> int:
        """Images in `base`, else in all 16 `base_<d>` (0: nothing anywhere)."""
        return len(self.names("")) or sum(len(self.names(d)) for d in HEX)

    def locate(self, image_id: str) -> tuple[str, str | None]:
        """(path, None) when found, else (the path expected, 'X.jpg not found in A or B')."""
        name = f"{image_id}.jpg"
        if name in self.names(""):
            return self.fs.join(self.base, name), None
        d = image_id[:1].lower()
        if d and d in HEX:
            if name in self.names(d):
                return self.fs.join(self.folders[d], name), None
            expected = self.folders[d] if not len(self.names("")) else self.base
            return self.fs.join(expected, name), f"{name} not found in {self.base} or {self.folders[d]}"
        return self.fs.join(self.base, name), f"{name} not found in {self.base}"


# ---- the source ------------------------------------------------------------------------------

def read_openimages(root: str, *, fs: Storage | None = None, split: str = "train",
                    n_unseen: int = 400, images: str | None = None) -> SourceData:
    """The split's records + vocabulary; `images` replaces ROOT/<split> as the image folder (its
    `_0`…`_f` siblings are searched too). The returned SourceData has `split_rule`: one line
    saying which rule produced the seen/unseen split, with the counts."""
    fs = fs or Storage()
    desc_url = _first_existing(fs, [root], [f"{p}class-descriptions.csv" for p in PREFIXES])
    if desc_url is None:
        raise SourceError(f"{root}: no Open Images class descriptions file found "
                          f"(looked for [oidv7-|oidv6-]class-descriptions.csv in {root})")
    train_url = _first_existing(fs, [root], [f"{p}classes-trainable.txt" for p in PREFIXES])
    if train_url is None:
        raise SourceError(f"{root}: no Open Images trainable classes file found "
                          f"(looked for [oidv7-|oidv6-]classes-trainable.txt in {root})")
    split_dir = fs.join(root, split)
    labels_url = _first_existing(fs, [root, split_dir], _label_names(split))
    if labels_url is None:
        raise SourceError(f"{root}: no Open Images {split} image labels found "
                          f"(looked for {_label_pattern(split)} in {root} and {split_dir})")
    desc = read_descriptions(read_text(fs, desc_url, "class descriptions"), _rel(fs, root, desc_url))
    trainable = _mid_lines(read_text(fs, train_url, "trainable classes"), train_url)
    missing = [m for m in trainable if m not in desc]
    if missing:
        raise SourceError(f"{train_url}: trainable MID {missing[0]!r} has no class description")
    labels_text = read_text(fs, labels_url, "image labels")

    unseen, unseen_rule = _unseen_classes(fs, root, desc, trainable, labels_text, labels_url, n_unseen)
    uset = set(unseen)
    seen = [m for m in trainable if m not in uset]  # an unseen list wins over the trainable list
    train_name = _rel(fs, root, train_url)
    rule = (f"{unseen_rule}; seen = {len(seen)} MIDs: {train_name} ({len(trainable)}) minus the unseen ones "
            f"({len(trainable) - len(seen)} in both lists)")
    mids = seen + unseen
    vocab = Vocabulary(tuple(mids), tuple(_unique_names(mids, desc)),
                       tuple(["seen"] * len(seen) + ["unseen"] * len(unseen)))

    finder = ImageFinder(fs, images or split_dir)
    if not finder.count_any():
        raise SourceError(f"{root}: no Open Images {split} images found "
                          f"(looked for <ImageID>.jpg in {finder.base} and {finder.base}_[0-9a-f])")
    src = SourceData("openimages", split, vocab,
                     _records(labels_text, _rel(fs, root, labels_url), desc, set(mids), finder, split), root)
    src.split_rule = rule
    LOG.info("%s", rule)
    return src


def _records(text: str, where: str, desc: dict[str, str], vocab_ids: set[str], finder: ImageFinder, split: str):
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or [h.strip() for h in header[:4]] != ["ImageID", "Source", "LabelName", "Confidence"]:
        raise SourceError(f"{where}: header must be ImageID,Source,LabelName,Confidence")
    warnings = CellWarnings()
    cur: str | None = None
    labels: dict[str, int] = {}
    err: tuple[str, str] | None = None
    first_line = 2

    def emit():
        file = f"{cur}.jpg"
        src = {"dataset": "openimages", "split": split, "image_id": cur, "file": file, "row": f"{where}:{first_line}"}
        path, missing = finder.locate(cur)
        if err is None and missing:
            return InputRecord(sample_key(file), path, {}, src, (R.MISSING_FILE, f"{where}:{first_line}: {missing}"))
        return InputRecord(sample_key(file), path, {} if err else labels, src, err)

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
        elif mid not in vocab_ids:
            continue
        elif conf is None:
            warnings.warn(where, lineno, f"confidence {row[3]!r} is not 0 or 1; {mid} is unknown for image {image_id}")
        else:
            labels[mid] = max(labels.get(mid, -1), conf)  # a human positive wins over a negative
    if cur is not None:
        yield emit()
    warnings.finish()
