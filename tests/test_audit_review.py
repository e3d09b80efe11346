"""The audit loop on the tiny fixtures: inject known label errors into shards that carry their
original file paths, annotate, audit (report + review export), accept the true errors, turn the
review into a corrections file, and check `dart eval` / `dart train` use the corrected labels. The
report is driven in headless Chromium over the DevTools protocol: real mouse clicks on a filter."""
import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dart_core.audit import inject_label_errors
from dart_core.data import shard_format as F
from flows.cli import app
from tests.annotate_fixtures import COLOURS, picture, world  # noqa: F401
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401
from tests.test_audit import CHROMIUM_FLAGS

N_SHARDS, PER_SHARD = 2, 8


def write_source_shards(folder: Path) -> dict:
    """Shards whose samples name their original file (source.file), as `dart shard` writes them;
    3 known labels per image (2 positives, 1 negative), one class unknown. Returns {key: labels}."""
    import random

    rng = random.Random(1)
    names = list(COLOURS)
    folder.mkdir(parents=True)
    truth = {}
    for s in range(N_SHARDS):
        data, row = b"", 2
        for i in range(PER_SHARD):
            present = rng.sample(names, 2)
            labels = {n: 1 for n in present} | {[n for n in names if n not in present][0]: -1}
            key = f"photo{s}{i:02d}_jpg~{s}{i:02d}"
            src = {"dataset": "folder", "file": f"photos/{s}/{i:02d}.jpg", "row": f"labels.csv:{row}"}
            data += F.sample_tar_bytes(key, picture(present), F.sample_json(key, labels, src))
            truth[key] = labels
            row += 1
        (folder / F.file_name(s, F.TAR)).write_bytes(data + F.tar_end(len(data)))
        (folder / F.file_name(s, F.STATS)).write_text(json.dumps({"ok": PER_SHARD, "inputs": PER_SHARD}))
    return truth


@pytest.fixture(scope="module")
def loop(world, tmp_path_factory, prefect_harness):  # noqa: F811
    from dart_core.options.annotate import AnnotateOptions
    from flows.annotate import annotate_flow

    root = tmp_path_factory.mktemp("audit_loop")
    truth = write_source_shards(root / "clean" / "val")
    flipped = inject_label_errors(root / "clean" / "val", root / "noisy" / "val", seed=0, pos_rate=0.25, neg_rate=0.25)
    for name in ("clean", "noisy"):
        annotate_flow(AnnotateOptions(checkpoint=world["checkpoint"], shards=root / name, classes=world["classes"],
                                      out=root / f"pred_{name}", crg=world["crg"], batch_size=8, top_m=4))
    return {**world, "root": root, "truth": truth, "flipped": flipped, "pred": str(root / "pred_noisy"),
            "clean_pred": str(root / "pred_clean")}


def test_injected_errors_are_exact(loop):
    # 16 images x (2 positives, 1 negative): round(0.25 x 32) = 8 positives, round(0.25 x 16) = 4 negatives
    flipped = loop["flipped"]
    assert len(flipped) == 12
    assert sum(loop["truth"][k][c] == 1 for k, c in flipped) == 8
    assert inject_label_errors(loop["root"] / "clean" / "val", loop["root"] / "again", 0, 0.25, 0.25) == flipped
    assert inject_label_errors(loop["root"] / "clean" / "val", loop["root"] / "other", 1, 0.25, 0.25) != flipped


