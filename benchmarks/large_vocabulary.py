"""The bounded MM-ATM at Open Images scale, on a *trained* demo model: quality and cost.

    python benchmarks/large_vocabulary.py --demo WORKDIR [--classes 7586] [--m 64 256 1024]
                                          [--images 600] [--batch 50] [--neighbors 12]

WORKDIR is a finished `dart demo --workdir WORKDIR` (its trained DART, world CRG and test shards).
The vocabulary is the world's 30 classes plus distractor names up to --classes: every attribute
combination of the world's own words first ("striped red circle", "big dotted", ... — the hardest
distractors, close to the real classes in the text space), then "object NNNN". The real classes
keep their world-CRG neighbours (as in the demo); the distractors get top-N text-similarity
neighbours (`similarity_crg`, the paper's "Sim."), N = --neighbors.

For the exact MM-ATM (every class, M = 0) and the bounded one (each image's top-M classes by the
pre-ATM score, the rest keep that score) it reports, over the test images:
  * recall@10: the share of each image's exact top-10 classes that are among its M candidates;
  * top-10 agreement: the share of the exact top-10 that the bounded model also ranks top-10;
  * mAP (GZSL and ZSL) on the 30 real classes, scored among all the distractors, and its change;
  * seconds per image of the model forward, and the ratio to the frozen backbone's `encode_image`
    timed in the same run (one torch thread).
The same figures for the demo's own 30-class vocabulary give the reference mAP.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def distractor_names(real: list[str], total: int) -> list[str]:
    from dart_core.world import generator as G

    words = [tuple(G.SIZES), tuple(G.TEXTURES), tuple(G.COLOURS), tuple(G.SHAPES) + tuple(G.COMPOSITES)]
    seen = set(real)
    out: list[str] = []
    # attribute combinations of 2 to 4 of the world's words, in a fixed order
    for r in (2, 3, 4):
        for groups in itertools.combinations(range(4), r):
            for combo in itertools.product(*(words[g] for g in groups)):
                name = " ".join(combo)
                if name not in seen:
                    seen.add(name)
                    out.append(name)
    i = 0
    while len(out) < total - len(real):
        out.append(f"object {i:04d}")
        i += 1
    return out[: total - len(real)]


def load(demo: Path):
    from dart_core.checkpoint import load_model
    from dart_core.crg.graph import CRG
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.read_csv(demo / "shards" / "classes.csv")
    model, _ = load_model(str(demo / "runs" / "dart" / "model.pt"), device="cpu")
    model.eval()
    return model, vocab, CRG.read(demo / "crg.json")


def test_batches(demo: Path, model, vocab, images: int, batch: int):
    from dart_core.data.reader import make_loader

    out_x, out_y = [], []
    n = 0
    for x, y, _ in make_loader(str(demo / "shards" / "test"), vocab, model.backbone.preprocess, batch, train=False):
        out_x.append(x)
        out_y.append(y)
        n += len(x)
        if n >= images:
            break
    x, y = torch.cat(out_x)[:images], torch.cat(out_y)[:images]
    return x.split(batch), y.numpy()


def big_vocabulary(model, vocab, crg, total: int, neighbors: int):
    """(names, edge_index) over the real classes + distractors; real classes keep their CRG edges."""
    from dart_core.crg.graph import CRG, similarity_crg
    from dart_core.vocab import Vocabulary

    names = list(vocab.names) + distractor_names(list(vocab.names), total)
    big = Vocabulary.from_names(names, unseen=set(vocab.subset("unseen").names))
    text = model.backbone.text_embeddings(names)
    sim = similarity_crg(big, text.numpy(), neighbors)
    real = set(vocab.ids)
    merged = {cid: (crg.neighbors.get(cid, []) if cid in real else sim.neighbors[cid]) for cid in big.ids}
    graph = CRG(list(big.ids), list(big.names), merged, "world + similarity", {}, {"n_neighbors": neighbors})
    return names, graph.edge_index(big), text


def scores(model, batches, M: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(final logits, pre-ATM candidate logits, seconds) over all batches with mm_candidates=M."""
    model.mm_candidates = M
    out, t = [], 0.0
    with torch.no_grad():
        for x in batches:
            t0 = time.perf_counter()
            out.append(model(x, with_priors=False).logits)
            t += time.perf_counter() - t0
    return torch.cat(out).numpy(), t


