"""Parse the LLM's free-text answers to the App. C.4 prompt into (class id, strength) pairs.

Real answers drift from the requested format, so the parser accepts:
  - markdown decoration anywhere: **bold**, __bold__, `code`, "# headings", bullets;
  - header variants: "Related Category 1: x", "Related category #1 - x", "**Related Category (2):** x",
    "Category 3: x", and plain numbered items "1. x" / "2) **x**" when their block carries a strength;
  - prose before, between and after the entries;
  - any case, singular/plural ("Dogs" -> "dog", "berries" -> "berry", "buses" -> "bus");
  - a trailing qualifier on the name ("x (animal)", "x - a kind of y") when the bare name is not a class.
Names that are not in the vocabulary are dropped and counted, the target itself is dropped, a
category named twice in one answer counts once (its highest strength). An answer in which no entry
can be found is "unparseable": it yields no edges and is reported (its raw text stays cached).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

# Association strength -> score (aggregation in mine.py; paper Sec. 3.4 "numerical relevance score").
STRENGTH_SCORE = {"high": 3, "medium": 2, "low": 1}
DEFAULT_STRENGTH = 1  # an entry whose strength is missing counts as Low (and is counted)

_MD = re.compile(r"[*_`]+")
_HEADER_RELATED = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:[-*+]\s+)?(?:related\s+)?(?:category|categories)\s*"
    r"(?:no\.?\s*|#\s*|\(\s*)?(\d+)\s*\)?\s*[:.)\-–—]\s*(.+?)\s*$",
    re.IGNORECASE,
)
_HEADER_NUMBERED = re.compile(r"^\s*(?:#{1,6}\s*)?(?:[-*+]\s+)?(\d+)\s*[.)]\s+(.+?)\s*$")
_ATTR = re.compile(r"^\s*(?:[-*+]\s+)?(type of relationship|relationship type|relationship|type|"
                   r"association strength|strength|explanation|reason)\s*[:\-–—]\s*(.*)$", re.IGNORECASE)
_STRENGTH_WORD = re.compile(r"\b(high|medium|low)\b", re.IGNORECASE)
_NONE_ANSWER = re.compile(r"\bno\s+(?:directly\s+)?related\s+categor", re.IGNORECASE)


def normalize(name: str) -> str:
    """Lower case, NFKC, punctuation -> space, single spaces. ("Hot-Dog" -> "hot dog")."""
    s = unicodedata.normalize("NFKC", name).lower().replace("&", " and ")
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.replace("_", " ").split())


def singular(norm: str) -> str:
    """Singular of the last word of a normalized name, by English suffix rules (no dictionary)."""
    if not norm:
        return norm
    head, _, last = norm.rpartition(" ")
    w = last
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith("ves"):
        w = w[:-3] + "f"  # leaves -> leaf, wolves -> wolf (knives -> knif, matched via "fe" below)
    elif len(w) > 3 and re.search(r"(ses|xes|zes|ches|shes)$", w):
        w = w[:-2]
    elif len(w) > 2 and w.endswith("s") and not re.search(r"(ss|us|is)$", w):
        w = w[:-1]
    return f"{head} {w}" if head else w


class NameIndex:
    """Maps free-text category names to vocabulary class ids (exact, then singular-insensitive)."""

    def __init__(self, ids: list[str] | tuple[str, ...], names: list[str] | tuple[str, ...]):
        self.exact: dict[str, str] = {}
        self.loose: dict[str, str] = {}
        for cid, name in zip(ids, names):
            n = normalize(name)
            self.exact.setdefault(n, cid)
        for cid, name in zip(ids, names):
            n = normalize(name)
            for key in (singular(n), _fe(singular(n))):
                self.loose.setdefault(key, cid)
        # "Bat (Animal)" may come back as just "bat": accept the bare name when no class owns it
        for cid, name in zip(ids, names):
            bare = normalize(re.sub(r"\s*\(.*?\)\s*$", "", name))
            if bare and bare != normalize(name):
                self.loose.setdefault(singular(bare), cid)

    def lookup(self, text: str) -> str | None:
        n = normalize(text)
        if not n:
            return None
        if n in self.exact:
            return self.exact[n]
        s = singular(n)
        for key in (s, _fe(s)):
            if key in self.loose:
                return self.loose[key]
        return None

    def match(self, raw: str) -> str | None:
        """The class id a header's name refers to, trying the name bare of qualifiers last."""
        name = _clean_name(raw)
        cid = self.lookup(name)
        if cid is not None:
            return cid
        # "x (animal)", "x - because ...", "x: ...", "x, a kind of y": keep the leading part
        for pattern in (r"\s*\(.*$", r"\s+[-–—]\s+.*$", r"\s*:\s.*$", r"\s*,\s.*$"):
            short = re.sub(pattern, "", name)
            if short != name:
                cid = self.lookup(short)
                if cid is not None:
                    return cid
        return None


