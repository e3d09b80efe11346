"""The world's small VLP: an open_clip CLIP (config `dart-world-vit` in dart_core/model_configs)
pretrained contrastively on freshly generated world images and their captions with open_clip's
own `ClipLoss`, on CPU, deterministically for a seed and a thread count.

The checkpoint is a plain state_dict, so it loads the normal way:
`open_clip.create_model("dart-world-vit", pretrained=<file>)` or
`FrozenBackbone("dart-world-vit", pretrained=<file>)`.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dart_core.world import generator as G

MODEL_NAME = "dart-world-vit"


@dataclass
class VLPConfig:
    model_name: str = MODEL_NAME
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    p_drop: float = 0.3  # per attribute word: shape-only mentions teach shapes (see caption())
    p_family: float = 0.1  # name a shape by its family, so 'round'/'angular'/'spiky' are words too
    p_object: float = 0.7  # keep each object in the caption with this probability (>= 1 kept)
    p_scene: float = 0.5  # keep the scene phrase with this probability
    p_word: float = 0.3  # instead, a one-concept caption 'a photo of a {class}.' for a present class
    threads: int = 2  # part of the result (float reductions depend on it); 2 = this machine's cores
    n_images: int | None = None  # distinct images, cycled; None = a fresh image every time
    object_scale: float = 1.0  # the world's object sizes (generate_sample); evaluate on the same
    jpeg_quality: int | None = 90  # train on what DART will see: the shard writer re-encodes JPEG q90


def jpeg_roundtrip(im, quality: int | None):
    """The image as the shards hold it: the shard writer stores JPEG (quality 90 by default)."""
    if not quality:
        return im
    import io

    from PIL import Image

    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _image_tensor(images, mean, std, size: int, jpeg_quality: int | None = None) -> torch.Tensor:
    images = [jpeg_roundtrip(im, jpeg_quality) for im in images]
    arr = np.stack([np.asarray(im.resize((size, size), resample=3) if im.size != (size, size) else im)
                    for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _batch(cfg: VLPConfig, step: int, size: int, mean, std, tokenizer):
    """Images step*B..(step+1)*B of the VLP's own stream, with re-drawn (augmented) captions: an
    image seen twice (with n_images) gets a fresh caption each time."""
    samples, caps = [], []
    for j in range(cfg.batch_size):
        idx = step * cfg.batch_size + j
        img_idx = idx % cfg.n_images if cfg.n_images else idx
        s = G.generate_sample(G.sample_rng(cfg.seed, img_idx, stream="vlp"), size, object_scale=cfg.object_scale)
        cap_rng = random.Random(f"dart-vlp-caption:{cfg.seed}:{idx}")
        samples.append(s.image)
        caps.append(training_caption(s, cap_rng, cfg))
    return _image_tensor(samples, mean, std, size, cfg.jpeg_quality), tokenizer(caps)


def training_caption(sample, rng: random.Random, cfg: VLPConfig) -> str:
    """One of the sample's possible captions. One-concept captions ground each word on its own
    (a full-scene caption can be matched on the scene and one colour alone); the rest are partial,
    re-worded descriptions of the image (G.caption)."""
    if cfg.p_word and rng.random() < cfg.p_word:
        return f"a photo of a {rng.choice(sample.positives())}."
    return G.caption(sample.scene, sample.mentions, rng, cfg.p_drop, cfg.p_family, cfg.p_object, cfg.p_scene)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` for the block and restored after: the count is part
    of a deterministic result here, but must not leak into the caller (a demo process that
    pretrains first would otherwise train DART single-threaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_at(step: int, cfg: VLPConfig) -> float:
    if step < cfg.warmup:  # linear warm-up, then cosine to 0 (open_clip's cosine_lr)
        return cfg.lr * (step + 1) / cfg.warmup
    e = step - cfg.warmup
    es = max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr


def pretrain(out_path: str | Path, cfg: VLPConfig | None = None, log=print) -> Path:
    """Train from scratch for cfg.steps and save the state_dict to `out_path` (atomically), with a
    `<out_path>.json` sidecar holding the config, final loss and wall time."""
    from dart_core.backbone import register_model_configs

    cfg = cfg or VLPConfig()
    register_model_configs()
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    with torch_threads(cfg.threads):
        try:
            return _pretrain(out_path, cfg, log)
        finally:
            torch.use_deterministic_algorithms(False)


def _pretrain(out_path: Path | str, cfg: VLPConfig, log) -> Path:
    import open_clip

    model = open_clip.create_model(cfg.model_name)
    model.train()
    tok = open_clip.get_tokenizer(cfg.model_name)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size
    loss_fn = open_clip.ClipLoss()
    # open_clip's recipe: no weight decay on gains, biases, embeddings' scale and logit_scale
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in n or "bn" in n or "ln" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": cfg.weight_decay}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    t0 = time.time()
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        images, texts = _batch(cfg, step, size, pp["mean"], pp["std"], tok)
        img_f, txt_f, scale = model(images, texts)[:3]  # normalised features, logit_scale.exp()
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == cfg.steps - 1:
            log(f"vlp step {step}/{cfg.steps} loss {np.mean(losses[-25:]):.3f} "
                f"lr {_lr_at(step, cfg):.2e} scale {model.logit_scale.exp().item():.1f} "
                f"{time.time() - t0:.0f}s")
    wall = time.time() - t0
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out_path)
    meta = {"config": asdict(cfg), "final_loss": float(np.mean(losses[-25:])), "wall_s": round(wall, 1)}
    Path(str(out_path) + ".json").write_text(json.dumps(meta, indent=1))
    return out_path


# ---- zero-shot evaluation --------------------------------------------------------------------
PAIR_GROUP = "colour+shape"


def eval_set(n_images: int, seed: int, image_size: int, object_scale: float = 1.0):
    """World images for evaluation: the "world" stream (the VLP never trains on it)."""
    return list(G.generate(n_images, seed, image_size, stream="world", object_scale=object_scale))


def pair_labels(samples) -> tuple[list[str], np.ndarray]:
    """Labels for 'red circle'-style pairs: an object (simple or part) of that colour and shape."""
    names = [f"{c} {s}" for s in G.SHAPES for c in G.COLOURS]
    y = -np.ones((len(samples), len(names)), np.int8)
    index = {n: i for i, n in enumerate(names)}
    for r, s in enumerate(samples):
        for o in s.objects:
            shapes = [c for c in o.classes if c in G.SHAPES]
            cols = [c for c in o.classes if c in G.COLOURS]
            for sh in shapes:
                for co in cols:
                    y[r, index[f"{co} {sh}"]] = 1
    return names, y


@torch.no_grad()
def zero_shot_scores(model_name: str, checkpoint: str | Path | None, samples, names: list[str],
                     template: str = "a photo of a {}.", threads: int = 2,
                     jpeg_quality: int | None = 90) -> np.ndarray:
    """(N, C) cosine similarity of each image's CLIP embedding with each name's prompt."""
    from dart_core.backbone import FrozenBackbone

    with torch_threads(threads):
        bb = FrozenBackbone(model_name, str(checkpoint) if checkpoint else None, prompt_template=template)
        pp = bb.preprocess.transforms[-1]  # Normalize
        size = bb.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        txt = bb.text_embeddings(names)
        out = []
        for i in range(0, len(samples), 256):
            x = _image_tensor([s.image for s in samples[i:i + 256]], pp.mean, pp.std, size, jpeg_quality)
            out.append(F.normalize(bb.clip.encode_image(x).float(), dim=-1) @ txt.T)
        return torch.cat(out).numpy()


def zero_shot_report(checkpoint: str | Path | None, model_name: str = MODEL_NAME, n_images: int = 1000,
                     seed: int = 12345, template: str = "a photo of a {}.", jpeg_quality: int | None = 90,
                     object_scale: float = 1.0, log=print) -> dict:
    """Zero-shot mAP (percent) of the VLP per class group vs chance, on `n_images` world images.

    chance = the mean over the group's classes of the positive rate, which is the expected AP of
    a random ranking (up to small-sample terms). Returns {group: {"mAP", "chance", "classes"}}
    plus "seen"/"unseen" over the vocabulary's split."""
    import open_clip

    from dart_core.backbone import register_model_configs
    from dart_core.metrics import average_precision

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    samples = eval_set(n_images, seed, cfg["vision_cfg"]["image_size"], object_scale)
    names = list(G.CLASS_NAMES)
    y = np.array([[s.labels[c] for c in names] for s in samples], np.int8)
    pnames, py = pair_labels(samples)
    scores = zero_shot_scores(model_name, checkpoint, samples, names + pnames, template, jpeg_quality=jpeg_quality)
    ap = average_precision(scores[:, :len(names)], y)
    pap = average_precision(scores[:, len(names):], py)
    prev = (y == 1).mean(0)
    pprev = (py == 1).mean(0)
    report = {}

    def add(group, aps, prevs):
        ok = ~np.isnan(aps)
        report[group] = {"mAP": round(100 * float(aps[ok].mean()), 1),
                         "chance": round(100 * float(prevs[ok].mean()), 1), "classes": int(ok.sum())}

    for g, members in G.GROUPS.items():
        idx = [names.index(m) for m in members]
        add(g, ap[idx], prev[idx])
    add(PAIR_GROUP, pap, pprev)
    unseen = np.array([n in G.UNSEEN for n in names])
    add("seen", ap[~unseen], prev[~unseen])
    add("unseen", ap[unseen], prev[unseen])
    add("all", ap, prev)
    log(f"zero-shot mAP of {model_name} ({checkpoint}) on {n_images} world images (seed {seed}, "
        f"jpeg {jpeg_quality}), template {template!r}")
    log(f"{'group':<14}{'classes':>8}{'mAP':>8}{'chance':>8}")
    for g, r in report.items():
        log(f"{g:<14}{r['classes']:>8}{r['mAP']:>8.1f}{r['chance']:>8.1f}")
    report["per_class"] = {n: round(100 * float(a), 1) for n, a in zip(names, ap)}
    return report


def main(argv=None) -> None:
    """python -m dart_core.world.vlp OUT.pt [--steps N] [--batch-size B] [--lr LR] ... then the report."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("out")
    for f in VLPConfig.__dataclass_fields__.values():
        if f.name != "model_name":
            typ = int if f.name in ("n_images", "jpeg_quality") else type(f.default)
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default)
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--report-only", action="store_true")
    a = vars(p.parse_args(argv))
    out, n_eval, only = a.pop("out"), a.pop("eval_images"), a.pop("report_only")
    cfg = VLPConfig(**a)
    if not only:
        t = time.time()
        pretrain(out, cfg)
        print(f"pretrained in {time.time() - t:.0f}s -> {out}")
    zero_shot_report(out, cfg.model_name, n_eval, jpeg_quality=cfg.jpeg_quality, object_scale=cfg.object_scale)


if __name__ == "__main__":
    main()
