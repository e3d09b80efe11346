"""The vocabulary: `classes.csv` with columns id,name,split (split in seen|unseen); row order = class index."""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("seen", "unseen")


class VocabularyError(ValueError):
    """A classes.csv that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Vocabulary:
    ids: tuple[str, ...]
    names: tuple[str, ...]
    splits: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.names) == len(self.splits)):
            raise VocabularyError("ids, names and splits must have the same length")
        validate(self.ids, self.names, self.splits, where="vocabulary")

    # ---- construction -------------------------------------------------
    @classmethod
    def from_rows(cls, rows: list[tuple[str, str, str]]) -> "Vocabulary":
        return cls(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))

    @classmethod
    def from_names(cls, names: list[str], unseen: set[str] | frozenset[str] = frozenset()) -> "Vocabulary":
        """Vocabulary whose ids are the names themselves (handy for fixtures and ad-hoc vocabularies)."""
        return cls(tuple(names), tuple(names), tuple("unseen" if n in unseen else "seen" for n in names))

    @classmethod
    def read_csv(cls, path: str | Path) -> "Vocabulary":
        """A classes.csv, local or s3:// (dart_core.storage)."""
        from dart_core import storage

        path = storage.join(path)
        try:
            text = storage.read_bytes(path).decode("utf-8-sig")
        except (FileNotFoundError, IsADirectoryError):
            raise VocabularyError(f"{path}: vocabulary file not found") from None
        return cls.parse_csv(text, where=path)

    @classmethod
    def parse_csv(cls, text: str, where: str = "classes.csv") -> "Vocabulary":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"id", "name", "split"} - set(reader.fieldnames or [])
        if missing:
            raise VocabularyError(f"{where}: header must be id,name,split (missing {sorted(missing)})")
        ids, names, splits = [], [], []
        for lineno, row in enumerate(reader, start=2):
            ids.append((row["id"] or "").strip())
            names.append((row["name"] or "").strip())
            splits.append((row["split"] or "").strip().lower())
        if not ids:
            raise VocabularyError(f"{where}: no classes")
        validate(ids, names, splits, where=where, first_line=2)
        return cls(tuple(ids), tuple(names), tuple(splits))

    def csv_text(self) -> str:
        """The classes.csv text: header `id,name,split`, one row per class in order, LF line ends."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "name", "split"])
        w.writerows(zip(self.ids, self.names, self.splits))
        return buf.getvalue()

    def write(self, url: str | Path) -> None:
        """Write `csv_text()` to `url`, local (atomic) or s3:// (dart_core.storage)."""
        from dart_core import storage

        storage.write_bytes(storage.join(url), self.csv_text().encode())

    def write_csv(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "name", "split"])
            w.writerows(zip(self.ids, self.names, self.splits))
        tmp.replace(path)

    # ---- views ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def unseen_mask(self) -> np.ndarray:
        return np.array([s == "unseen" for s in self.splits], dtype=bool)

    @property
    def seen_mask(self) -> np.ndarray:
        return ~self.unseen_mask

    def index_of(self, class_id: str) -> int:
        try:
            return self._index[class_id]
        except KeyError:
            raise VocabularyError(f"unknown class id {class_id!r}") from None

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {cid: i for i, cid in enumerate(self.ids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def hash(self) -> str:
        """Content hash of (id, name, split) in order: checkpoints and predictions record it."""
        h = hashlib.sha256()
        for row in zip(self.ids, self.names, self.splits):
            h.update("\x1f".join(row).encode() + b"\x1e")
        return h.hexdigest()[:16]

    def subset(self, split: str) -> "Vocabulary":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return Vocabulary(tuple(self.ids[i] for i in keep), tuple(self.names[i] for i in keep),
                          tuple(self.splits[i] for i in keep))

    def extend(self, other: "Vocabulary") -> "Vocabulary":
        """This vocabulary followed by the classes of `other` it does not have (by id)."""
        new = [i for i, cid in enumerate(other.ids) if cid not in self._index]
        return Vocabulary(self.ids + tuple(other.ids[i] for i in new),
                          self.names + tuple(other.names[i] for i in new),
                          self.splits + tuple(other.splits[i] for i in new))


def validate(ids, names, splits, where: str, first_line: int | None = None) -> None:
    """Reject empty/duplicate ids and names and unknown splits, naming the row."""
    def at(i: int) -> str:
        return f"{where} line {first_line + i}" if first_line is not None else f"{where} class #{i}"

    seen_ids: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    for i, (cid, name, split) in enumerate(zip(ids, names, splits)):
        if not cid:
            raise VocabularyError(f"{at(i)}: empty class id")
        if not name:
            raise VocabularyError(f"{at(i)}: empty class name for id {cid!r}")
        if split not in SPLITS:
            raise VocabularyError(f"{at(i)}: split {split!r} for {name!r} is not one of {SPLITS}")
        if cid in seen_ids:
            raise VocabularyError(f"{at(i)}: duplicate class id {cid!r} (first at {at(seen_ids[cid])})")
        key = " ".join(name.lower().split())
        if key in seen_names:
            raise VocabularyError(f"{at(i)}: duplicate class name {name!r} (first at {at(seen_names[key])})")
        seen_ids[cid] = i
        seen_names[key] = i


def for_output(existing: Vocabulary | None, vocab: Vocabulary, mode: str, where: str) -> Vocabulary:
    """The vocabulary an output (a shards root's classes.csv at `where`, holding `existing` or
    None) gets when `vocab`'s data is added in `mode`: overwrite and a new output take `vocab`;
    extend appends its new classes after the existing ones (class indices stay valid); incremental
    requires the two to be equal (VocabularyError naming `where` otherwise)."""
    if existing is None or mode == "overwrite":
        return vocab
    if mode == "extend":
        return existing.extend(vocab)
    if existing.hash() != vocab.hash():
        raise VocabularyError(f"{where}: differs from the source's vocabulary ({len(existing)} vs {len(vocab)} classes, "
                              f"hash {existing.hash()} vs {vocab.hash()}); use --mode extend to append the new "
                              "classes or --mode overwrite to start over")
    return existing
