"""The CRG mining prompt (paper App. C.4), in our own words with the paper's structure.

Structure kept from the paper's "black box" prompt, in the same order:
  1. the new (target) category and the list of known candidate categories,
  2. the five relationship types,
  3. per related category: relationship type, association strength High/Medium/Low, explanation,
  4. a worked example ("nature" against a short list),
  5. the required output format ("Related Category <n>: <name>" + three bullet lines).

The prompt text is versioned (PROMPT_VERSION): changing a word changes every prompt hash and so
every cache key, which is what we want (old answers were given to a different question).
"""
from __future__ import annotations

import hashlib
import json

PROMPT_VERSION = "crg-prompt-v1"

RELATIONSHIP_TYPES = (
    ("Synonymy/Similarity", "the two categories mean (nearly) the same thing or look very much alike"),
    ("Is-a/Hypernym", "one category is a broader or a narrower kind of the other"),
    ("Functional Relationship", "what one category is used for or does involves the other"),
    ("Co-occurrence", "the two categories are often seen together in the same scene or setting"),
    ("Part-Whole Relationship", "one category is a part, component or property of the other"),
)

STRENGTHS = ("High", "Medium", "Low")

_EXAMPLE = """\
Example.
New category: nature
Known categories: natural, fauna, wildlife, flora, scenic, outdoors, cliff, blossoms, insect, wild, plant, scenery, blooms, gardens, landscapes

Example answer:
Related Category 1: natural
- **Type of Relationship:** Synonymy/Similarity
- **Association Strength:** High
- **Explanation:** "natural" describes the same thing as "nature": the physical world that people did not make.

Related Category 2: fauna
- **Type of Relationship:** Is-a/Hypernym
- **Association Strength:** High
- **Explanation:** the animals of a place are one of the main constituents of "nature".

Related Category 3: cliff
- **Type of Relationship:** Co-occurrence
- **Association Strength:** Medium
- **Explanation:** cliffs are a common sight in natural landscapes, though nature often appears without them.
"""


def build_prompt(target: str, candidates: list[str]) -> str:
    """The user message asking which of `candidates` relate directly to `target` (App. C.4)."""
    types = "\n".join(f"{i}. **{name}:** {desc}." for i, (name, desc) in enumerate(RELATIONSHIP_TYPES, 1))
    return (
        f"Below is a list of known categories. Find every category in that list that is directly related "
        f"to the new category **{target}**. For each related category, give the type of relationship, "
        f"the association strength (**High, Medium, Low**) and a short explanation.\n\n"
        f"Types of relationship:\n{types}\n\n"
        f"Answer format. For each related category write exactly:\n\n"
        f"Related Category [n]: [category name, copied from the list]\n"
        f"- **Type of Relationship:** [one of the five types]\n"
        f"- **Association Strength:** High / Medium / Low\n"
        f"- **Explanation:** [why they are related and why this strength]\n\n"
        f"{_EXAMPLE}\n"
        f"Now the real task.\n"
        f"New category: {target}\n"
        f"Known categories: {', '.join(candidates)}\n"
    )


def build_messages(target: str, candidates: list[str]) -> list[dict]:
    return [{"role": "user", "content": build_prompt(target, candidates)}]


def prompt_hash(messages: list[dict]) -> str:
    """sha256 over the exact messages sent (and the prompt version), hex."""
    blob = json.dumps({"v": PROMPT_VERSION, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
