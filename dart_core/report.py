"""The static HTML audit report: the most suspicious (image, class) pairs with the thumbnail and
the selected patches drawn as a heatmap over it, the lowest-quality images, the per-class table."""
from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

THUMB = 192


def heatmap_thumbnail(jpg: bytes, grid: tuple[int, int], patches, patch_scores) -> Image.Image:
    """The image (center-cropped square, as CLIP saw it) with the selected patches shaded red,
    stronger for higher patch scores."""
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((THUMB, THUMB))
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    gh, gw = grid
    ph, pw = THUMB / gh, THUMB / gw
    sc = np.asarray(patch_scores, dtype=np.float64)
    span = (sc.max() - sc.min()) if sc.size else 0.0
    for p, v in zip(patches, sc):
        a = 0.35 + 0.5 * ((v - sc.min()) / span if span > 0 else 1.0)
        r, c = divmod(int(p), gw)
        draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=(255, 0, 0, int(255 * a * 0.6)),
                       outline=(255, 255, 0, 200))
    return Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB")


def _table(rows: list[dict], cols: list[str], cls: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.3f}"
            cells.append(f"<td>{v if str(v).startswith('<img') else html.escape(str(v))}</td>")
        body.append(f"<tr class='{cls}'>{''.join(cells)}</tr>")
    return f"<table class='{cls}-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_report(out_dir: str | Path, audit: dict, run: dict, image_bytes, grid: tuple[int, int]) -> Path:
    """`image_bytes(shard, image_id) -> jpg bytes | None`. Writes out_dir/index.html + img/*.jpg."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    pairs = []
    for kind, rows in (("missing", audit["missing"]), ("wrong", audit["wrong"])):
        for r in rows:
            pairs.append((kind, r))
    suspicious = []
    for i, (kind, r) in enumerate(pairs):
        jpg = image_bytes(r["shard"], r["image_id"])
        thumb = ""
        if jpg is not None:
            name = f"img/{i:04d}.jpg"
            heatmap_thumbnail(jpg, grid, r.get("patches") or [], r.get("patch_scores") or []).save(out / name, quality=85)
            alt = html.escape(f"{r['image_id']} {r['class_name']}")
            thumb = f"<img src='{name}' alt='{alt}' width='{THUMB}' height='{THUMB}'>"
        suspicious.append({"thumbnail": thumb, "image": r["image_id"], "class": r["class_name"],
                           "issue": r["issue"], "score": float(r["score"]), "rank": int(r["rank"]),
                           "unseen": bool(r["unseen"]), "shard": r["shard"]})
    classes = [{"class": r["class_name"], "unseen": bool(r["unseen"]), "positives": r["positives"],
                "negatives": r["negatives"], "positives not predicted": r["positives_not_predicted"],
                "negatives predicted": r["negatives_predicted"],
                "disagreement": "" if r["disagreement_rate"] is None else float(r["disagreement_rate"])}
               for r in audit["classes"]]
    images = [{"image": r["image_id"], "shard": r["shard"], "label quality": float(r["label_quality"]),
               "known labels": r["known_labels"], "worst class": r["worst_class"]} for r in audit["images"]]
    meta = html.escape(json.dumps({k: run.get(k) for k in ("model", "checkpoint_hash", "vocab_hash", "crg_hash",
                                                               "classes", "unseen_classes")}))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dart-annotate label audit</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }}
th {{ background: #eee; }} code {{ font-size: 85%; }}
</style></head>
<body>
<h1>Label audit</h1>
<p id="run"><code>{meta}</code></p>
<h2 id="suspicious">Most suspicious (image, class) pairs ({len(suspicious)})</h2>
<p>Red squares: the patches DART selected for the class (stronger red = higher patch score).</p>
{_table(suspicious, ["thumbnail", "image", "class", "issue", "score", "rank", "unseen", "shard"], "pair")}
<h2 id="images">Lowest label quality images ({len(images)})</h2>
{_table(images, ["image", "shard", "label quality", "known labels", "worst class"], "image")}
<h2 id="classes">Per-class disagreement ({len(classes)})</h2>
{_table(classes, ["class", "unseen", "positives", "negatives", "positives not predicted", "negatives predicted", "disagreement"], "class")}
<script>
// count the thumbnails that actually decoded, so a headless check can see them
window.addEventListener("load", () => {{
  const imgs = [...document.querySelectorAll("img")];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = imgs.length;
}});
</script>
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
