"""The embedded world: generator, folder source, localization metric, and the VLP's loading path."""
from __future__ import annotations

import csv
import json
import os
import random

import numpy as np
import pytest
import torch

from dart_core.world import generator as G
from dart_core.world.localization import localization_accuracy, localization_counts, patch_centres
from tests.conftest import every_page


def _bg(sample) -> tuple[int, int, int]:
    return G.SCENE_RULES[sample.scene].background


# ---- generator ---------------------------------------------------------------------------------
def test_generator_is_deterministic_for_a_seed_and_independent_of_n():
    a = list(G.generate(6, seed=3))
    b = list(G.generate(6, seed=3))
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.caption == y.caption
        assert [(o.box, o.classes) for o in x.objects] == [(o.box, o.classes) for o in y.objects]
        assert x.labels == y.labels
    # image i does not depend on how many images are generated, nor on a start offset
    assert [s.image.tobytes() for s in G.generate(3, seed=3)] == [s.image.tobytes() for s in a[:3]]
    assert next(G.generate(1, seed=3, start=4)).image.tobytes() == a[4].image.tobytes()
    # another seed or another stream gives other images
    assert a[0].image.tobytes() != next(G.generate(1, seed=4)).image.tobytes()
    assert a[0].image.tobytes() != next(G.generate(1, seed=3, stream="vlp")).image.tobytes()


def test_known_sample_exact_values():
    s = next(G.generate(1, seed=0))
    assert s.scene == "park"
    assert s.caption == ("a photo of a small striped yellow triangle, a big orange star and a small yellow ring "
                         "in a park.")
    assert [(o.kind, o.box, o.classes) for o in s.objects] == [
        ("triangle", (6, 33, 21, 48), ("triangle", "angular", "yellow", "striped", "small")),
        ("star", (34, 36, 60, 60), ("star", "spiky", "orange", "big")),
        ("ring", (26, 1, 39, 14), ("ring", "round", "yellow", "small")),
    ]
    assert s.positives() == ["yellow", "orange", "triangle", "star", "ring", "round", "angular", "spiky",
                             "striped", "small", "big", "park"]
    a = np.asarray(s.image)
    assert a.shape == (64, 64, 3)
    assert tuple(a[0, 0]) == (170, 215, 135)  # the park's lawn
    assert tuple(a[47, 13]) == G.COLOURS["yellow"]  # the triangle's base row, a plain stripe
    assert tuple(a[47 - 2, 13]) == G._shade(G.COLOURS["yellow"])  # its stripe ink two rows up
    assert tuple(a[48, 47]) == G.COLOURS["orange"]  # the star's centre
    assert tuple(a[7, 32]) == (170, 215, 135)  # the ring's hole shows the background


def _leaf_objects(sample):
    """Objects that own their pixels: simple shapes and composite parts (not the composite box)."""
    return [o for o in sample.objects if o.kind not in G.COMPOSITES]


def test_boxes_match_the_drawn_pixels():
    for s in G.generate(60, seed=1):
        a = np.asarray(s.image).astype(int)
        fg = (a != np.array(_bg(s))).any(-1)
        inside_any = np.zeros_like(fg)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            inside_any[y0:y1, x0:x1] = True
        # nothing is drawn outside the boxes
        assert not (fg & ~inside_any).any()
        leaves = _leaf_objects(s)
        for o in leaves:
            x0, y0, x1, y1 = o.box
            crop = fg[y0:y1, x0:x1]
            # tight: every edge row and column of the box holds some of the object's pixels
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any(), (s.caption, o)
            colour = next(c for c in o.classes if c in G.COLOURS) if any(c in G.COLOURS for c in o.classes) else None
            if colour is not None:
                ink = {G.COLOURS[colour], G._shade(G.COLOURS[colour])}
                px = {tuple(p) for p in a[y0:y1, x0:x1][crop]}
                # only the object's colour (and its texture ink) inside its own box
                assert px <= ink, (s.caption, o.kind, px - ink)
                assert G.COLOURS[colour] in px
        # leaf boxes never overlap: each pixel belongs to one object
        for i, p in enumerate(leaves):
            for q in leaves[i + 1:]:
                assert p.box[2] <= q.box[0] or q.box[2] <= p.box[0] or p.box[3] <= q.box[1] or q.box[3] <= p.box[1]


