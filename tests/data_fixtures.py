"""Generated data-plane fixtures in each source's real file layout, plus unusual / bad images."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from dart_core.data.records import sample_key
from PIL import Image


def jpeg(w: int = 320, h: int = 240, seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth gradient + noise: compresses like a photo, not like a flat colour
    x = np.linspace(0, 255, w)[None, :, None] + np.linspace(0, 128, h)[:, None, None]
    a = np.clip(x + rng.normal(0, 20, (h, w, 3)) + seed * 7, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def unusual_images() -> dict[str, bytes]:
    """name -> bytes of images that must be accepted and normalised to RGB."""
    out = {}
    b = io.BytesIO(); Image.new("L", (300, 280), 120).save(b, "JPEG"); out["gray.jpg"] = b.getvalue()
    b = io.BytesIO(); Image.new("RGBA", (300, 280), (255, 0, 0, 0)).save(b, "PNG"); out["alpha.png"] = b.getvalue()
    b = io.BytesIO(); Image.new("CMYK", (300, 280), (0, 255, 255, 0)).save(b, "JPEG"); out["cmyk.jpg"] = b.getvalue()
    b = io.BytesIO(); Image.fromarray(np.full((280, 300), 65535, np.uint16)).save(b, "PNG"); out["sixteen.png"] = b.getvalue()
    # EXIF orientation 6 (rotate 90 CW): stored 400x300, displayed 300x400
    ex = Image.Exif(); ex[0x0112] = 6
    b = io.BytesIO(); Image.open(io.BytesIO(jpeg(400, 300, 3))).save(b, "JPEG", exif=ex.tobytes()); out["rotated.jpg"] = b.getvalue()
    p = Image.new("P", (300, 280)); p.info["transparency"] = 0
    b = io.BytesIO(); p.save(b, "PNG", transparency=0); out["palette.png"] = b.getvalue()
    return out


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (how real decompression bombs look)."""
    b = io.BytesIO(); Image.new("1", (8, 8)).save(b, "PNG"); data = bytearray(b.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected failure reason)."""
    full = jpeg(320, 240, 9)
    return {
        "truncated.jpg": (full[: len(full) // 2], "decode_error"),
        "empty.jpg": (b"", "empty_file"),
        "text.jpg": (b"this is not an image\n", "not_an_image"),
        "bomb.png": (bomb_png(), "decompression_bomb"),
    }


def make_folder(root: Path, n_good: int = 12, with_classes: bool = True) -> dict:
    """A folder source with good, unusual and bad inputs. Returns the expected outcome."""
    (root / "img" / "sub").mkdir(parents=True, exist_ok=True)
    rows, ok, failed = [], {}, {}
    for i in range(n_good):
        rel = f"img/{'sub/' if i % 3 == 0 else ''}g{i:03d}.jpg"
        (root / rel).write_bytes(jpeg(320 + i, 240, i))
        lab = "cat|-dog" if i % 2 else "dog|-cat|bird"
        rows.append((rel, lab))
        ok[sample_key(rel)] = {"cat": 1, "dog": -1} if i % 2 else {"dog": 1, "cat": -1, "bird": 1}
    for name, data in unusual_images().items():
        (root / "img" / name).write_bytes(data)
        rows.append((f"img/{name}", "bird"))
        ok[sample_key(f"img/{name}")] = {"bird": 1}
    for name, (data, reason) in bad_images().items():
        (root / "img" / name).write_bytes(data)
        rows.append((f"img/{name}", "cat"))
        failed[sample_key(f"img/{name}")] = reason
    rows.append(("img/missing.jpg", "cat")); failed[sample_key("img/missing.jpg")] = "missing_file"
    rows.append(("img/g001.jpg", "dog"))  # duplicate id: the first occurrence wins
    rows.append(("../outside.jpg", "cat")); failed[sample_key("../outside.jpg")] = "path_escapes_source"
    (root.parent / "outside.jpg").write_bytes(jpeg(100, 100, 1))
    if with_classes:
        rows.append(("img/g002.jpg".replace("g002", "g_unknown"), "zebra"))
        (root / "img" / "g_unknown.jpg").write_bytes(jpeg(300, 300, 5))
        failed[sample_key("img/g_unknown.jpg")] = "unknown_class"
        (root / "classes.csv").write_text("id,name,split\ncat,cat,seen\ndog,dog,seen\nbird,bird,unseen\n")
    with open(root / "labels.csv", "w") as f:
        f.write("path,labels\n")
        for rel, lab in rows:
            f.write(f"{rel},{lab}\n")
    reasons: dict[str, int] = {}
    for r in failed.values():
        reasons[r] = reasons.get(r, 0) + 1
    reasons["duplicate_id"] = 1
    ok = {k: {c: -1 for c in ("cat", "dog", "bird")} | lab for k, lab in ok.items()}  # absent = negative
    return {"ok": ok, "failed": failed, "reasons": reasons, "inputs": len(rows)}


OI_IDS = ["0000000000000000", "1000000000000001", "7c00000000000002", "a000000000000003",
          "e000000000000004", "f000000000000005"]  # first hex digits differ: CVDF folders train_0, _1, _7, ...


def make_openimages(root: Path, version: str = "v6", split: str = "train", *, labels_in: str = "root",
                    images: str = "flat") -> dict:
    """Open Images CSVs in the layout of `version` (v4: no header on descriptions, unprefixed).
    labels_in="root": ROOT/<labels csv>; "split": ROOT/<split>/<labels csv> (the official URL
    layout). images="flat": ROOT/<split>/<id>.jpg; "cvdf": ROOT/<split>_<first hex digit>/<id>.jpg
    (the CVDF tarballs)."""
    root.mkdir(parents=True, exist_ok=True)
    mids = {f"/m/0{i:02d}": f"Thing {i}" for i in range(8)}
    trainable = ["/m/000", "/m/001", "/m/002", "/m/003"]
    pre = "" if version in ("v4", "v5") else f"oid{version}-"
    desc = "".join(f"{m},{n}\n" for m, n in mids.items())
    if version in ("v4", "v5"):
        (root / "class-descriptions.csv").write_text(desc)
    else:
        (root / f"{pre}class-descriptions.csv").write_text("LabelName,DisplayName\n" + desc)
    (root / f"{pre}classes-trainable.txt").write_text("\n".join(trainable) + "\n")
    labels = ["ImageID,Source,LabelName,Confidence"]
    expect, raw = {}, {}
    for i, iid in enumerate(OI_IDS):
        lab = {"/m/000": 1, "/m/001": -1}
        if i % 2:
            lab["/m/004"] = 1  # non-trainable, frequent -> unseen
        if i == 0:
            lab["/m/005"] = 1
        for m, v in lab.items():
            labels.append(f"{iid},verification,{m},{1 if v > 0 else 0}")
        labels.append(f"{iid},verification,/m/007,1")
        raw[iid] = {**lab, "/m/007": 1}
        # with n_unseen=2 the unseen classes are /m/007 (6 positives) and /m/004 (3); /m/005 is dropped
        expect[iid] = {**{k: v for k, v in lab.items() if k != "/m/005"}, "/m/007": 1}
    labels.append(f"{'a' * 16},verification,/m/999,1"); bad = {"a" * 16: "unknown_class"}
    # a malformed confidence: that (image, class) is unknown, the image's other labels stand
    labels.append(f"{'b' * 16},verification,/m/001,0")
    labels.append(f"{'b' * 16},verification,/m/000,0.5")
    expect["b" * 16] = {"/m/001": -1}; raw["b" * 16] = {"/m/001": -1}
    bad_conf_line = len(labels)
    labels.append(f"{'c' * 16},verification,/m/000,1"); bad["c" * 16] = "missing_file"  # no image anywhere
    missing_line = len(labels)
    name = f"{pre}{split}-annotations-human-imagelabels.csv"
    labels_dir = root if labels_in == "root" else root / split
    labels_dir.mkdir(exist_ok=True)
    (labels_dir / name).write_text("\n".join(labels) + "\n")
    paths = {}
    for i, iid in enumerate(list(expect) + ["a" * 16]):
        d = root / (split if images == "flat" else f"{split}_{iid[0]}")
        d.mkdir(exist_ok=True)
        (d / f"{iid}.jpg").write_bytes(jpeg(300, 260, i))
        paths[iid] = str(d / f"{iid}.jpg")
    rel = name if labels_in == "root" else f"{split}/{name}"
    return {"ok": expect, "failed": bad, "trainable": trainable, "labels": rel, "paths": paths, "raw": raw,
            "bad_conf_line": bad_conf_line, "missing_line": missing_line, "prefix": pre}


def write_published_split(root: Path, pool: list[str], rows: list[int], *, as_object: bool = False,
                          protocol: int = 4, bom: bool = True, crlf: bool = True, csv_text: str | None = None) -> None:
    """The OV-MLR split as published with LESA/BiAM: `unseen_labels.pkl` (a pickled numpy array
    of MIDs; 2,594 in the real file) and `top_400_unseen.csv` (row indices, no header; the real
    file has a UTF-8 BOM and CRLF line ends)."""
    import pickle

    arr = np.array(pool, dtype=object if as_object else None)
    (root / "unseen_labels.pkl").write_bytes(pickle.dumps(arr, protocol=protocol))
    if csv_text is None:
        nl = "\r\n" if crlf else "\n"
        csv_text = nl.join(str(r) for r in rows) + nl
    (root / "top_400_unseen.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + csv_text.encode())


NUS_TAGS = ["sky", "dog", "sunset", "car", "tree", "beach"]
NUS_CONCEPTS = ["sky", "dog", "animal"]


def make_nuswide(root: Path) -> dict:
    """NUS-WIDE's published layout (TrainImagelist with Windows paths, Train_Tags1k.dat, GT files),
    with one malformed tag cell, one malformed ground-truth cell and one tag row of the wrong width."""
    for d in ("ImageList", "NUS_WID_Tags", "Groundtruth/TrainTestLabels", "Flickr/actor", "Flickr/beach"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "NUS_WID_Tags/TagList1k.txt").write_text("\n".join(NUS_TAGS) + "\n")
    (root / "Concepts81.txt").write_text("\n".join(NUS_CONCEPTS) + "\n")
    imgs = [("actor", "0001_2124494179"), ("actor", "0002_174174086"), ("beach", "0003_1234"), ("beach", "0004_99"),
            ("beach", "0005_77")]
    (root / "ImageList/TrainImagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{d}\\{f}.jpg\n" for d, f in imgs))
    # row 4: one malformed cell (sunset); row 5: 3 columns instead of 6
    tag_rows = ["1\t0\t1\t0\t0\t1", "0\t1\t0\t0\t1\t0", "0\t0\t0\t1\t0\t1", "0\t0\t2\t1\t0\t1", "0\t1\t0"]
    (root / "NUS_WID_Tags/Train_Tags1k.dat").write_text("\n".join(tag_rows) + "\n")
    gt = {"sky": "1\n0\n0\n1\n0\n", "dog": "0\n1\n0\n0\n1\n", "animal": "0\nx\n1\n0\n1\n"}  # animal line 2: malformed
    for c, col in gt.items():
        (root / f"Groundtruth/TrainTestLabels/Labels_{c}_Train.txt").write_text(col)
    for i, (d, f) in enumerate(imgs):
        (root / "Flickr" / d / f"{f}.jpg").write_bytes(jpeg(280, 300, i))
    ok = {
        sample_key("actor/0001_2124494179.jpg"): {"sunset": 1, "car": -1, "tree": -1, "beach": 1, "sky": 1, "dog": -1, "animal": -1},
        sample_key("actor/0002_174174086.jpg"): {"sunset": -1, "car": -1, "tree": 1, "beach": -1, "sky": -1, "dog": 1},
        sample_key("beach/0003_1234.jpg"): {"sunset": -1, "car": 1, "tree": -1, "beach": 1, "sky": -1, "dog": -1, "animal": 1},
        sample_key("beach/0004_99.jpg"): {"car": 1, "tree": -1, "beach": 1, "sky": 1, "dog": -1, "animal": -1},
    }
    warnings = [
        "Groundtruth/TrainTestLabels/Labels_animal_Train.txt:2: 'x' is not 0/1; 'animal' is unknown for image "
        "'actor/0002_174174086.jpg' (ImageList/TrainImagelist.txt:2)",
        "NUS_WID_Tags/Train_Tags1k.dat:4: column 3 ('sunset') is '2', not 0/1; 'sunset' is unknown for image "
        "'beach/0004_99.jpg'",
    ]
    return {"ok": ok, "failed": {sample_key("beach/0005_77.jpg"): "malformed_label"}, "warnings": warnings,
            "files": {sample_key(f"{d}/{f}.jpg"): f"{d}/{f}.jpg" for d, f in imgs}}


def make_coco(root: Path, split: str = "val2014") -> dict:
    from dart_core.data.sources.coco import zeroshot_split

    seen, unseen = zeroshot_split()
    extra = ["fire hydrant", "hair drier"]  # outside the 48/17 split
    names = seen + unseen + extra
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    cid = {n: i + 1 for i, n in enumerate(names)}
    images = [{"id": 10 + i, "file_name": f"COCO_{split}_{10 + i:012d}.jpg", "width": 300, "height": 260} for i in range(4)]
    anns = [{"id": 1, "image_id": 10, "category_id": cid["person"], "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 10, "category_id": cid["cat"], "bbox": [0, 0, 1, 1]},
            {"id": 3, "image_id": 11, "category_id": cid["fire hydrant"], "bbox": [0, 0, 1, 1]},
            {"id": 4, "image_id": 12, "category_id": 999, "bbox": [0, 0, 1, 1]}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"info": {}, "images": images, "annotations": anns, "categories": cats}))
    (root / split).mkdir(exist_ok=True)
    for i, im in enumerate(images[:3]):
        (root / split / im["file_name"]).write_bytes(jpeg(300, 260, i))
    # images[3] has no file: missing_file
    return {"cid": cid, "seen": seen, "unseen": unseen, "images": images}