def test_export_review_corrections_eval(loop, tmp_path):
    """export -> accept the true errors -> corrections -> `dart eval --corrections` equals the eval of
    the clean labels, and the run records what it applied."""
    review = tmp_path / "review.csv"
    r = CliRunner().invoke(app, ["audit", loop["pred"], "--export", str(review), "--min-suspicion", "0",
                                 "--limit", "1000"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(review.open()))
    assert list(rows[0]) == ["path", "class", "current_label", "suggested_label", "score", "reason", "kind",
                             "decision", "shard", "image_id", "class_id"]
    known = {(k, c) for k, labels in loop["truth"].items() for c in labels}
    exported = {(x["image_id"], x["class_id"]) for x in rows}
    assert known <= exported and len(known) == 48  # min-suspicion 0: every known label is listed
    for x in rows:
        key, cid = x["image_id"], x["class_id"]
        s, i = key[len("photo")], key[len("photo") + 1:len("photo") + 3]
        assert x["path"] == f"photos/{s}/{i}.jpg"  # the original file, carried through annotate
        if (key, cid) in known:
            now = -loop["truth"][key][cid] if (key, cid) in loop["flipped"] else loop["truth"][key][cid]
            assert int(x["current_label"]) == now and int(x["suggested_label"]) == -now
            assert x["kind"] == ("likely wrong" if now == 1 else "likely missing")
    scores = [float(x["score"]) for x in rows]
    assert scores == sorted(scores, reverse=True)
    for x in rows:  # the reviewer accepts exactly the injected errors
        x["decision"] = "accept" if (x["image_id"], x["class_id"]) in loop["flipped"] else "reject"
    with review.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    corr = tmp_path / "corrections.csv"
    r = CliRunner().invoke(app, ["corrections", str(review), "--out", str(corr)])
    assert r.exit_code == 0, r.output
    assert r.output == f"12 accepted, {len(rows) - 12} rejected, 0 without a decision -> 12 corrections in {corr}\n"
    written = {(x["image_id"], x["class_id"]): int(x["label"]) for x in csv.DictReader(corr.open())}
    assert written == {(k, c): loop["truth"][k][c] for k, c in loop["flipped"]}

    from dart_core.corrections import read
    from dart_core.evaluate import evaluate, labelled

    con, applied = labelled(loop["pred"], read(corr))
    assert applied["changed"] == applied["matched"] == applied["rows"] == 12
    used = {(k, c): lab for k, c, lab in con.execute("SELECT image_id, class_id, label FROM labels").fetchall()}
    assert used == {(k, c): v for k, labels in loop["truth"].items() for c, v in labels.items()}
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", loop["pred"], "--corrections", str(corr), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "labels: shard labels with 12 corrections from" in r.output and "12 labels changed" in r.output
    res = json.loads(out.read_text())
    assert res["labels"]["corrections_sha256"] == read(corr).sha256 and res["labels"]["changed"] == 12
    clean = evaluate(loop["clean_pred"])
    noisy = evaluate(loop["pred"])
    for setting in clean:  # the corrected labels are the clean ones: the same figures
        assert res[setting] == pytest.approx(clean[setting]), setting
    assert noisy["gzsl"]["mAP"] != pytest.approx(clean["gzsl"]["mAP"])
    # the review file itself works as --corrections too (its accepted rows)
    assert read(review).labels == read(corr).labels


def test_train_applies_corrections(loop, tmp_path):
    """The training reader yields the corrected labels, and the checkpoint records the file."""
    import torch

    from dart_core.corrections import Corrections
    from dart_core.data.reader import make_loader
    from dart_core.vocab import Vocabulary

    fixes = {(k, c): loop["truth"][k][c] for k, c in loop["flipped"]}
    corr_file = tmp_path / "corrections.csv"
    corr_file.write_text("image_id,class_id,label\n" + "".join(f"{k},{c},{v}\n" for (k, c), v in fixes.items()))
    vocab = Vocabulary.read_csv(loop["classes"]).subset("seen")
    noisy = str(loop["root"] / "noisy" / "val")

    def labels_seen(corrections):
        out = {}
        for _, y, keys in make_loader(noisy, vocab, lambda im: torch.zeros(3, 8, 8), 5, train=False,
                                      corrections=corrections):
            for key, row in zip(keys, y.tolist()):
                out.update({(key, c): v for c, v in zip(vocab.ids, row) if v != 0})
        return out

    from dart_core.corrections import read

    seen_truth = {(k, c): v for k, labels in loop["truth"].items() for c, v in labels.items() if c in vocab.ids}
    assert labels_seen(read(corr_file).by_image()) == seen_truth
    assert labels_seen(None) != seen_truth
    assert isinstance(read(corr_file), Corrections)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--shards", noisy, "--classes", loop["classes"], "--out", str(run),
                                 "--backbone", "dart-tiny-vit", "--pretrained", loop["clip"], "--epochs", "1",
                                 "--batch-size", "8", "--val-share", "0", "--corrections", str(corr_file)])
    assert r.exit_code == 0, r.output
    doc = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert doc["train_config"]["corrections"] == str(corr_file)
    assert doc["train_config"]["corrections_sha256"] == read(corr_file).sha256