def test_labels_and_captions_agree_with_the_objects():
    n_parts = 0
    for s in G.generate(80, seed=2):
        present = {s.scene} | {c for o in s.objects for c in o.classes}
        assert {c for c, v in s.labels.items() if v == 1} == present
        assert set(s.labels) == set(G.CLASS_NAMES) and set(s.labels.values()) <= {1, -1}
        assert s.caption.endswith(G.SCENE_RULES[s.scene].phrase + ".")
        words = set(s.caption.rstrip(".").replace(",", "").split())
        for o in s.objects:
            if o.kind in G.SHAPES:  # simple objects are described in full
                assert set(o.classes) - {G.FAMILY_OF[o.kind]} <= words, (s.caption, o.classes)
                assert G.FAMILY_OF[o.kind] in o.classes
            elif o.kind in G.COMPOSITES:
                assert o.kind in words
            else:
                n_parts += 1
                assert o.kind.split(":")[0] in words
        # scene rule: an excluded colour is never drawn, not even as a part or texture ink
        a = np.asarray(s.image).reshape(-1, 3)
        for c in G.SCENE_RULES[s.scene].excluded_colours:
            assert s.labels[c] == -1
            assert not (a == np.array(G.COLOURS[c])).all(-1).any()
    assert n_parts > 0  # the seed exercised composites


def test_composite_parts_carry_their_shape_labels():
    found = set()
    for s in G.generate(200, seed=5):
        for o in s.objects:
            if o.kind == "house:roof":
                assert o.classes[:2] == ("triangle", "angular")
            elif o.kind in ("snowman:head", "snowman:body", "tree:crown", "car:wheel"):
                assert o.classes[:2] == ("circle", "round")
            if o.kind == "snowman":
                assert s.scene == "winter"  # co-occurrence rule: snowmen only in winter
            found.add(o.kind.split(":")[0])
    assert found == set(G.SHAPES) | set(G.COMPOSITES)


def test_vocabulary_split_and_unseen_names_are_caption_words():
    v = G.vocabulary()
    assert len(v) == 30
    assert v.ids == v.names == G.CLASS_NAMES
    assert {n for n, sp in zip(v.names, v.splits) if sp == "unseen"} == {
        "orange", "purple", "star", "diamond", "dotted", "snowman", "beach"}
    # every unseen class has at least one seen class in its group (something to transfer from)
    for g, members in G.GROUPS.items():
        assert any(m not in G.UNSEEN for m in members), g
    full = " ".join(s.caption for s in G.generate(300, seed=0))
    words = set(full.rstrip(".").replace(",", " ").replace(".", " ").split())
    assert G.UNSEEN <= words
    # the VLP's augmented captions name every class, family words included
    rng = random.Random(0)
    aug = set()
    for s in G.generate(300, seed=0, stream="vlp"):
        aug |= set(G.caption(s.scene, s.mentions, rng, p_drop=0.3, p_family=0.1).replace(",", " ")
                   .replace(".", " ").split())
    assert set(G.CLASS_NAMES) <= aug


def test_augmented_caption_is_seeded_and_drops_words():
    s = next(G.generate(1, seed=0))
    c1 = G.caption(s.scene, s.mentions, random.Random(7), p_drop=1.0)
    assert c1 == G.caption(s.scene, s.mentions, random.Random(7), p_drop=1.0)
    assert sorted(c1[len("a photo of "):-len(" in a park.")].replace(" and ", ", ").split(", ")) == [
        "a ring", "a star", "a triangle"]
    assert G.caption(s.scene, s.mentions, random.Random(0), p_family=1.0).count("shape") == 3


