"""`dart eval` on hand-made prediction folders: the counts behind each setting, and the warnings
when a run is half finished or a class lacks negative / positive labels."""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from dart_core.data.shard_format import shard_id
from dart_core.predictions import SCHEMAS, vocab_table
from dart_core.vocab import Vocabulary
from flows.cli import app

VOCAB = Vocabulary.from_names(["a", "b", "c"], unseen={"c"})
SHARDS = ["/data/shards/val/000000.tar", "/data/shards/val/000001.tar"]
# shard -> image -> (scores over a, b, c; known labels)
IMAGES = {
    SHARDS[0]: {"img1": ([5, 1, 0], {"a": 1, "b": -1, "c": -1}), "img2": ([0, 4, 3], {"a": -1, "b": 1})},
    SHARDS[1]: {"img3": ([2, 0, 6], {"a": 1, "c": 1}), "img4": ([1, 2, 7], {"c": -1})},
}


def write_run(pred: Path, images=IMAGES) -> None:
    """What `dart annotate` leaves: run.json naming the shards, per shard the four tables and the
    done marker, and the vocabulary."""
    for url, imgs in images.items():
        sid = shard_id(url)
        rows = {n: {f: [] for f in SCHEMAS[n].names} for n in SCHEMAS}
        for img, (scores, labels) in imgs.items():
            rows["scores"]["image_id"].append(img)
            rows["scores"]["scores"].append(np.asarray(scores, np.float16))
            for cid, lab in labels.items():
                for k, v in (("image_id", img), ("class_id", cid), ("label", lab)):
                    rows["labels"][k].append(v)
        for name in SCHEMAS:
            p = pred / name / f"shard={sid}" / "part.parquet"
            p.parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pydict(rows[name], schema=SCHEMAS[name]), p)
        (pred / "_done").mkdir(exist_ok=True)
        (pred / "_done" / f"{sid}.json").write_text(json.dumps({"shard": sid, "images": len(imgs)}))
    (pred / "vocab").mkdir()
    pq.write_table(vocab_table(VOCAB, None), pred / "vocab" / "vocab.parquet")
    (pred / "run.json").write_text(json.dumps({"shards": list(images)}))


def dart_eval(pred: Path):
    r = CliRunner().invoke(app, ["eval", str(pred), "--k", "1"])
    assert r.exit_code == 0, r.output
    return r.stdout, r.stderr


def test_table_counts_are_exact_and_a_complete_run_has_no_warning(tmp_path):
    write_run(tmp_path)
    out, err = dart_eval(tmp_path)
    # ZSL ranks c only: img4 (-) above img3 (+) -> AP 0.5; top-1 is c everywhere, right once in 4
    # images. GZSL: a and b rank their positives first, mAP (1 + 1 + 0.5) / 3; top-1 right on
    # img1, img2, img3 of 4 positives. Labelled: ZSL img1, img3, img4; seen img1, img2, img3.
    assert out.splitlines() == [
        "setting      mAP      P@1      R@1     F1@1      classes           images",
        "ZSL        50.00    25.00   100.00    40.00          1/1              3/4",
        "GZSL       83.33    75.00    75.00    75.00          3/3              4/4",
        "SEEN      100.00                                     2/2              3/4",
        "classes: with a positive label / in the setting; images: with a known label in the setting / scored",
    ]
    assert err == ""


def test_half_finished_run_is_flagged(tmp_path):
    write_run(tmp_path)
    sid = shard_id(SHARDS[1])
    (tmp_path / "_done" / f"{sid}.json").unlink()  # the run stopped before shard 2 finished
    for name in SCHEMAS:
        shutil.rmtree(tmp_path / name / f"shard={sid}")
    out, err = dart_eval(tmp_path)
    assert err.splitlines() == [
        f"warning: {tmp_path}: 1 of 2 shards of the run are finished; not finished: val-000001; the numbers do "
        "not cover the whole run (rerun the same `dart annotate` to finish it)",
        "warning: 1 of 3 classes have no positive label (c): they are left out of mAP",  # img3 went with it
    ]
    # the table counts what is there: 2 images, of which img1 has a label for c
    assert out.splitlines()[1] == "ZSL          nan     0.00     0.00     0.00          0/1              1/2"


def test_classes_without_negatives_or_positives_are_named(tmp_path):
    positive_only = {url: {img: (s, {c: v for c, v in lab.items() if v == 1}) for img, (s, lab) in imgs.items()}
                     for url, imgs in IMAGES.items()}
    positive_only[SHARDS[1]]["img3"] = ([2, 0, 6], {"a": 1})  # and no positive for c at all
    write_run(tmp_path, positive_only)
    out, err = dart_eval(tmp_path)
    assert err.splitlines() == [
        "warning: 2 of 3 classes have no negative label (a, b): their AP is 100 whatever the scores; if the "
        "label files list only the classes present, shard them with absent classes as negatives "
        "(`dart shard --absent negative`, the default)",
        "warning: 1 of 3 classes have no positive label (c): they are left out of mAP",
    ]
    assert out.splitlines()[1].startswith("ZSL          nan")