@pytest.mark.parametrize("content, message", [
    ("image_id,class_id,label\nx,red,2\n", "line 2: label '2' is not 1, -1 or 0"),
    ("image_id,class,label\nx,red,1\n", "column class_id missing"),
    ("path,class,current_label,suggested_label,score,reason,kind,decision,shard,image_id,class_id\n"
     "p,red,1,-1,0.9,r,likely wrong,maybe,s,x,red\n", "line 2: decision 'maybe' is not accept, reject or empty"),
    ("image_id,class_id,label\nx,red,1\nx,red,-1\n", "line 3: x / red is corrected twice, to 1 and to -1"),
])
def test_bad_corrections_exit_2_with_one_line(loop, tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    for args in (["eval", loop["pred"], "--corrections", str(bad)],
                 ["audit", loop["pred"], "--export", str(tmp_path / "r.csv"), "--corrections", str(bad)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"error: {bad}") and message in r.output and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(app, ["audit", loop["pred"]])
    assert r.exit_code == 2 and r.output == "error: give --out REPORT_DIR, --export review.csv, or both\n"


# ---- the report in headless Chromium, driven over the DevTools protocol ---------------------------

class Browser:
    """Headless Chromium over the DevTools protocol (websockets): navigate, evaluate, click with
    real mouse events at an element's centre."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        assert chromium, "Chromium is needed (make test installs Debian's chromium: infra/ensure-chromium.sh)"
        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert time.time() < deadline and self.proc.poll() is None, "Chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self.n = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params} | ({"sessionId": session} if session else {})
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.n:
                assert "error" not in reply, reply
                return reply.get("result", {})

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def js(self, expr):
        return self.page("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)["result"].get("value")

    def wait(self, expr, timeout=30):
        deadline = time.time() + timeout
        while not self.js(expr):
            assert time.time() < deadline, f"timed out waiting for {expr}"
            time.sleep(0.05)

    def goto(self, url):
        self.page("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.body && document.body.dataset.ready === '1'")

    def click(self, selector):
        x, y = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def rows(self):
        return self.js("[...document.querySelectorAll('#pair-rows tr.pair')].map(t => [t.dataset.class, t.dataset.kind])")

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_report_filters_sort_page_and_viewer_in_chromium(loop, tmp_path):
    from dart_core.options.annotate import AuditOptions
    from flows.evaluate import audit_flow

    res = audit_flow(AuditOptions(pred=loop["pred"], out=tmp_path / "report", min_suspicion=0.0, limit=1000),
                     details=True)
    page = Path(res["report"])
    from dart_core.audit import run_audit

    pairs = run_audit(loop["pred"], max_rows=1000, min_suspicion=0.0)["pairs"]
    n = len(pairs)
    assert n == res["pairs"] > 50  # more than one page
    b = Browser(tmp_path / "chrome")
    try:
        b.goto(page.as_uri())
        assert b.js("document.getElementById('count').textContent") == f"{n} of {n} pairs"
        assert len(b.rows()) == 50  # page 1 of the default 50 rows
        b.wait("document.body.dataset.imagesTotal !== undefined")
        assert b.js("+document.body.dataset.imagesLoaded") == b.js("+document.body.dataset.imagesTotal") == 50
        header = b.js("document.getElementById('run').textContent")
        run = json.loads((Path(loop["pred"]) / "run.json").read_text())
        assert run["vocab_hash"][:12] in header and run["created"] in header and "model" in header
        # click the "likely wrong" filter: exactly the labelled-present pairs remain
        b.click(".kind-btn[data-kind='likely wrong']")
        wrong = [p for p in pairs if p["kind"] == "likely wrong"]
        assert b.js("+document.body.dataset.rowsMatching") == len(wrong)
        assert {k for _, k in b.rows()} == {"likely wrong"}
        # then a class name in a row: that class's likely-wrong pairs remain
        cls = b.js("document.querySelector('#pair-rows a.class-link').dataset.class")
        b.click("#pair-rows a.class-link")
        expect = [p for p in wrong if p["class_name"] == cls]
        assert b.js("+document.body.dataset.rowsMatching") == len(expect)
        assert b.rows() == [[cls, "likely wrong"]] * min(50, len(expect))
        # sort by suspicion ascending (two clicks: descending first), rows follow
        b.click("th[data-sort='suspicion']")
        b.click("th[data-sort='suspicion']")
        shown = b.js("[...document.querySelectorAll('#pair-rows tr.pair')].map(t => +t.dataset.i)")
        assert shown == sorted((i for i, p in enumerate(pairs) if p in expect),
                               key=lambda i: (pairs[i]["suspicion"], i))[:50]
        # back to everything, next page
        b.click(".kind-btn[data-kind='']")
        b.js("document.getElementById('f-class').value = ''; document.getElementById('f-class').onchange()")
        b.click("#next")
        assert b.js("document.getElementById('page-info').textContent").startswith(f"rows 51–{min(100, n)}, page 2")
        # the larger view with the heatmap: as many red patches as the tag has patches
        i = b.js("+document.querySelector('#pair-rows button.thumb').dataset.i")
        b.click("#pair-rows button.thumb")
        assert b.js("document.getElementById('viewer').classList.contains('open')")
        assert b.js("document.querySelectorAll('#big .patch').length") == len(pairs[i]["patches"] or [])
        assert pairs[i]["file"] in b.js("document.getElementById('viewer-text').textContent")
        b.click("#close")
        assert not b.js("document.getElementById('viewer').classList.contains('open')")
    finally:
        b.close()
