"""Label corrections: the review file `dart audit --export` writes, the reviewer's accept / reject
per row, and the corrections file `dart train --corrections` and `dart eval --corrections` apply on
top of the shard labels (docs/audit.md).

Review file (CSV, one suspicious (image, class) pair a row):
    path, class, current_label, suggested_label, score, reason, kind, decision, shard, image_id, class_id
The reviewer fills `decision` with `accept` or `reject` (empty: not reviewed yet) and may edit
`suggested_label` (1 present, -1 absent, 0 unknown).

Corrections file (CSV): image_id, class_id, label (+ path, class, shard for people; not used).
`read` accepts both: from a review file it takes the accepted rows, with their suggested label.
Sample keys (image_id) are unique within a dataset (dart shard), so a row names one sample.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

REVIEW_COLUMNS = ["path", "class", "current_label", "suggested_label", "score", "reason", "kind", "decision",
                  "shard", "image_id", "class_id"]
CORRECTION_COLUMNS = ["image_id", "class_id", "label", "path", "class", "shard"]
DECISIONS = ("accept", "reject", "")
LABELS = {"1": 1, "+1": 1, "-1": -1, "0": 0}


class CorrectionsError(ValueError):
    """A review or corrections file that cannot be used; names the file, the line and the value."""


@dataclass
class Corrections:
    path: str
    sha256: str  # of the file's bytes: what run metadata records
    labels: dict[tuple[str, str], int] = field(default_factory=dict)  # (image_id, class_id) -> 1 | -1 | 0

    def by_image(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (image_id, class_id), label in self.labels.items():
            out.setdefault(image_id, {})[class_id] = label
        return out

    def meta(self) -> dict:
        """What a run records about the corrections it applied."""
        return {"corrections": self.path, "corrections_sha256": self.sha256, "corrections_rows": len(self.labels)}

    def arrow(self):
        import pyarrow as pa

        keys = list(self.labels)
        return pa.table({"image_id": pa.array([k[0] for k in keys], pa.string()),
                         "class_id": pa.array([k[1] for k in keys], pa.string()),
                         "label": pa.array([self.labels[k] for k in keys], pa.int32())})


def _rows(path: str | Path) -> tuple[bytes, list[str], list[tuple[int, dict]]]:
    from dart_core import storage

    try:
        data = storage.read_bytes(str(path))
    except FileNotFoundError:
        raise CorrectionsError(f"{path}: no such file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CorrectionsError(f"{path}: not a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    return data, header, [(i, row) for i, row in enumerate(reader, start=2)]


def _label(path, lineno: int, column: str, value) -> int:
    v = (value or "").strip()
    if v not in LABELS:
        raise CorrectionsError(f"{path} line {lineno}: {column} {v!r} is not 1, -1 or 0")
    return LABELS[v]


def read(path: str | Path) -> Corrections:
    """A corrections file, or a review file (its accepted rows), validated. Raises CorrectionsError
    naming the file and line of the first bad row."""
    data, header, rows = _rows(path)
    review = "decision" in header
    need = ["image_id", "class_id", "suggested_label" if review else "label"]
    missing = [c for c in need if c not in header]
    if missing:
        raise CorrectionsError(f"{path}: column {', '.join(missing)} missing (header: {','.join(header) or 'empty'}); "
                               "expected a corrections file (image_id,class_id,label) or a review file from "
                               "`dart audit --export`")
    out = Corrections(str(path), hashlib.sha256(data).hexdigest())
    for lineno, row in rows:
        if review:
            decision = (row.get("decision") or "").strip().lower()
            if decision not in DECISIONS:
                raise CorrectionsError(f"{path} line {lineno}: decision {row.get('decision')!r} is not accept, "
                                       "reject or empty")
            if decision != "accept":
                continue
        image_id, class_id = (row.get("image_id") or "").strip(), (row.get("class_id") or "").strip()
        if not image_id or not class_id:
            raise CorrectionsError(f"{path} line {lineno}: image_id and class_id must not be empty")
        label = _label(path, lineno, "suggested_label" if review else "label",
                       row.get("suggested_label" if review else "label"))
        old = out.labels.get((image_id, class_id))
        if old is not None and old != label:
            raise CorrectionsError(f"{path} line {lineno}: {image_id} / {class_id} is corrected twice, to {old} "
                                   f"and to {label}")
        out.labels[(image_id, class_id)] = label
    return out


def review_counts(path: str | Path) -> dict[str, int]:
    """accepted / rejected / pending rows of a review file (validated as `read` does)."""
    _, header, rows = _rows(path)
    if "decision" not in header:
        raise CorrectionsError(f"{path}: no decision column: not a review file from `dart audit --export`")
    counts = {"accept": 0, "reject": 0, "": 0}
    for lineno, row in rows:
        d = (row.get("decision") or "").strip().lower()
        if d not in counts:
            raise CorrectionsError(f"{path} line {lineno}: decision {row.get('decision')!r} is not accept, reject or empty")
        counts[d] += 1
    return {"accepted": counts["accept"], "rejected": counts["reject"], "pending": counts[""]}


def from_review(review_path: str | Path, out_path: str | Path) -> dict:
    """The accepted rows of a reviewed file as a corrections file at `out_path` (local or s3://).
    Returns the counts: accepted, rejected, pending (no decision yet), written."""
    from dart_core import storage

    counts = review_counts(review_path)
    corr = read(review_path)
    _, _, rows = _rows(review_path)
    info = {}
    for _, row in rows:
        if (row.get("decision") or "").strip().lower() == "accept":
            info[((row.get("image_id") or "").strip(), (row.get("class_id") or "").strip())] = row
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(CORRECTION_COLUMNS)
    for (image_id, class_id), label in corr.labels.items():
        r = info.get((image_id, class_id), {})
        w.writerow([image_id, class_id, label, r.get("path", ""), r.get("class", ""), r.get("shard", "")])
    storage.write_bytes(str(out_path), f.getvalue().encode())
    return {**counts, "written": len(corr.labels)}


def apply(con, corrections: Corrections) -> dict:
    """Redefine the `labels` view of a DuckDB connection (dart_core.evaluate.connect) with the
    corrections on top of the shard labels (sql/corrections.sql). Returns rows / matched / changed
    (sql/corrections_applied.sql)."""
    import sql as sqlfiles

    con.register("corrections_arrow", corrections.arrow())
    con.execute("CREATE OR REPLACE TABLE corrections AS SELECT * FROM corrections_arrow")
    con.unregister("corrections_arrow")
    con.execute(sqlfiles.load("corrections"))
    rows, matched, changed = con.execute(sqlfiles.load("corrections_applied")).fetchone()
    return {"rows": int(rows), "matched": int(matched), "changed": int(changed)}
