"""The static HTML audit report (no server): the review list of suspicious (image, class) pairs with
the user's original file path and source, filters (class, issue kind, seen/unseen, split, path
text), sorting by any column, paging, and a larger view of the image with the patches DART selected
for the class drawn as a heatmap (on click); a readable run header; the per-class summary and the
lowest label-quality images. All data is in index.html (a JSON block) + img/*.jpg thumbnails."""
from __future__ import annotations

import datetime as _dt
import html
import io
import json
from pathlib import Path

from PIL import Image

THUMB = 256  # px, the square thumbnail (center crop, as CLIP saw the image); shown at 96 and 512


def thumbnail(jpg: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((THUMB, THUMB))


def heatmap_thumbnail(jpg: bytes, grid: tuple[int, int], patches, patch_scores) -> Image.Image:
    """The thumbnail with the selected patches shaded red, stronger for higher patch scores (the
    page draws the same overlay in the browser; this is for other uses, e.g. notebooks)."""
    import numpy as np
    from PIL import ImageDraw

    im = thumbnail(jpg)
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


def _source_text(src) -> str:
    if not src:
        return ""
    parts = [str(src[k]) for k in ("dataset", "split") if src.get(k)]
    where = src.get("row") or src.get("image_id")
    return " ".join(parts) + (f" ({where})" if where else "")


def _num(v, digits=4):
    return None if v is None else round(float(v), digits)


def header_rows(run: dict, meta: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the report's run header."""
    def short(h):
        return (h or "none")[:12]

    vocab = f"{run.get('classes', '?')} classes ({run.get('unseen_classes', 0)} unseen), hash {short(run.get('vocab_hash'))}"
    crg = f"{run.get('crg') or 'none'} (hash {short(run.get('crg_hash'))})" if run.get("crg") else "none"
    method = {"cleanlab": "cleanlab per-class label quality on per-class calibrated probabilities (Platt)",
              "sql": "per-class calibrated probability in SQL (sql/audit_calibrated.sql)"}.get(meta.get("method"), "")
    rows = [("model", run.get("model", "?")),
            ("checkpoint", f"{run.get('checkpoint', '?')} (hash {short(run.get('checkpoint_hash'))})"),
            ("vocabulary", vocab), ("CRG", crg),
            ("shards", f"{len(run.get('shards', []))} under {run.get('shards_root', '?')}"),
            ("annotated", run.get("created") or "not recorded (run.json before annotate recorded dates)"),
            ("report", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
            ("ranking", f"{method}; at most {meta.get('per_class_cap')} pairs per class; suspicion ≥ "
                        f"{meta.get('min_suspicion')}; {meta.get('listed')} of {meta.get('candidates')} candidates listed")]
    if meta.get("not_calibrated"):
        rows.append(("not ranked", "classes without both a positive and a negative label: "
                     + ", ".join(meta["not_calibrated"][:20]) + (" …" if len(meta["not_calibrated"]) > 20 else "")))
    if meta.get("corrections"):
        a = meta.get("corrections_applied") or {}
        rows.append(("corrections", f"{meta['corrections']} (sha256 {meta['corrections_sha256'][:12]}): "
                     f"{a.get('changed', '?')} labels changed"))
    return rows


def _write_thumbnails(out: Path, images: dict) -> dict[tuple[str, str], str]:
    """Save the readable images as out/img/NNNNN.jpg thumbnails; returns {(shard, image_id): name}."""
    names: dict[tuple[str, str], str] = {}
    for key, jpg in images.items():
        if jpg is None:
            continue
        name = f"img/{len(names):05d}.jpg"
        try:
            thumbnail(jpg).save(out / name, quality=88)
        except Exception:  # noqa: BLE001 - an unreadable image: that row shows no picture
            continue
        names[key] = name
    return names


def _pair_rows(pairs, names: dict) -> list[dict]:
    """The audit's pairs as the page's JSON rows (`names`: the thumbnails by (shard, image_id))."""
    rows = []
    for i, r in enumerate(pairs):
        key = (r["shard"], r["image_id"])
        rows.append({"i": i, "path": r.get("file") or "", "source": _source_text(r.get("source")),
                     "image_id": r["image_id"], "shard": r["shard"], "split": r.get("split") or "",
                     "class": r["class_name"], "class_id": r["class_id"], "unseen": bool(r["unseen"]),
                     "kind": r["kind"], "label": int(r["label"]), "suggested": int(r["suggested_label"]),
                     "suspicion": _num(r["suspicion"]), "p": _num(r["p"]), "score": _num(r["score"], 3),
                     "rank": int(r["rank"]), "reason": r["reason"], "img": names.get(key, ""),
                     "patches": [int(p) for p in (r.get("patches") or [])],
                     "patch_scores": [_num(s, 3) for s in (r.get("patch_scores") or [])]})
    return rows


def _table_rows(classes: list[dict], worst: list[dict]) -> tuple[str, str]:
    """The HTML rows of the per-class table and of the worst-images table."""
    e = html.escape

    def share(v):
        return "" if v is None else f"{100 * v:.1f} %"

    def three(v):
        return "" if v is None else f"{v:.3f}"

    class_rows = "".join(
        f"<tr class='class'><td><a class='class-link' data-class='{e(c['class'])}'>{e(c['class'])}</a></td>"
        f"<td>{'unseen' if c['unseen'] else ''}</td><td>{'yes' if c['calibrated'] else 'no'}</td>"
        f"<td>{c['positives']}</td><td>{c['negatives']}</td><td>{c['likely_wrong']}</td><td>{c['likely_missing']}</td>"
        f"<td>{share(c['flagged_share'])}</td><td>{three(c['mean_suspicion'])}</td></tr>"
        for c in classes)
    image_rows = "".join(
        f"<tr class='image'><td class='path'>{e(r['path'])}</td><td>{e(r['image_id'])}</td><td>{e(r['shard'])}</td>"
        f"<td>{r['label_quality']:.3f}</td><td>{r['known_labels']}</td><td>{e(str(r['worst_class']))}</td></tr>"
        for r in worst)
    return class_rows, image_rows


def write_report(out_dir: str | Path, audit: dict, run: dict, images: dict, grid: tuple[int, int]) -> Path:
    """`audit`: dart_core.audit.run_audit's result; `images`: {(shard, image_id): jpg bytes} for the
    thumbnails (pairs without one show no picture). Writes out_dir/index.html + out_dir/img/*.jpg."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    names = _write_thumbnails(out, images)
    rows = _pair_rows(audit["pairs"], names)
    classes = [{"class": r["class_name"], "unseen": bool(r["unseen"]), "calibrated": bool(r["calibrated"]),
                "positives": int(r["positives"]), "negatives": int(r["negatives"]),
                "likely_wrong": int(r["likely_wrong"]), "likely_missing": int(r["likely_missing"]),
                "flagged_share": _num(r["flagged_share"]), "mean_suspicion": _num(r["mean_suspicion"])}
               for r in audit["classes"]]
    worst = [{"image_id": r["image_id"], "shard": r["shard"], "path": r.get("file") or "",
              "label_quality": _num(r["label_quality"]), "known_labels": int(r["known_labels"]),
              "worst_class": r["worst_class"]} for r in audit["images"]]
    data = {"rows": rows, "grid": list(grid), "classes": classes, "images": worst,
            "splits": sorted({r["split"] for r in rows}),
            "class_names": sorted({r["class"] for r in rows})}
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in header_rows(run, audit.get("meta", {})))
    class_rows, image_rows = _table_rows(classes, worst)
    page = (PAGE.replace("%%HEADER%%", head).replace("%%CLASSES%%", class_rows).replace("%%IMAGES%%", image_rows)
            .replace("%%DATA%%", blob))
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dart-annotate label audit</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: middle; font-size: 14px; }
thead th { background: #eee; cursor: pointer; user-select: none; white-space: nowrap; }
thead th.sorted-asc::after { content: " ▲"; } thead th.sorted-desc::after { content: " ▼"; }
#run th { background: #f4f4f4; cursor: default; width: 8em; }
.filters { display: flex; flex-wrap: wrap; gap: .6em 1.4em; align-items: center; margin: .8em 0; }
.filters button { border: 1px solid #888; background: #fff; padding: 3px 9px; border-radius: 3px; cursor: pointer; }
.filters button.active { background: #335; color: #fff; }
.thumb { position: relative; width: 96px; height: 96px; padding: 0; border: 0; cursor: zoom-in; background: #ddd; }
.thumb img, .big img { width: 100%; height: 100%; display: block; }
.patch { position: absolute; box-sizing: border-box; border: 1px solid rgba(255,255,0,.8); background: rgb(255,0,0); }
.big { position: relative; width: 512px; height: 512px; background: #ddd; }
#viewer { position: fixed; inset: 0; background: rgba(0,0,0,.6); display: none; align-items: center; justify-content: center; }
#viewer.open { display: flex; } #viewer .panel { background: #fff; padding: 1em; max-width: 900px; display: flex; gap: 1em; }
a.class-link { color: #124; cursor: pointer; text-decoration: underline dotted; }
.kind-likely-missing { color: #05620a; } .kind-likely-wrong { color: #9a1010; }
.path { font-family: monospace; font-size: 13px; max-width: 26em; overflow-wrap: anywhere; }
</style></head>
<body>
<h1>Label audit</h1>
<table id="run"><tbody>%%HEADER%%</tbody></table>

<h2 id="suspicious">Suspicious labels</h2>
<p>Each row is an (image, class) label the model disagrees with: <b>likely missing</b> — labelled absent
(or not labelled) but the model finds the class; <b>likely wrong</b> — labelled present but the model does
not find it. <i>suspicion</i> ranks pairs across classes (per-class calibrated, see docs/audit.md); click a
picture for the larger view with the patches DART chose for the class (red, stronger = higher patch score),
click a class name to keep only that class, click a column title to sort. Export: <code>dart audit PRED --export review.csv</code>.</p>
<div class="filters">
  <label>class <select id="f-class"><option value="">all classes</option></select></label>
  <span>issue <button class="kind-btn active" data-kind="">all</button><button class="kind-btn" data-kind="likely missing">likely missing</button><button class="kind-btn" data-kind="likely wrong">likely wrong</button></span>
  <span>classes <button class="seen-btn active" data-seen="">all</button><button class="seen-btn" data-seen="seen">seen</button><button class="seen-btn" data-seen="unseen">unseen</button></span>
  <label>split <select id="f-split"><option value="">all splits</option></select></label>
  <label>path contains <input id="f-path" size="18"></label>
  <label>rows per page <select id="f-size"><option>25</option><option selected>50</option><option>100</option><option>500</option></select></label>
</div>
<p><span id="count"></span> · <button id="prev">◀ previous</button> <span id="page-info"></span> <button id="next">next ▶</button></p>
<table id="pairs"><thead><tr>
  <th data-sort="i">#</th><th>picture</th><th data-sort="path">file</th><th data-sort="source">source</th>
  <th data-sort="class">class</th><th data-sort="kind">issue</th><th data-sort="label">label</th>
  <th data-sort="suggested">suggested</th><th data-sort="suspicion">suspicion</th><th data-sort="p">p(present)</th>
  <th data-sort="rank">rank</th><th data-sort="split">split</th></tr></thead><tbody id="pair-rows"></tbody></table>

<h2 id="classes">Per class</h2>
<p>Known labels per class and how many of them the audit finds suspicious (before the per-class cap).</p>
<table id="class-table"><thead><tr><th>class</th><th>unseen</th><th>calibrated</th><th>positives</th><th>negatives</th>
<th>likely wrong</th><th>likely missing</th><th>flagged share</th><th>mean suspicion</th></tr></thead><tbody id="class-rows">%%CLASSES%%</tbody></table>

<h2 id="images">Lowest label quality images</h2>
<table id="image-table"><thead><tr><th>file</th><th>image</th><th>shard</th><th>label quality</th><th>known labels</th><th>worst class</th></tr></thead><tbody id="image-rows">%%IMAGES%%</tbody></table>

<div id="viewer" role="dialog"><div class="panel"><div class="big" id="big"></div><div id="viewer-text"></div></div></div>
<script type="application/json" id="audit-data">%%DATA%%</script>
<script>
const D = JSON.parse(document.getElementById("audit-data").textContent);
const S = {cls: "", kind: "", seen: "", split: "", q: "", sort: "i", dir: 1, page: 0, size: 50};
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const lab = v => v === 1 ? "present" : v === -1 ? "absent" : "unknown";
function overlay(r) {
  const [gh, gw] = D.grid, sc = r.patch_scores, lo = Math.min(...sc), hi = Math.max(...sc);
  return r.patches.map((p, j) => {
    const a = 0.35 + 0.5 * (hi > lo ? (sc[j] - lo) / (hi - lo) : 1), row = Math.floor(p / gw), col = p % gw;
    return `<div class="patch" style="left:${100 * col / gw}%;top:${100 * row / gh}%;width:${100 / gw}%;height:${100 / gh}%;opacity:${(a * 0.6).toFixed(2)}"></div>`;
  }).join("");
}
function filtered() {
  const q = S.q.toLowerCase();
  let rows = D.rows.filter(r => (!S.cls || r.class === S.cls) && (!S.kind || r.kind === S.kind)
    && (!S.seen || (S.seen === "unseen") === r.unseen) && (!S.split || r.split === S.split)
    && (!q || (r.path + " " + r.image_id).toLowerCase().includes(q)));
  const k = S.sort, d = S.dir;
  return rows.sort((a, b) => (a[k] < b[k] ? -d : a[k] > b[k] ? d : a.i - b.i));
}
function render() {
  const rows = filtered(), pages = Math.max(1, Math.ceil(rows.length / S.size));
  S.page = Math.min(S.page, pages - 1);
  const shown = rows.slice(S.page * S.size, (S.page + 1) * S.size);
  document.getElementById("pair-rows").innerHTML = shown.map(r => `<tr class="pair" data-i="${r.i}" data-class="${esc(r.class)}" data-kind="${esc(r.kind)}">
    <td>${r.i + 1}</td>
    <td>${r.img ? `<button class="thumb" data-i="${r.i}" title="larger view"><img src="${r.img}" alt="${esc(r.image_id)} ${esc(r.class)}">${overlay(r)}</button>` : "no picture"}</td>
    <td class="path">${esc(r.path || r.image_id)}</td><td>${esc(r.source)}</td>
    <td><a class="class-link" data-class="${esc(r.class)}">${esc(r.class)}</a>${r.unseen ? " (unseen)" : ""}</td>
    <td class="kind-${r.kind.replace(" ", "-")}">${esc(r.kind)}</td><td>${lab(r.label)}</td><td>${lab(r.suggested)}</td>
    <td>${r.suspicion.toFixed(3)}</td><td>${r.p.toFixed(3)}</td><td>${r.rank}</td><td>${esc(r.split)}</td></tr>`).join("");
  document.getElementById("count").textContent = `${rows.length} of ${D.rows.length} pairs`;
  document.getElementById("page-info").textContent = rows.length ? `rows ${S.page * S.size + 1}–${S.page * S.size + shown.length}, page ${S.page + 1} of ${pages}` : "no rows";
  document.querySelectorAll("thead th[data-sort]").forEach(th => th.className = th.dataset.sort === S.sort ? (S.dir > 0 ? "sorted-asc" : "sorted-desc") : "");
  document.querySelectorAll(".kind-btn").forEach(b => b.classList.toggle("active", b.dataset.kind === S.kind));
  document.querySelectorAll(".seen-btn").forEach(b => b.classList.toggle("active", b.dataset.seen === S.seen));
  document.getElementById("f-class").value = S.cls;
  document.body.dataset.rowsShown = shown.length;
  document.body.dataset.rowsMatching = rows.length;
  countImages();
}
function countImages() {
  const imgs = [...document.querySelectorAll("#pair-rows img")];
  Promise.all(imgs.map(i => i.complete ? null : new Promise(ok => { i.onload = i.onerror = ok; }))).then(() => {
    document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
    document.body.dataset.imagesTotal = imgs.length;
  });
}
function setFilter(k, v) { S[k] = v; S.page = 0; render(); }
function openViewer(i) {
  const r = D.rows[i];
  document.getElementById("big").innerHTML = r.img ? `<img src="${r.img}" alt="${esc(r.image_id)}">${overlay(r)}` : "no picture";
  document.getElementById("viewer-text").innerHTML = `<h3>${esc(r.class)} — ${esc(r.kind)}</h3>
    <p class="path">${esc(r.path || r.image_id)}</p><p>${esc(r.source)}</p><p>sample ${esc(r.image_id)} in ${esc(r.shard)}</p>
    <p>label: ${lab(r.label)} → suggested: ${lab(r.suggested)}</p><p>${esc(r.reason)}</p>
    <p>${r.patches.length ? "red: the patches DART selected for the class" : "no patches stored (not among the image's tags)"}</p>
    <p><button id="close">close</button></p>`;
  document.getElementById("viewer").classList.add("open");
  document.body.dataset.viewer = String(i);
}
function closeViewer() { document.getElementById("viewer").classList.remove("open"); delete document.body.dataset.viewer; }
document.addEventListener("click", e => {
  const t = e.target.closest("button, a, th");
  if (!t) { if (e.target.id === "viewer") closeViewer(); return; }
  if (t.classList.contains("kind-btn")) setFilter("kind", t.dataset.kind);
  else if (t.classList.contains("seen-btn")) setFilter("seen", t.dataset.seen);
  else if (t.classList.contains("class-link")) { setFilter("cls", t.dataset.class); document.getElementById("suspicious").scrollIntoView(); }
  else if (t.classList.contains("thumb")) openViewer(+t.dataset.i);
  else if (t.id === "close") closeViewer();
  else if (t.id === "prev") { S.page = Math.max(0, S.page - 1); render(); }
  else if (t.id === "next") { S.page += 1; render(); }
  else if (t.dataset && t.dataset.sort) { S.dir = S.sort === t.dataset.sort ? -S.dir : (["suspicion", "p"].includes(t.dataset.sort) ? -1 : 1); S.sort = t.dataset.sort; render(); }
});
document.addEventListener("keydown", e => { if (e.key === "Escape") closeViewer(); });
const fc = document.getElementById("f-class"), fs = document.getElementById("f-split");
D.class_names.forEach(c => fc.add(new Option(c, c)));
D.splits.forEach(s => fs.add(new Option(s, s)));
fc.onchange = () => setFilter("cls", fc.value);
fs.onchange = () => setFilter("split", fs.value);
document.getElementById("f-path").oninput = e => setFilter("q", e.target.value);
document.getElementById("f-size").onchange = e => { S.size = +e.target.value; S.page = 0; render(); };
render();
document.body.dataset.ready = "1";
</script>
</body></html>
"""