def _fe(s: str) -> str:
    return s + "e" if s.endswith("f") else s  # knives -> knif -> knife


def _clean_name(raw: str) -> str:
    s = _MD.sub("", raw).strip()
    s = s.strip(" \t\"'“”‘’")
    s = re.sub(r"[\s.:;,!]+$", "", s)
    return s.strip(" \t\"'“”‘’")


@dataclass
class ParsedAnswer:
    entries: list[tuple[str, int]] = field(default_factory=list)  # (class id, strength 1..3), answer order
    unknown: list[str] = field(default_factory=list)  # names not in the vocabulary (dropped)
    self_mentions: int = 0  # the target named as its own neighbour (dropped)
    duplicates: int = 0  # a category named again in the same answer (merged)
    missing_strength: int = 0  # entries without a readable strength (counted as Low)
    parseable: bool = True


def _find_blocks(lines: list[str]) -> list[tuple[str, list[str], bool]]:
    """Headers and their blocks: "Related Category n: name" always; "n. name" only if its block has a
    strength line (decided by the caller). Returns (raw name, block lines, strong header)."""
    blocks: list[tuple[str, list[str], bool]] = []
    for line in lines:
        plain = _MD.sub("", line)
        m = _HEADER_RELATED.match(plain)
        if m:
            blocks.append((m.group(2), [], True))
            continue
        m = _HEADER_NUMBERED.match(plain)
        if m and not _ATTR.match(m.group(2)):
            blocks.append((m.group(2), [], False))
            continue
        if blocks:
            blocks[-1][1].append(plain)
    return blocks


def _block_strength(raw: str, body: list[str]) -> tuple[str, str | None]:
    """A block's strength text (its "Strength: ..." line, else one written on the header line) and
    the name with a header-line strength cut off."""
    strength_text = None
    for b in body:
        a = _ATTR.match(b)
        if a and "strength" in a.group(1).lower():
            strength_text = a.group(2)
            break
    # a strength written on the header line: "1. natural (High)" / "natural - High"
    header_strength = re.search(r"[(\[\-–—:]\s*(high|medium|low)\s*[)\]]?\s*$", _clean_name(raw), re.IGNORECASE)
    if header_strength:
        raw = raw[: raw.lower().rfind(header_strength.group(1).lower())]
        raw = re.sub(r"[\s(\[\-–—:]+$", "", raw)
        strength_text = strength_text or header_strength.group(1)
    return raw, strength_text


def parse_answer(text: str | None, index: NameIndex, target_id: str) -> ParsedAnswer:
    out = ParsedAnswer()
    if not text or not text.strip():
        out.parseable = False
        return out
    # 1) find headers: "Related Category n: name" always; "n. name" only if its block has a strength line
    blocks = _find_blocks(text.splitlines())
    found: dict[str, int] = {}
    order: list[str] = []
    any_entry = False
    for raw, body, strong in blocks:
        raw, strength_text = _block_strength(raw, body)
        if not strong and strength_text is None:
            continue  # a numbered line in prose (e.g. the model restating the five types)
        any_entry = True
        cid = index.match(raw)
        if cid is None:
            out.unknown.append(_clean_name(raw))
            continue
        if cid == target_id:
            out.self_mentions += 1
            continue
        w = _STRENGTH_WORD.search(strength_text or "")
        if w:
            s = STRENGTH_SCORE[w.group(1).lower()]
        else:
            s = DEFAULT_STRENGTH
            out.missing_strength += 1
        if cid in found:
            out.duplicates += 1
            found[cid] = max(found[cid], s)
        else:
            found[cid] = s
            order.append(cid)
    out.entries = [(cid, found[cid]) for cid in order]
    if not any_entry and not _NONE_ANSWER.search(text):
        out.parseable = False
    return out