def pre_atm_topm(model, batches, M: int) -> np.ndarray:
    """Each image's M candidate classes, chosen as the bounded forward chooses them."""
    import torch.nn.functional as F

    cands = []
    with torch.no_grad():
        for x in batches:
            feats = model.backbone.forward_features(x, model.cfg.arm_layers if model.arm is not None else 0)
            x_orig = feats.patch_features.float()
            x_ref = x_orig + model.arm(feats).float() if model.arm is not None else x_orig
            x_ref_n = F.normalize(x_ref, dim=-1)
            patch_logits = model.scale * x_ref_n @ model.text.T
            g = F.normalize(feats.global_feature.float(), dim=-1)
            x_vis = model.class_attentive(x_ref_n, g, model.select_patches(patch_logits))
            logits = model.scale * torch.einsum("bcd,cd->bc", F.normalize(x_vis, dim=-1), model.text)
            cands.append(logits.topk(M, dim=1).indices)
    return torch.cat(cands).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True, type=Path)
    ap.add_argument("--classes", type=int, default=7586)
    ap.add_argument("--m", type=int, nargs="*", default=[64, 256, 1024])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--neighbors", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from dart_core.metrics import mean_average_precision

    model, vocab, crg = load(a.demo)
    batches, y = test_batches(a.demo, model, vocab, a.images, a.batch)
    R = len(vocab)
    unseen = np.array([s == "unseen" for s in vocab.splits])

    def maps(s: np.ndarray) -> tuple[float, float]:
        return 100 * mean_average_precision(s[:, :R], y), 100 * mean_average_precision(s[:, :R][:, unseen], y[:, unseen])

    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model.backbone.clip.encode_image(x)
    t_backbone = time.perf_counter() - t0
    n = sum(len(x) for x in batches)

    model.set_classes(list(vocab.names), crg.edge_index(vocab))
    small, t_small = scores(model, batches, 0)
    g30, z30 = maps(small)
    print(f"{n} test images; {R} real classes; backbone encode_image {1000 * t_backbone / n:.1f} ms/image")
    print(f"own vocabulary ({R} classes): GZSL mAP {g30:.2f}  ZSL mAP {z30:.2f}  "
          f"forward {1000 * t_small / n:.1f} ms/image ({t_small / t_backbone:.2f}x backbone)")

    names, edges, text = big_vocabulary(model, vocab, crg, a.classes, a.neighbors)
    model.set_classes(names, edges, text=text)
    exact, t_exact = scores(model, batches, 0)
    ge, ze = maps(exact)
    top10 = np.argsort(-exact, axis=1)[:, :10]
    print(f"{len(names)} classes, exact MM-ATM: GZSL mAP {ge:.2f}  ZSL mAP {ze:.2f} (real classes among "
          f"the distractors)  forward {1000 * t_exact / n:.1f} ms/image ({t_exact / t_backbone:.2f}x backbone)")
    print("   M  recall@10  top-10 agree  GZSL mAP (change)  ZSL mAP (change)  ms/image  x backbone  x exact")
    for M in a.m:
        bounded, t_b = scores(model, batches, M)
        cand = pre_atm_topm(model, batches, M)
        recall = np.mean([len(set(top10[i]) & set(cand[i])) / 10 for i in range(n)])
        agree = np.mean([len(set(top10[i]) & set(np.argsort(-bounded[i])[:10])) / 10 for i in range(n)])
        gb, zb = maps(bounded)
        print(f"{M:4d}  {recall:9.3f}  {agree:12.3f}  {gb:8.2f} ({gb - ge:+.2f})  {zb:8.2f} ({zb - ze:+.2f})"
              f"  {1000 * t_b / n:8.1f}  {t_b / t_backbone:10.2f}  {t_b / t_exact:7.2f}")


if __name__ == "__main__":
    main()