def test_partial_captions_and_one_concept_captions():
    from dart_core.world.vlp import VLPConfig, training_caption

    s = next(G.generate(1, seed=0))
    # p_scene 0: the scene phrase is gone; p_object tiny: exactly one object survives
    c = G.caption(s.scene, s.mentions, random.Random(1), p_object=1e-9, p_scene=0.0)
    assert c.endswith(".") and "park" not in c and " and " not in c and "," not in c
    cfg = VLPConfig(p_word=1.0)
    words = {training_caption(s, random.Random(i), cfg) for i in range(200)}
    assert words == {f"a photo of a {w}." for w in s.positives()}
    # p_word 0 and the rest off: the full caption, objects shuffled
    full = training_caption(s, random.Random(3), VLPConfig(p_word=0.0, p_drop=0.0, p_family=0.0, p_object=1.0,
                                                             p_scene=1.0))
    assert sorted(full[len("a photo of "):-len(" in a park.")].replace(" and ", ", ").split(", ")) == sorted(
        ["a small striped yellow triangle", "a big orange star", "a small yellow ring"])


# ---- folder source -----------------------------------------------------------------------------
def test_write_folder_source_exact_format(tmp_path):
    from dart_core.data.sources.folder import read_folder

    info = G.write_folder_source(tmp_path / "src", n_images=5, seed=0)
    root = tmp_path / "src"
    assert info["images"] == 5 and info["classes"] == 30
    rows = list(csv.reader(open(root / "labels.csv", newline="")))
    assert rows[0] == ["path", "labels"]
    assert [r[0] for r in rows[1:]] == [f"images/{i:06d}.png" for i in range(5)]
    first = next(G.generate(1, seed=0))
    assert rows[1][1] == "|".join(c if first.labels[c] == 1 else f"-{c}" for c in G.CLASS_NAMES)
    assert rows[1][1].startswith("-red|-green|-blue|yellow|-purple|orange|")
    assert (root / "classes.csv").read_text().splitlines()[:3] == ["id,name,split", "red,red,seen", "green,green,seen"]
    boxes = [json.loads(l) for l in open(root / "boxes.jsonl")]
    assert [b["path"] for b in boxes] == [r[0] for r in rows[1:]]
    assert boxes[0]["objects"][0] == {"box": [6, 33, 21, 48], "kind": "triangle",
                                       "classes": ["triangle", "angular", "yellow", "striped", "small"]}
    assert G.read_boxes(root / "boxes.jsonl")["images/000000.png"] == boxes[0]["objects"]
    caps = list(csv.reader(open(root / "captions.csv", newline="")))
    assert caps[1] == ["images/000000.png", first.caption]
    # the data plane's own reader ingests it with no failed row and the same labels
    src = read_folder(str(root))
    assert src.vocab == G.vocabulary()
    recs = list(src.records)
    assert [r.error for r in recs] == [None] * 5
    assert recs[0].labels == first.labels
    from PIL import Image
    assert Image.open(root / "images/000000.png").tobytes() == first.image.tobytes()  # png is lossless


# ---- localization ------------------------------------------------------------------------------
def test_patch_centres_row_major():
    c = patch_centres((2, 4), (64, 32))
    assert c.tolist() == [[8, 8], [24, 8], [40, 8], [56, 8], [8, 24], [24, 24], [40, 24], [56, 24]]


def test_localization_hand_made_case():
    # 2×2 grid over a 32×32 image: patch centres (8,8) (24,8) (8,24) (24,24)
    classes = ["a", "b", "c", "scene"]
    boxes = [[{"box": [0, 0, 16, 16], "classes": ["a"]},           # top-left
              {"box": [16, 16, 32, 32], "classes": ["b", "a"]}],  # bottom-right, carries a and b
             [{"box": [16, 0, 32, 16], "classes": ["c"]}]]         # top-right
    s = np.zeros((2, 4, 4))
    s[0, 3, 0] = 1.0  # a -> bottom-right: inside a's second box
    s[0, 1, 1] = 1.0  # b -> top-right: outside b's box
    s[0, 2, 2] = 5.0  # c is not in image 0: not counted
    s[1, :, 2] = 0.5  # c: a tie, the first patch (top-left) wins -> miss
    s[1, 1, 3] = 9.0  # scene has no box: never counted
    hits, pairs = localization_counts(s, (2, 2), boxes, classes, (32, 32))
    assert hits.tolist() == [1, 0, 0, 0] and pairs.tolist() == [1, 1, 1, 0]
    assert localization_accuracy(s, (2, 2), boxes, classes, (32, 32)) == pytest.approx(1 / 3)
    # labels restrict the pairs: b marked unknown in image 0 drops it
    labels = np.array([[1, 0, -1, 1], [-1, -1, 1, 1]])
    assert localization_accuracy(s, (2, 2), boxes, classes, (32, 32), labels=labels) == pytest.approx(1 / 2)
    assert localization_accuracy(s, (2, 2), boxes, classes, (32, 32), class_mask=[True, False, False, False]) == 1.0
    assert np.isnan(localization_accuracy(s, (2, 2), boxes, classes, (32, 32), class_mask=[False, False, False, True]))
    s[1, 1, 2] = 1.0  # c's top patch now top-right: a hit
    assert localization_accuracy(s, (2, 2), boxes, classes, (32, 32)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="grid"):
        localization_counts(s, (3, 3), boxes, classes, (32, 32))


