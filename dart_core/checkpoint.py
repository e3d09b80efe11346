"""DART checkpoints: only the trainable weights + config + vocabulary + backbone identity.

Loaded with `torch.load(weights_only=True)`: the file holds tensors and plain containers only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dart_core import __version__
from dart_core.model import DART, DARTConfig
from dart_core.vocab import Vocabulary

FORMAT = "dart-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested backbone or vocabulary; names what differs."""


def vocab_record(vocab: Vocabulary) -> dict:
    return {"hash": vocab.hash(), "ids": list(vocab.ids), "names": list(vocab.names), "splits": list(vocab.splits)}


def save_checkpoint(path: str | Path, model: DART, vocab: Vocabulary, extra: dict | None = None) -> None:
    """Atomic write (temp file + rename): a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "code_version": __version__,
        "config": model.cfg.to_dict(),
        # pretrained: an open_clip tag, or a weights file by its absolute path + content hash
        "backbone": {"name": model.cfg.backbone, "pretrained": model.cfg.pretrained,
                     "pretrained_sha256": getattr(model.backbone, "pretrained_sha256", None),
                     "fingerprint": model.backbone_fingerprint()},
        "vocab": vocab_record(vocab),
        "state_dict": model.trainable_state_dict(),
    }
    doc.update(extra or {})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(doc, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle errors, truncated files, foreign objects refused by weights_only
        # not torch's message: it advises weights_only=False, which runs whatever code the file holds
        raise CheckpointError(f"{path}: not a readable DART checkpoint (corrupt, truncated, or not written by "
                              "`dart train`)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a DART checkpoint (format {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    return doc


def backbone_change(doc: dict, model: DART) -> str | None:
    """None when `model` runs on the frozen weights the checkpoint was trained on, else what
    differs. Weights files are compared by content hash, not by how their path is spelled;
    otherwise (tags, checkpoints from before the hash was stored) by the weight fingerprint."""
    old = doc["backbone"]
    if old["name"] != model.cfg.backbone:
        return f"backbone {old['name']} vs {model.cfg.backbone}"
    a, b = old.get("pretrained_sha256"), getattr(model.backbone, "pretrained_sha256", None)
    if a and b:
        return None if a == b else (f"weights {old['pretrained']} (sha256 {a[:16]}) vs {model.cfg.pretrained} "
                                    f"(sha256 {b[:16]})")
    fp = model.backbone_fingerprint()
    return None if old["fingerprint"] == fp else (f"weights {old['pretrained']} ({old['fingerprint']}) vs "
                                                  f"{model.cfg.pretrained} ({fp})")


def check_vocabulary(doc: dict, vocab: Vocabulary, where: str, exact: bool = False) -> None:
    """Training resumes only on the same vocabulary; scoring may add classes but must keep every
    trained class with its name (the weights learnt nothing class-specific, the text did)."""
    rec = doc["vocab"]
    if exact:
        if rec["hash"] != vocab.hash():
            raise CheckpointError(f"{where}: trained on vocabulary {rec['hash']} ({len(rec['ids'])} classes), "
                                  f"this one is {vocab.hash()} ({len(vocab)} classes)")
        return
    have = dict(zip(vocab.ids, vocab.names))
    for cid, name in zip(rec["ids"], rec["names"]):
        if cid not in have:
            raise CheckpointError(f"{where}: trained class {cid!r} ({name!r}) is missing from the vocabulary")
        if have[cid] != name:
            raise CheckpointError(f"{where}: class {cid!r} was {name!r} in training, the vocabulary names it {have[cid]!r}")


def load_model(path: str | Path, device: str = "cpu", backbone: str | None = None,
               pretrained: str | None = None, doc: dict | None = None) -> tuple[DART, dict]:
    """Rebuild DART from a checkpoint. `backbone`/`pretrained` may point at the same weights in
    another place (e.g. a local copy); the weight fingerprint must still match."""
    doc = doc or read_checkpoint(path)
    cfg = DARTConfig.from_dict(doc["config"])
    if backbone is not None and backbone != cfg.backbone:
        raise CheckpointError(f"{path}: trained on backbone {cfg.backbone!r}, asked to load onto {backbone!r}")
    if pretrained is not None:
        cfg.pretrained = pretrained
    elif doc["backbone"].get("pretrained_sha256") and not Path(cfg.pretrained).is_file():
        raise CheckpointError(f"{path}: trained on the backbone weights {cfg.pretrained} "
                              f"(sha256 {doc['backbone']['pretrained_sha256'][:16]}), which are no longer there")
    model = DART(cfg, device=device)
    fp = model.backbone_fingerprint()
    if fp != doc["backbone"]["fingerprint"]:
        raise CheckpointError(f"{path}: trained on {doc['backbone']['name']}/{doc['backbone']['pretrained']} "
                              f"(weights {doc['backbone']['fingerprint']}), but {cfg.backbone}/{cfg.pretrained} "
                              f"has weights {fp}")
    expected = set(model.trainable_state_dict())
    got = set(doc["state_dict"])
    if expected != got:
        missing, unexpected = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise CheckpointError(f"{path}: weights do not fit this DART config (missing {missing}, unexpected {unexpected})")
    shapes = model.trainable_state_dict()
    for k, v in doc["state_dict"].items():
        if shapes[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(shapes[k].shape)}")
    model.load_state_dict(doc["state_dict"], strict=False)
    return model, doc


def zero_shot_checkpoint(path: str | Path, backbone: str, pretrained: str, classes_csv: str) -> str:
    """A 'DART' with neither ARM nor ATM: no trainable weight; scored in zero_shot mode it is the
    frozen VLP itself, and it goes through exactly the same annotate/eval code as DART."""
    m = DART(DARTConfig(backbone=backbone, pretrained=pretrained, use_arm=False, use_atm=False))
    save_checkpoint(path, m, Vocabulary.read_csv(classes_csv).subset("seen"))
    return str(path)
