"""The shard format, in one place: everything that writes or reads shards imports it from here.

A shard folder (`OUT/<split>/`, local or s3://) holds, per shard number n (6 digits):
    NNNNNN.tar          webdataset tar: per sample `<key>.jpg` then `<key>.json`, consecutive
    NNNNNN.parquet      the sidecar: one ROW_SCHEMA row per input (ok and failed, with reasons)
    NNNNNN_stats.json   counts and provenance; published last, so it is the done marker:
                        a shard is complete exactly when its stats file exists
The sample JSON is {"id": key, "labels": {class id: +1|-1|0}, "source": {...}}.

The shard id — the `shard` column of the sidecar, `shard` in the stats file, the `shard=`
partition and `_done/<id>.json` marker of the predictions — is `<split>-<NNNNNN>` (e.g.
`train-000003`): the shard folder's name and the shard number, unique across the splits of a
dataset. `shard_id(url)` computes it from a shard's URL (any of its three files).
"""
from __future__ import annotations

import json
import re
import tarfile

TAR, SIDECAR, STATS = ".tar", ".parquet", "_stats.json"
SUFFIXES = (TAR, SIDECAR, STATS)
SHARD_RE = re.compile(r"^(\d{6})(\.tar|\.parquet|_stats\.json)$")
MAX_SHARD = 999_999  # six digits
IMAGE, META = "jpg", "json"  # member extensions: <key>.jpg, <key>.json


# ---- names and ids ------------------------------------------------------------------------------
def shard_name(i: int) -> str:
    """The file-name stem of shard number i: `000003`."""
    return f"{i:06d}"


def file_name(i: int, suffix: str) -> str:
    """`000003.tar`, `000003.parquet`, `000003_stats.json`."""
    return shard_name(i) + suffix


def parse_name(name: str) -> tuple[int, str] | None:
    """(shard number, suffix) of a shard file name, or None for any other name."""
    m = SHARD_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def scan(names) -> tuple[set[int], set[int]]:
    """(complete, present) shard numbers among a folder's file names: complete = has a stats file."""
    complete, present = set(), set()
    for name in names:
        p = parse_name(name)
        if p:
            present.add(p[0])
            if p[1] == STATS:
                complete.add(p[0])
    return complete, present


def complete_tars(names) -> list[str]:
    """Tar names of the complete shards (tar and stats file both present), sorted."""
    names = set(names)
    return [file_name(i, TAR) for i in sorted(scan(names)[0]) if file_name(i, TAR) in names]


def stats_url(url: str) -> str:
    """The stats file (done marker) of the shard whose tar / sidecar URL is `url`."""
    s = str(url)
    for suffix in (TAR, SIDECAR):
        if s.endswith(suffix):
            return s[: -len(suffix)] + STATS
    return s


def shard_id(url: str) -> str:
    """`<folder>-<NNNNNN>` for a shard file URL (`.../val/000003.tar` -> `val-000003`); the one
    shard id of the sidecar, the stats file and the predictions."""
    parts = str(url).replace("\\", "/").rstrip("/").split("/")
    stem = parts[-1]
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{parts[-2]}-{stem}" if len(parts) > 1 and parts[-2] else stem


# ---- members ------------------------------------------------------------------------------------
def member_names(key: str) -> tuple[str, str]:
    """The tar members of one sample, in order: (`<key>.jpg`, `<key>.json`)."""
    return f"{key}.{IMAGE}", f"{key}.{META}"


def sample_json(key: str, labels: dict, source: dict) -> bytes:
    return json.dumps({"id": key, "labels": labels, "source": source}, separators=(",", ":"), sort_keys=True).encode()


TAR_BLOCK, TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member exactly as `tarfile.addfile` writes it in PAX format (no 100-character name
    limit): header + data padded to 512 bytes; mode 0444 and mtime 0, so tars are reproducible."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % TAR_BLOCK)


def sample_tar_bytes(key: str, jpg: bytes, meta_json: bytes) -> bytes:
    """A sample's two members, consecutive (webdataset groups them by key)."""
    jpg_name, json_name = member_names(key)
    return tar_member(jpg_name, jpg) + tar_member(json_name, meta_json)


def tar_end(size: int) -> bytes:
    """What closes a tar of `size` bytes: two zero blocks, then zeros up to a whole record (as
    `tarfile.TarFile.close` writes)."""
    end = size + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-end % TAR_RECORD))


def valid_member(sample: dict) -> bool:
    """A webdataset sample is usable when it has both members and no path in its key."""
    key = sample.get("__key__", "")
    return IMAGE in sample and META in sample and "/" not in key and ".." not in key


def labels_tensor(meta: dict, index: dict[str, int], n: int):
    """json labels {class id: ±1} -> int8 (n,) in vocabulary order; ids outside the vocab ignored."""
    import torch

    t = torch.zeros(n, dtype=torch.int8)
    for cid, v in (meta.get("labels") or {}).items():
        i = index.get(cid)
        if i is not None:
            t[i] = 1 if v > 0 else -1 if v < 0 else 0
    return t


class SampleDecoder:
    """Picklable webdataset sample -> (image tensor | None, labels int8, key, error | None).

    strict=True (training reader): a bad sample raises. strict=False (annotation): it never raises;
    a corrupt sample comes back with its error message and the shard goes on."""

    def __init__(self, class_ids, preprocess, strict: bool = True):
        self.index = {cid: i for i, cid in enumerate(class_ids)}
        self.n = len(self.index)
        self.preprocess = preprocess
        self.strict = strict

    def __call__(self, sample: dict):
        import io

        import torch
        from PIL import Image

        key = sample.get("__key__", "?")
        try:
            labels = labels_tensor(json.loads(sample[META]), self.index, self.n)
        except Exception as e:  # noqa: BLE001 — recorded, not raised (strict: raised)
            if self.strict:
                raise
            return None, torch.zeros(self.n, dtype=torch.int8), key, f"bad json: {type(e).__name__}: {e}"
        if IMAGE not in sample:
            if self.strict:
                raise KeyError(f"{key}: sample has no {IMAGE} member")
            return None, labels, key, f"sample has no {IMAGE} member"
        try:
            with Image.open(io.BytesIO(sample[IMAGE])) as im:
                img = self.preprocess(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            if self.strict:
                raise
            return None, labels, key, f"undecodable image: {type(e).__name__}: {e}"
        return img, labels, key, None


# ---- sidecar and stats --------------------------------------------------------------------------
def row_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("error", pa.string()),
        ("path", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("out_width", pa.int32()), ("out_height", pa.int32()), ("jpg_bytes", pa.int64()),
        ("n_pos", pa.int32()), ("n_neg", pa.int32()), ("source", pa.string()),
    ])


def __getattr__(name):  # ROW_SCHEMA without importing pyarrow into readers that never need it
    if name == "ROW_SCHEMA":
        return row_schema()
    raise AttributeError(name)


def read_stats(store, i: int) -> dict:
    """The stats file of shard i of a ShardDir-like store."""
    return json.loads(store.read_bytes(file_name(i, STATS)))


def stats_bytes(stats: dict) -> bytes:
    return json.dumps(stats, indent=1).encode()


def sample_count(tar_url: str) -> int:
    """ok samples of one shard, from its stats file (0 when it has none or it is unreadable)."""
    from dart_core import storage

    try:
        return int(json.loads(storage.read_bytes(stats_url(tar_url)))["ok"])  # failed inputs have no image
    except (OSError, ValueError, KeyError):
        return 0