def test_localization_of_ground_truth_masks_is_perfect():
    """Scores that are each object's own pixel mask put every top patch inside its box."""
    samples = list(G.generate(20, seed=9))
    names = list(G.CLASS_NAMES)
    grid = (8, 8)
    centres = patch_centres(grid, (64, 64))
    s = np.zeros((len(samples), 64, len(names)))
    for n, smp in enumerate(samples):
        for o in smp.objects:
            x0, y0, x1, y1 = o.box
            inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
            for c in o.classes:
                s[n, inside, names.index(c)] += 1
    boxes = [[{"box": list(o.box), "classes": list(o.classes)} for o in smp.objects] for smp in samples]
    labels = np.array([[smp.labels[c] for c in names] for smp in samples])
    hits, pairs = localization_counts(s, grid, boxes, names, (64, 64), labels)
    assert (hits == pairs).all() and pairs.sum() == int((labels == 1).sum()) - 20  # minus one scene each


# ---- the VLP -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlp(tmp_path_factory):
    from dart_core.world.vlp import VLPConfig, pretrain

    out = tmp_path_factory.mktemp("vlp") / "vlp.pt"
    cfg = VLPConfig(steps=2, batch_size=8, warmup=1, seed=0, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain(out, cfg, log=lambda m: None)
        # the VLP's thread count is its own: what ran after it (DART training in the demo) ran
        # single-threaded while it leaked
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    return out, cfg


def test_vlp_checkpoint_loads_through_open_clip_and_the_backbone(tiny_vlp):
    import open_clip

    from dart_core.backbone import FrozenBackbone, register_model_configs

    path, _ = tiny_vlp
    register_model_configs()
    saved = torch.load(path, weights_only=True)
    model = open_clip.create_model("dart-world-vit", pretrained=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fresh = open_clip.create_model("dart-world-vit")  # pretraining changed the weights
    assert not torch.equal(fresh.visual.conv1.weight, saved["visual.conv1.weight"])
    bb = FrozenBackbone("dart-world-vit", str(path))
    assert bb.grid_size == (8, 8) and bb.embed_dim == 128 and bb.n_layers == 4
    x = torch.zeros(2, 3, 64, 64)
    f = bb.forward_features(x, n_blocks=2)
    assert f.patch_features.shape == (2, 64, 128) and len(f.block_inputs) == 2
    assert torch.allclose(f.global_feature, bb.clip.encode_image(x), atol=1e-6)
    assert bb.text_embeddings(["red", "circle", "snowman"]).shape == (3, 128)
    meta = json.loads(open(str(path) + ".json").read())
    assert meta["config"]["steps"] == 2


def test_vlp_pretraining_is_deterministic(tiny_vlp, tmp_path):
    from dart_core.world.vlp import pretrain

    path, cfg = tiny_vlp
    again = pretrain(tmp_path / "again.pt", cfg, log=lambda m: None)
    a, b = torch.load(path, weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_shot_report_groups_and_chance(tiny_vlp):
    from dart_core.world.vlp import PAIR_GROUP, zero_shot_report

    path, _ = tiny_vlp
    lines = []
    rep = zero_shot_report(path, n_images=60, seed=1, log=lines.append)
    samples = list(G.generate(60, seed=1))
    y = np.array([[s.labels[c] for c in G.CLASS_NAMES] for s in samples])
    colours = [G.CLASS_NAMES.index(c) for c in G.COLOURS]
    prev = (y[:, colours] == 1).mean(0)
    assert rep["colour"]["chance"] == round(100 * float(prev[prev > 0].mean()), 1)
    assert rep["colour"]["classes"] == int((prev > 0).sum())
    assert set(rep) == set(G.GROUPS) | {PAIR_GROUP, "seen", "unseen", "all", "per_class"}
    assert all(0 <= r["mAP"] <= 100 for k, r in rep.items() if k != "per_class")
    assert lines[1].split() == ["group", "classes", "mAP", "chance"]


@pytest.mark.slow  # a temporary Prefect server and three flow runs
def test_pretrain_vlp_flow_is_cached_by_inputs(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.vlp import pretrain_vlp

    import datetime

    started = datetime.datetime.now(datetime.timezone.utc)  # the Prefect server is shared by the session
    params = dict(out_dir=str(tmp_path / "cache"), steps=2, batch_size=4, warmup=1, seed=0)
    first = pretrain_vlp(**params)
    assert first.startswith(str(tmp_path / "cache" / "dart-world-vit-")) and first.endswith(".pt")
    mtime = os.stat(first).st_mtime_ns
    # same inputs: served from the cache, the file is not rewritten
    assert pretrain_vlp(**params) == first and os.stat(first).st_mtime_ns == mtime
    # another seed is another checkpoint
    other = pretrain_vlp(**{**params, "seed": 1})
    assert other != first
    # the checkpoint deleted: trained again rather than returning a path to nothing
    os.unlink(first)
    assert pretrain_vlp(**params) == first and os.path.isfile(first)
    with get_client(sync_client=True) as client:
        runs = [tr for tr in every_page(client.read_task_runs)
                if tr.name.startswith("pretrain-vlp") and tr.created >= started]
    assert sorted(tr.state.name for tr in runs) == ["Cached", "Completed", "Completed", "Completed"]


@pytest.mark.slow  # a temporary Prefect server
def test_pretraining_the_vlp_logs_no_random_init_warning(prefect_harness, tmp_path):
    """Pretraining starts from random weights on purpose: open_clip's warning about that is dropped
    there (and only there: the same model built elsewhere still warns)."""
    import logging

    import open_clip

    from flows.vlp import pretrain_vlp

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root, collect = logging.getLogger(), Collect()
    root.addHandler(collect)  # open_clip warns on the root logger
    try:
        pretrain_vlp(out_dir=str(tmp_path / "cache"), steps=1, batch_size=2, warmup=1, seed=0)
        assert collect in root.handlers  # still listening: the check below is not vacuous
        assert [m for m in collect.messages if "pretrained weights" in m] == []
        open_clip.create_model("dart-world-vit")
        assert [m for m in collect.messages if "pretrained weights" in m] == [
            "No pretrained weights loaded for model 'dart-world-vit'. Model initialized randomly."]
    finally:
        root.removeHandler(collect)


# ---- the world's relations as a CRG ------------------------------------------------------------
def test_world_crg_finds_the_rules_relations():
    from dart_core.world.generator import UNSEEN
    from dart_core.world.relations import world_crg

    a, b = world_crg(800, seed=3), world_crg(800, seed=3)
    assert a.neighbors == b.neighbors and a.scores == b.scores  # deterministic for a seed
    assert a.source == "world" and set(a.neighbors) == set(a.class_ids) and len(a.class_ids) == 30
    for cid, nbrs in a.neighbors.items():
        assert len(nbrs) <= 8 and cid not in nbrs and not set(nbrs) & UNSEEN  # seen neighbours only
        assert all(s > 1.0 for s in a.scores[cid])  # positive association only
        assert a.scores[cid] == sorted(a.scores[cid], reverse=True)
    # the rules: snowmen are drawn in winter and are white; a star belongs to the spiky family;
    # a diamond to the angular one; a car's wheels are black circles
    assert a.neighbors["snowman"][0] == "winter" and "white" in a.neighbors["snowman"][:3]
    assert "spiky" in a.neighbors["star"][:2] and "angular" in a.neighbors["diamond"][:2]
    assert {"black", "round"} <= set(a.neighbors["car"])
    # never-co-occurring pairs are not neighbours (no yellow on the beach, no blue in winter)
    assert "yellow" not in a.neighbors["beach"] and "blue" not in a.neighbors["winter"]
