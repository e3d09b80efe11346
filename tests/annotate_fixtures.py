"""A small shard set + a trained tiny DART checkpoint for the annotate / eval / audit tests."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dart_core.crg.graph import similarity_crg
from dart_core.vocab import Vocabulary

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
N_SHARDS, PER_SHARD = 4, 6


def picture(present: list[str]) -> bytes:
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    d = ImageDraw.Draw(im)
    for j, n in enumerate(present):
        d.rectangle([4 + 30 * j, 8, 28 + 30 * j, 56], fill=COLOURS[n])
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """A shard in the format of docs/data.md (tar + stats written last) with webdataset's TarWriter."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for key, jpg, labels in samples:
            w.write({"__key__": key, "jpg": jpg, "json": json.dumps({"id": key, "labels": labels}).encode()})
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"ok": len(samples), "inputs": len(samples)}))


def make_shards(root: Path, corrupt: bool = False, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD) -> list[str]:
    rng = random.Random(0)
    names = list(COLOURS)
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            present = rng.sample(names, 2)
            labels = {n: 1 for n in present}
            absent = [n for n in names if n not in present]
            labels[absent[0]] = -1  # one verified negative, one unknown
            key = f"img{s:02d}{i:02d}"
            samples.append((key, picture(present), labels))
            keys.append(key)
        if corrupt and s == 1:
            samples.insert(2, ("broken01", b"\xff\xd8\xff this is no jpeg", {"red": 1}))
        write_shard(root / f"{s:06d}.tar", samples)
    return keys


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_ckpt):
    """classes.csv (3 seen + 1 unseen), 4 shards of 6 images (+1 corrupt), crg.json, model.pt."""
    from dart_core.model import DART
    from dart_core.train import TrainConfig, fit
    from tests.model_fixtures import tiny_config

    root = tmp_path_factory.mktemp("annotate")
    vocab = Vocabulary.from_names(list(COLOURS), unseen={"yellow"})
    vocab.write_csv(root / "classes.csv")
    keys = make_shards(root / "shards" / "val", corrupt=True)
    torch.manual_seed(0)
    model = DART(tiny_config(pretrained=tiny_clip_ckpt))
    text = model.backbone.text_embeddings(list(vocab.names))
    crg = similarity_crg(vocab, text.numpy(), 2)
    crg.write(root / "crg.json")
    seen = vocab.subset("seen")
    model.set_classes(list(seen.names))
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 2, (8, 3), dtype=torch.int8) * 2 - 1
    fit(model, [(x, y)], seen, root / "run", TrainConfig(epochs=2, log_every=1000), log=lambda *_: None)
    return {"root": root, "classes": str(root / "classes.csv"), "shards": str(root / "shards"),
            "crg": str(root / "crg.json"), "checkpoint": str(root / "run" / "model.pt"), "keys": keys,
            "vocab": vocab, "clip": tiny_clip_ckpt}
