"""Extend a CRG to a vocabulary that has classes it does not know (annotating with classes never
trained on): the known classes keep their edges; the new ones get edges mined from the LLM (when the
caller passes a `mine` step) or, without one, from text similarity for the new classes only.

The LLM step is the caller's: it knows the endpoint, the API key and the answer cache (flows.crg),
which this library must not. `mine(classes_csv, out)` mines incrementally into the crg.json at `out`
(which already holds the old CRG: only the new classes are asked about)."""
from __future__ import annotations

from typing import Callable

from dart_core import storage


def new_class_ids(crg, vocab) -> list[str]:
    """The vocabulary's class ids the CRG does not know, in vocabulary order."""
    known = set(crg.class_ids)
    return [cid for cid in vocab.ids if cid not in known]


def extend_by_similarity(old, vocab, text_embeddings, new: list[str]):
    """`old` plus text-similarity edges for the classes `new` (`text_embeddings`: one row per
    vocabulary class); edges of classes no longer in the vocabulary are dropped."""
    from dart_core.crg.graph import CRG, similarity_crg

    sim = similarity_crg(vocab, text_embeddings, int(old.meta.get("n_neighbors", 8)))
    index = {cid: i for i, cid in enumerate(vocab.ids)}
    neighbors = {cid: nb for cid, nb in old.neighbors.items() if cid in index}
    neighbors.update({cid: sim.neighbors[cid] for cid in new})
    return CRG(list(vocab.ids), list(vocab.names), neighbors, old.source,
               meta={**old.meta, "added_by_similarity": new})


def add_new_classes(crg: str, classes_csv: str, pred_dir: str, backbone: str, pretrained: str | None,
                    log: Callable[[str], None] = print, device: str = "cpu",
                    mine: Callable[[str, str], object] | None = None) -> str:
    """The CRG path to annotate `classes_csv` with: `crg` itself when it knows every class, else a
    copy under `pred_dir` (local or s3://) extended to the new classes — by `mine` (the LLM) when
    given, else by text similarity of `backbone`'s text embeddings."""
    from dart_core.crg.graph import CRG
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.read_csv(classes_csv)
    old = CRG.read(crg)
    new = new_class_ids(old, vocab)
    if not new:
        return crg
    out = storage.join(pred_dir, "crg.json")  # a local path or an s3:// URL (CRG.write/read use storage)
    if mine is not None:
        old.write(out)
        log(f"{len(new)} new classes: mining their CRG edges from the LLM (incremental)")
        mine(classes_csv, out)
        return out
    log(f"{len(new)} new classes and no LLM endpoint configured: their CRG edges come from text similarity")
    from dart_core.backbone import FrozenBackbone
    from dart_core.devices import worker_device

    text = FrozenBackbone(backbone, pretrained, device=worker_device(device)).text_embeddings(list(vocab.names)).cpu().numpy()
    extend_by_similarity(old, vocab, text, new).write(out)
    return out
