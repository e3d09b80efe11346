"""A small procedural open-vocabulary world: seeded images with several objects each, the exact box
of every drawn object, a caption, and multi-label ground truth over a fixed 30-class vocabulary.

The rules give the classes real structure for a relationship graph to find:
- hierarchy: every shape belongs to one family (round / angular / spiky);
- co-occurrence: the scene (night / beach / park / winter) sets the background, which shapes,
  colours and composite objects are likely, and which colours never appear on it;
- parts: composite objects are drawn from shape parts (a house is a square wall under a triangle
  roof, a snowman two stacked white circles, a car a body on two black circles, a tree a green
  circle on a brown trunk), and the parts carry their own shape/colour labels.

Unseen classes (split `unseen`) are ordinary words of the captions — the VLP pretrains on them —
but DART gets only the seen classes as training labels. Everything is a function of the seed.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dart_core.vocab import Vocabulary

# ---- vocabulary ------------------------------------------------------------------------------
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 225), "yellow": (245, 220, 40),
    "purple": (150, 60, 190), "orange": (250, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring")
FAMILY_OF = {"circle": "round", "ring": "round", "square": "angular", "triangle": "angular",
             "diamond": "angular", "star": "spiky", "cross": "spiky"}
FAMILIES = ("round", "angular", "spiky")
TEXTURES = ("striped", "dotted")  # "plain" carries no class
SIZES = ("small", "big")
COMPOSITES = ("house", "car", "snowman", "tree")
SCENES = ("night", "beach", "park", "winter")

GROUPS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "family": FAMILIES, "texture": TEXTURES,
    "size": SIZES, "composite": COMPOSITES, "scene": SCENES,
}
# One or two per group, each with seen relatives (orange~red/yellow, diamond~square/angular,
# star~cross/spiky, snowman~winter/circle/white, beach~its ball-like circles and rings).
UNSEEN = frozenset({"orange", "purple", "star", "diamond", "dotted", "snowman", "beach"})
CLASS_NAMES: tuple[str, ...] = tuple(n for g in GROUPS.values() for n in g)
GROUP_OF = {n: g for g, names in GROUPS.items() for n in names}

# Scene rules: background colour, colours that never appear there (for contrast, and a negative
# co-occurrence to find: no object or part of an excluded colour is ever drawn in that scene),
# weights over shapes/colours, and the chance of each composite (at most one per image).
BROWN = (120, 72, 30)


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    phrase: str
    excluded_colours: frozenset[str]
    shape_weights: dict[str, float]
    colour_weights: dict[str, float]
    composites: dict[str, float]


SCENE_RULES: dict[str, Scene] = {
    "night": Scene((20, 24, 62), "at night", frozenset({"black", "blue", "purple"}),
                   {"star": 5, "circle": 2, "cross": 1, "square": 1, "triangle": 1, "diamond": 1, "ring": 1},
                   {"yellow": 4, "white": 4, "orange": 1, "red": 1, "green": 1},
                   {"house": 0.35}),  # no car: its wheels are black
    "beach": Scene((225, 200, 150), "on a beach", frozenset({"yellow", "white", "orange"}),
                   {"circle": 4, "ring": 4, "triangle": 1, "square": 1, "diamond": 1, "star": 1, "cross": 1},
                   {"red": 3, "blue": 3, "purple": 1, "green": 1, "black": 1},
                   {"car": 0.25}),
    "park": Scene((170, 215, 135), "in a park", frozenset({"white"}),
                  {"triangle": 2, "square": 2, "circle": 1, "diamond": 2, "star": 1, "cross": 1, "ring": 1},
                  {"red": 2, "blue": 2, "yellow": 2, "purple": 2, "orange": 2, "green": 1, "black": 1},
                  {"tree": 0.5, "car": 0.2, "house": 0.15}),
    "winter": Scene((140, 165, 200), "in winter", frozenset({"blue"}),
                    {"cross": 3, "diamond": 3, "square": 1, "triangle": 1, "circle": 1, "star": 1, "ring": 1},
                    {"white": 2, "red": 2, "black": 2, "purple": 1, "green": 1, "yellow": 1, "orange": 1},
                    {"snowman": 0.6, "house": 0.2, "tree": 0.1}),
}


def vocabulary() -> Vocabulary:
    """The world's vocabulary: id = name (single lowercase words), order = CLASS_NAMES."""
    return Vocabulary.from_names(list(CLASS_NAMES), unseen=UNSEEN)


