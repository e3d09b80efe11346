"""Fingerprints of a pipeline stage's inputs, and the record of the fingerprint each stage last
finished with (OUT/stages/<stage>.json): what lets `dart pipeline` skip a stage whose inputs have
not changed (flows/pipeline.py's module doc has the table of what each stage fingerprints)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dart_core import storage


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def bytes_sha(url: str | None) -> str | None:
    return storage.sha256(url) if url else None


def shard_set(split_dir: str) -> dict:
    """The complete shards of a split: how many, and a hash of their names and stats files' etags
    (a new shard, or a shard rewritten, changes it)."""
    from dart_core.data.shard_format import complete_tars

    objs = {o.key: o.etag for o in storage.list_objects(split_dir) if "/" not in o.key}
    tars = complete_tars(list(objs))
    stats = [t[:-len(".tar")] + "_stats.json" for t in tars]
    return {"shards": len(tars), "sha256": digest([(t, objs.get(t), objs.get(s)) for t, s in zip(tars, stats)])}


def weights_id(backbone: str, pretrained: str) -> str:
    from dart_core.backbone import file_sha256, is_weights_file

    if is_weights_file(backbone, pretrained):
        return "sha256:" + file_sha256(pretrained)
    return f"open_clip:{backbone}/{pretrained}"


class Stages:
    """OUT/stages/<stage>.json: the fingerprint of the inputs a stage last finished with."""

    def __init__(self, out: str):
        self.dir = Path(out) / "stages"

    def done(self, stage: str, fingerprint: str) -> dict | None:
        p = self.dir / f"{stage}.json"
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("fingerprint") == fingerprint else None

    def record(self, stage: str, fingerprint: str, outputs: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{stage}.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "outputs": outputs}, indent=1, default=str))
        tmp.replace(self.dir / f"{stage}.json")


def code_hash(paths) -> str:
    """A short hash of what files say as code: a Python file's syntax tree without docstrings
    (comments are not in the tree), so editing the prose changes nothing; any other file's bytes
    (a missing one counts as empty). What a cached artefact depends on besides its config."""
    import ast

    h = hashlib.sha256()
    for path in map(Path, paths):
        data = path.read_bytes() if path.exists() else b""
        if path.suffix == ".py":
            tree = ast.parse(data)
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]
            data = ast.dump(tree).encode()
        h.update(path.name.encode() + b"\0" + data)
    return h.hexdigest()[:16]


def training_code_hash() -> str:
    """What a trained variant also depends on: the model and training code (code_hash: editing
    docstrings or comments retrains nothing)."""
    import dart_core

    root = Path(dart_core.__file__).parent
    return code_hash(root / name for name in ("arm.py", "atm.py", "backbone.py", "losses.py", "model.py", "train.py"))