# ---- samples ---------------------------------------------------------------------------------
@dataclass
class WorldObject:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive (PIL getbbox)
    classes: tuple[str, ...]  # the classes whose evidence these pixels are
    kind: str  # a shape name, or "<composite>" / "<composite>:<part>"


@dataclass
class WorldSample:
    image: Image.Image
    scene: str
    objects: list[WorldObject]
    caption: str
    mentions: list[dict] = field(default_factory=list)  # what the caption describes, for re-captioning
    labels: dict[str, int] = field(default_factory=dict)  # every class: 1 present, -1 absent

    def positives(self) -> list[str]:
        return [c for c in CLASS_NAMES if self.labels[c] == 1]


def _weighted(rng: random.Random, weights: dict[str, float], allowed) -> str:
    items = [(k, w) for k, w in weights.items() if k in allowed]
    return rng.choices([k for k, _ in items], weights=[w for _, w in items])[0]


def _shape_points(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    """Polygon for a shape in the s×s square whose top-left corner is (x, y)."""
    if shape == "square":
        return [(x, y), (x + s - 1, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "triangle":
        return [(x + (s - 1) / 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "diamond":
        h = (s - 1) / 2
        return [(x + h, y), (x + s - 1, y + h), (x + h, y + s - 1), (x, y + h)]
    if shape == "cross":
        a, b = round(s * 0.33), round(s * 0.67)
        e = s - 1
        pts = [(a, 0), (b, 0), (b, a), (e, a), (e, b), (b, b), (b, e), (a, e), (a, b), (0, b), (0, a), (a, a)]
        return [(x + px, y + py) for px, py in pts]
    if shape == "star":
        c, r_out, r_in = (s - 1) / 2, (s - 1) / 2, (s - 1) * 0.2
        pts = []
        for i in range(10):
            ang = -np.pi / 2 + i * np.pi / 5
            r = r_out if i % 2 == 0 else r_in
            pts.append((x + c + r * np.cos(ang), y + c + r * np.sin(ang)))
        return pts
    raise ValueError(shape)


def _draw_mask(size: int, shape: str, x: int, y: int, w: int, h: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([x, y, x + w - 1, y + h - 1], fill=255)
    elif shape == "ring":
        d.ellipse([x, y, x + w - 1, y + h - 1], fill=255)
        t = max(3, w // 4)  # the hole: thick enough to stay a ring at 12 px
        d.ellipse([x + t, y + t, x + w - 1 - t, y + h - 1 - t], fill=0)
    elif shape == "rect":
        d.rectangle([x, y, x + w - 1, y + h - 1], fill=255)
    else:
        d.polygon(_shape_points(shape, x, y, w), fill=255)
    return m


def _texture(size: int, texture: str, x0: int, y0: int, period: int) -> np.ndarray:
    """Boolean (size, size) pattern anchored at the object's corner, so it moves with the object."""
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":
        return ((yy - y0) % period) < period // 2
    if texture == "dotted":
        return (((yy - y0) % period) < period // 2) & (((xx - x0) % period) < period // 2)
    return np.zeros((size, size), bool)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Texture ink: darker for light colours, lighter for dark ones, so the pattern is visible."""
    lum = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]
    return tuple(int(v * 0.45) for v in rgb) if lum > 90 else tuple(int(v + (255 - v) * 0.55) for v in rgb)


class _Canvas:
    def __init__(self, size: int, bg: tuple[int, int, int]):
        self.size = size
        self.rgb = np.empty((size, size, 3), np.uint8)
        self.rgb[:] = bg
        self.taken: list[tuple[int, int, int, int]] = []  # rectangles reserved by placed objects

    def free(self, box) -> bool:
        """No overlap with any reserved rectangle, with a 2 px gap: boxes of different objects
        never overlap, so a patch inside a box is on that object (or its background), not another."""
        x0, y0, x1, y1 = box
        m = 2
        return all(x1 + m <= a0 or a1 + m <= x0 or y1 + m <= b0 or b1 + m <= y0 for a0, b0, a1, b1 in self.taken)

    def paint(self, mask: Image.Image, rgb, texture: str = "plain", period: int = 4) -> tuple[int, int, int, int]:
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        pat = _texture(self.size, texture, box[0], box[1], period) & m
        self.rgb[m] = rgb
        self.rgb[pat] = _shade(rgb)
        return box


def _size_px(size_class: str, image_size: int, rng: random.Random, scale: float = 1.0) -> int:
    lo, hi = (0.20, 0.26) if size_class == "small" else (0.34, 0.44)  # of the image side, × scale
    return max(8, round(image_size * scale * rng.uniform(lo, hi)))


def _place(rng: random.Random, canvas: _Canvas, w: int, h: int, tries: int = 60):
    for _ in range(tries):
        x = rng.randint(1, canvas.size - w - 1)
        y = rng.randint(1, canvas.size - h - 1)
        if canvas.free((x, y, x + w, y + h)):
            canvas.taken.append((x, y, x + w, y + h))
            return x, y
    return None


def _simple_classes(shape: str, colour: str, texture: str, size: str) -> tuple[str, ...]:
    return (shape, FAMILY_OF[shape], colour) + ((texture,) if texture != "plain" else ()) + (size,)


# stays long: its rng draws must stay in exactly this order (the demo world is a bit-identical instrument)
def _draw_composite(kind: str, rng: random.Random, canvas: _Canvas, scene: Scene) -> tuple[list[WorldObject], dict] | None:
    S = canvas.size
    u = S / 64  # composite geometry is designed at 64 px and scaled
    allowed = [c for c in COLOURS if c not in scene.excluded_colours]
    if kind == "house":
        w = round(rng.uniform(18, 24) * u)
        wall_h, roof_h = round(w * 0.8), round(w * 0.55)
        pos = _place(rng, canvas, w, wall_h + roof_h)
        if pos is None:
            return None
        x, y = pos
        wall_c = rng.choice([c for c in allowed if c != "black"])
        roof_c = rng.choice([c for c in allowed if c != wall_c])
        # a low roof: wider than tall, unlike the free-standing triangle shape
        roof = Image.new("L", (S, S), 0)
        ImageDraw.Draw(roof).polygon([(x + (w - 1) / 2, y), (x + w - 1, y + roof_h - 1), (x, y + roof_h - 1)], fill=255)
        wall = _draw_mask(S, "rect", x, y + roof_h, w, wall_h)
        b_roof = canvas.paint(roof, COLOURS[roof_c])
        b_wall = canvas.paint(wall, COLOURS[wall_c])
        objs = [WorldObject((x, y, x + w, y + roof_h + wall_h), ("house",), "house"),
                WorldObject(b_roof, ("triangle", "angular", roof_c), "house:roof"),
                WorldObject(b_wall, ("square", "angular", wall_c), "house:wall")]
        return objs, {"kind": "house", "colour": wall_c}
    if kind == "car":
        w = round(rng.uniform(22, 28) * u)
        # wheels mostly below the body: the visible part stays at least a patch (8 px) tall
        body_h, wheel = round(w * 0.38), round(w * 0.4)
        tuck = wheel // 5
        h = body_h - tuck + wheel
        pos = _place(rng, canvas, w, h)
        if pos is None:
            return None
        x, y = pos
        body_c = rng.choice([c for c in allowed if c != "black"])
        body = _draw_mask(S, "rect", x, y, w, body_h)
        b_body = canvas.paint(body, COLOURS[body_c])
        objs = [None, WorldObject(b_body, (body_c,), "car:body")]
        for wx in (x + round(w * 0.08), x + w - round(w * 0.08) - wheel):
            m = np.asarray(_draw_mask(S, "circle", wx, y + body_h - tuck, wheel, wheel)).copy()
            m[np.asarray(body) > 0] = 0  # the body stays in front of the wheels' tops
            bw = canvas.paint(Image.fromarray(m), COLOURS["black"])
            objs.append(WorldObject(bw, ("circle", "round", "black"), "car:wheel"))
        objs[0] = WorldObject((min(o.box[0] for o in objs[1:]), min(o.box[1] for o in objs[1:]),
                               max(o.box[2] for o in objs[1:]), max(o.box[3] for o in objs[1:])), ("car",), "car")
        return objs, {"kind": "car", "colour": body_c}
    if kind == "snowman":
        d_low = round(rng.uniform(14, 18) * u)
        d_up = round(d_low * 0.7)
        w, h = d_low, d_low + d_up
        pos = _place(rng, canvas, w, h)
        if pos is None:
            return None
        x, y = pos
        head = _draw_mask(S, "circle", x + (d_low - d_up) // 2, y, d_up, d_up)
        body = _draw_mask(S, "circle", x, y + d_up, d_low, d_low)  # touching, not overlapping
        b_head = canvas.paint(head, COLOURS["white"])
        b_body = canvas.paint(body, COLOURS["white"])
        objs = [WorldObject((x, min(b_head[1], b_body[1]), x + w, max(b_head[3], b_body[3])), ("snowman",), "snowman"),
                WorldObject(b_head, ("circle", "round", "white"), "snowman:head"),
                WorldObject(b_body, ("circle", "round", "white"), "snowman:body")]
        return objs, {"kind": "snowman", "colour": None}
    if kind == "tree":
        d = round(rng.uniform(15, 20) * u)
        tw, th = max(3, round(d * 0.25)), round(d * 0.6)
        w, h = d, d + th
        pos = _place(rng, canvas, w, h)
        if pos is None:
            return None
        x, y = pos
        crown = _draw_mask(S, "circle", x, y, d, d)
        trunk = _draw_mask(S, "rect", x + (d - tw) // 2, y + d, tw, th)
        b_crown = canvas.paint(crown, COLOURS["green"])
        canvas.paint(trunk, BROWN)
        objs = [WorldObject((x, y, x + w, y + h), ("tree",), "tree"),
                WorldObject(b_crown, ("circle", "round", "green"), "tree:crown")]
        return objs, {"kind": "tree", "colour": None}
    raise ValueError(kind)


def generate_sample(rng: random.Random, image_size: int = 64, max_objects: int = 3,
                    object_scale: float = 1.0) -> WorldSample:
    """One image from `rng` (a seeded random.Random: the sample is a function of its state).
    `object_scale` multiplies the simple objects' sizes (composites keep theirs)."""
    scene_name = rng.choice(SCENES)
    scene = SCENE_RULES[scene_name]
    canvas = _Canvas(image_size, scene.background)
    objects: list[WorldObject] = []
    mentions: list[dict] = []
    for kind, p in scene.composites.items():
        if rng.random() < p and not any(m["kind"] in COMPOSITES for m in mentions):
            got = _draw_composite(kind, rng, canvas, scene)
            if got is not None:
                objects += got[0]
                mentions.append(got[1])
    allowed = [c for c in COLOURS if c not in scene.excluded_colours]
    n_simple = rng.randint(1, max_objects - (1 if mentions else 0))
    for _ in range(n_simple):
        shape = _weighted(rng, scene.shape_weights, SHAPES)
        colour = _weighted(rng, scene.colour_weights, allowed)
        texture = rng.choices(("plain", "striped", "dotted"), weights=(2, 1, 1))[0]
        if shape in ("star", "cross", "ring"):
            texture = "plain"  # thin shapes cannot show a pattern at this resolution
        size = rng.choice(SIZES)
        s = _size_px(size, image_size, rng, object_scale)
        pos = _place(rng, canvas, s, s)
        if pos is None:
            continue  # no room left: fewer objects, never overlapping ones
        mask = _draw_mask(image_size, shape, pos[0], pos[1], s, s)
        box = canvas.paint(mask, COLOURS[colour], texture, period=max(4, image_size // 16))
        objects.append(WorldObject(box, _simple_classes(shape, colour, texture, size), shape))
        mentions.append({"kind": shape, "colour": colour, "texture": texture, "size": size})
    present = {scene_name} | {c for o in objects for c in o.classes}
    labels = {c: (1 if c in present else -1) for c in CLASS_NAMES}
    image = Image.fromarray(canvas.rgb, "RGB")
    return WorldSample(image, scene_name, objects, caption(scene_name, mentions), mentions, labels)


# ---- captions --------------------------------------------------------------------------------
def _phrase(m: dict, rng: random.Random | None, p_drop: float, p_family: float) -> str:
    def keep() -> bool:
        return rng is None or rng.random() >= p_drop
    kind = m["kind"]
    if kind in COMPOSITES:
        words = ([m["colour"]] if m.get("colour") and keep() else []) + [kind]
    else:
        noun = kind
        if rng is not None and rng.random() < p_family:
            noun = f"{FAMILY_OF[kind]} shape"
        words = [w for w in (m["size"], m["texture"] if m["texture"] != "plain" else None, m["colour"])
                 if w and keep()] + [noun]
    words = " ".join(words)
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: str, mentions: list[dict], rng: random.Random | None = None,
            p_drop: float = 0.0, p_family: float = 0.0, p_object: float = 1.0, p_scene: float = 1.0) -> str:
    """'a photo of a big striped red circle and a small blue square in a park.'

    With an `rng`, each attribute word is dropped with probability `p_drop` and a shape is named by
    its family ('a red round shape') with probability `p_family`: captions that name a shape without
    its colour force the VLP to learn shapes instead of leaning on colour alone. Each object is
    kept with probability `p_object` (at least one is) and the scene phrase with `p_scene`, as
    real alt-text is partial. Without `rng` the caption is the full, deterministic description
    written to the folder source."""
    if rng is not None and p_object < 1.0 and mentions:
        kept = [m for m in mentions if rng.random() < p_object]
        mentions = kept or [rng.choice(mentions)]
    parts = [_phrase(m, rng, p_drop, p_family) for m in mentions]
    if rng is not None:
        rng.shuffle(parts)
    if rng is not None and p_scene < 1.0 and rng.random() >= p_scene:
        return f"a photo of {_join(parts)}."
    return f"a photo of {_join(parts)} {SCENE_RULES[scene].phrase}."


def _join(parts: list[str]) -> str:
    if len(parts) > 1:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return parts[0] if parts else "nothing"


# ---- writing a folder source -------------------------------------------------------------------
def sample_rng(seed: int, index: int, stream: str = "world") -> random.Random:
    """Each image has its own stream, so image i is the same whatever n_images is. `stream`
    separates the VLP's pretraining images ("vlp") from the dataset DART sees ("world")."""
    return random.Random(f"dart-{stream}:{seed}:{index}")


def generate(n_images: int, seed: int = 0, image_size: int = 64, start: int = 0, stream: str = "world",
             object_scale: float = 1.0):
    for i in range(start, start + n_images):
        yield generate_sample(sample_rng(seed, i, stream), image_size, object_scale=object_scale)


def write_folder_source(out_dir: str | Path, n_images: int, seed: int = 0, image_size: int = 64,
                        image_format: str = "png", object_scale: float = 1.0) -> dict:
    """Write `n_images` as a generic folder source: images/<nnnnnn>.<png>, labels.csv (path,labels
    with every class: present ones plain, absent ones as `-id` verified negatives), classes.csv
    (id,name,split), boxes.jsonl (one row per image: path, width, height, objects with box and
    classes) and captions.csv (path,caption). Returns counts and file paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    vocab.write_csv(out / "classes.csv")
    rows, n_pos = [], 0
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as lf, \
            open(out / "boxes.jsonl", "w", encoding="utf-8") as bf, \
            open(out / "captions.csv", "w", newline="", encoding="utf-8") as cf:
        lw, cw = csv.writer(lf), csv.writer(cf)
        lw.writerow(["path", "labels"])
        cw.writerow(["path", "caption"])
        for i, s in enumerate(generate(n_images, seed, image_size, object_scale=object_scale)):
            rel = f"images/{i:06d}.{image_format}"
            s.image.save(out / rel)
            lw.writerow([rel, "|".join(c if s.labels[c] == 1 else f"-{c}" for c in CLASS_NAMES)])
            cw.writerow([rel, s.caption])
            bf.write(json.dumps({"path": rel, "width": image_size, "height": image_size, "scene": s.scene,
                                 "objects": [{"box": list(o.box), "classes": list(o.classes), "kind": o.kind}
                                             for o in s.objects]}) + "\n")
            n_pos += sum(v == 1 for v in s.labels.values())
            rows.append(rel)
    return {"dir": str(out), "images": len(rows), "classes": len(vocab), "positives": n_pos,
            "labels_csv": str(out / "labels.csv"), "classes_csv": str(out / "classes.csv"),
            "boxes": str(out / "boxes.jsonl"), "captions": str(out / "captions.csv")}


def read_boxes(path: str | Path) -> dict[str, list[dict]]:
    """boxes.jsonl -> {image path: [{"box": [x0,y0,x1,y1], "classes": [...], "kind": ...}, ...]}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out[row["path"]] = row["objects"]
    return out
