"""Source readers on the datasets' real published layouts: the Open Images zero-shot
split files and CVDF image folders, COCO / NUS-WIDE messages and malformed cells, and sample keys
for paths of every kind."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np
import pytest

from dart_core.storage import Storage
from dart_core.data.records import SourceError, sample_key
from dart_core.data.sources import open_source
from dart_core.data.sources._util import CellWarnings
from dart_core.data.sources.openimages import load_mid_pickle
from tests.data_fixtures import OI_IDS, jpeg, make_coco, make_nuswide, make_openimages, write_published_split

POOL = ["/m/005", "/m/006", "/m/002", "/m/004"]   # stands for the 2,594 MIDs of unseen_labels.pkl
ROWS_CSV = "3\r\n\r\n0\r\n2\r\n"                  # stands for the 400 rows of top_400_unseen.csv


def _by_key(src):
    return {r.key: r for r in src.records}


def source_error(*args, **kw) -> str:
    """The one-line message of the SourceError that open_source(*args, **kw) raises."""
    with pytest.raises(SourceError) as e:
        open_source(*args, **kw)
    return str(e.value)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# ---- Open Images: the published zero-shot split ------------------------------------------------

def test_openimages_v4_published_split_official_and_cvdf_layout(tmp_path, caplog):
    """V4 metadata in ROOT, labels in ROOT/train/ (the official URL layout), images in the CVDF
    folders train_0 … train_f, and the LESA/BiAM split files: unseen = the pickle's rows the CSV
    names, in CSV order; a trainable MID among them is unseen, not seen."""
    exp = make_openimages(tmp_path, "v4", labels_in="split", images="cvdf")
    write_published_split(tmp_path, POOL, [], csv_text=ROWS_CSV)   # BOM, CRLF, a blank line
    src = open_source("openimages", str(tmp_path), split="train")
    assert src.vocab.ids == ("/m/000", "/m/001", "/m/003", "/m/004", "/m/005", "/m/002")
    assert src.vocab.splits == ("seen",) * 3 + ("unseen",) * 3
    assert src.split_rule == ("unseen = 3 MIDs: the rows of unseen_labels.pkl (4 MIDs) listed in top_400_unseen.csv; "
                              "seen = 3 MIDs: classes-trainable.txt (4) minus the unseen ones (1 in both lists)")
    recs = _by_key(src)
    assert set(recs) == set(OI_IDS) | {"a" * 16, "b" * 16, "c" * 16}
    vocab = set(src.vocab.ids)
    for iid in OI_IDS + ["b" * 16]:
        r = recs[iid]
        assert r.error is None and r.path == exp["paths"][iid]
        assert r.path == str(tmp_path / f"train_{iid[0]}" / f"{iid}.jpg")
        assert r.labels == {m: v for m, v in exp["raw"][iid].items() if m in vocab}
        assert r.source == {"dataset": "openimages", "split": "train", "image_id": iid, "file": f"{iid}.jpg",
                            "row": r.source["row"]}
    assert recs[OI_IDS[0]].labels == {"/m/000": 1, "/m/001": -1, "/m/005": 1}
    assert recs[OI_IDS[0]].source["row"] == "train/train-annotations-human-imagelabels.csv:2"
    assert recs["a" * 16].error[0] == "unknown_class"
    assert recs["c" * 16].error == (
        "missing_file", f"train/train-annotations-human-imagelabels.csv:{exp['missing_line']}: "
                        f"{'c' * 16}.jpg not found in {tmp_path / 'train'} or {tmp_path / 'train_c'}")
    assert _warnings(caplog) == [f"train/train-annotations-human-imagelabels.csv:{exp['bad_conf_line']}: confidence "
                                 f"'0.5' is not 0 or 1; /m/000 is unknown for image {'b' * 16}"]


def test_openimages_mixed_image_folders(tmp_path):
    """Images partly in ROOT/train/ and partly in ROOT/train_<d>/ are all found."""
    exp = make_openimages(tmp_path, "v6", images="cvdf")
    (tmp_path / "train").mkdir()
    moved = tmp_path / "train" / f"{OI_IDS[2]}.jpg"
    shutil.move(exp["paths"][OI_IDS[2]], moved)
    recs = _by_key(open_source("openimages", str(tmp_path), n_unseen=2))
    assert recs[OI_IDS[2]].path == str(moved) and recs[OI_IDS[2]].error is None
    assert recs[OI_IDS[3]].path == exp["paths"][OI_IDS[3]] and recs[OI_IDS[3]].error is None
    assert recs["c" * 16].error[1].endswith(f"{'c' * 16}.jpg not found in {tmp_path / 'train'} or {tmp_path / 'train_c'}")
    assert recs["c" * 16].path == str(tmp_path / "train" / f"{'c' * 16}.jpg")


class CountingFS(Storage):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[str]] = {"exists": [], "list": [], "read_bytes": []}

    def exists(self, url):
        self.calls["exists"].append(url)
        return super().exists(url)

    def list(self, prefix):
        self.calls["list"].append(prefix)
        return super().list(prefix)

    def read_bytes(self, url):
        self.calls["read_bytes"].append(url)
        return super().read_bytes(url)


def test_openimages_lists_each_image_folder_once(tmp_path):
    """No per-image existence checks: each candidate folder is listed once, whatever the number of images."""
    make_openimages(tmp_path, "v6", images="cvdf")
    fs = CountingFS()
    recs = list(open_source("openimages", str(tmp_path), fs=fs, n_unseen=2).records)
    assert len(recs) == len(OI_IDS) + 3
    lists = fs.calls["list"]
    assert len(lists) == len(set(lists)) == 17
    assert set(lists) == {str(tmp_path / "train")} | {str(tmp_path / f"train_{d}") for d in "0123456789abcdef"}
    assert not any(u.endswith(".jpg") for u in fs.calls["exists"] + fs.calls["read_bytes"])


@pytest.mark.parametrize("variant", ["unicode-p4", "object-p2", "object-p5", "unicode-p5", "bytes-p2", "numpy1-p2",
                                     "list-p4"])
def test_unseen_pickle_variants(variant):
    mids = ["/m/05", "/m/0abc_d"]
    kind, proto = variant.split("-p")
    obj = {"unicode": np.array(mids), "object": np.array(mids, dtype=object), "numpy1": np.array(mids),
           "bytes": np.array([m.encode() for m in mids]), "list": list(mids)}[kind]
    data = pickle.dumps(obj, protocol=int(proto))
    if kind == "numpy1":   # how numpy 1.x (and the 2018 file) names the reconstructor
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in data
    assert load_mid_pickle(data, "unseen_labels.pkl") == mids


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def test_unseen_pickle_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    make_openimages(tmp_path, "v6")
    write_published_split(tmp_path, POOL, [3, 0, 2])
    evil = np.array([_RunsCode(os.system, f"touch {marker}")], dtype=object)
    (tmp_path / "unseen_labels.pkl").write_bytes(pickle.dumps(evil))
    pkl = tmp_path / "unseen_labels.pkl"
    assert source_error("openimages", str(tmp_path)) == (f"{pkl}: refused to unpickle {os.system.__module__}.system: only a numpy array or list "
                            "of MID strings is read from this file")
    assert not marker.exists()
    with pytest.raises(SourceError, match=r"^x\.pkl: refused to unpickle builtins\.exec: "):
        load_mid_pickle(pickle.dumps(_RunsCode(exec, f"open({str(marker)!r}, 'w')")), "x.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("obj, message", [
    (np.arange(3), "x.pkl: not a pickled array of MIDs (UnpicklingError: dtype int64 is not a string dtype)"),
    ({"a": "/m/01"}, "x.pkl: expected an array or list of MID strings, got dict"),
    (np.array([["/m/01"]]), "x.pkl: expected a 1-D array of MID strings, got a <U5 array of shape (1, 1)"),
    (["/m/01", 3], "x.pkl: item 1 (3) is not a MID string"),
])
def test_unseen_pickle_not_an_array_of_mids(obj, message):
    with pytest.raises(SourceError) as e:
        load_mid_pickle(pickle.dumps(obj), "x.pkl")
    assert str(e.value) == message


def test_unseen_pickle_truncated():
    with pytest.raises(SourceError) as e:
        load_mid_pickle(pickle.dumps(np.array(POOL))[:40], "x.pkl")
    assert str(e.value).startswith("x.pkl: not a pickled array of MIDs (") and "\n" not in str(e.value)


@pytest.mark.parametrize("csv_text, message", [
    ("3\r\nx\r\n", "{csv}:2: 'x' is not a row index of unseen_labels.pkl"),
    ("3\r\n4\r\n", "{csv}:2: row index 4 is outside unseen_labels.pkl (rows 0..3)"),
    ("\r\n-1\r\n", "{csv}:2: row index -1 is outside unseen_labels.pkl (rows 0..3)"),
    ("3\r\n0\r\n3\r\n", "{csv}:3: row index 3 repeats line 1"),
    ("\r\n\r\n", "{csv}: no row indices"),
])
def test_top_unseen_csv_bad_lines(tmp_path, csv_text, message):
    make_openimages(tmp_path, "v6")
    write_published_split(tmp_path, POOL, [], csv_text=csv_text)
    assert source_error("openimages", str(tmp_path)) == message.format(csv=tmp_path / "top_400_unseen.csv")


def test_published_split_needs_both_files(tmp_path):
    make_openimages(tmp_path, "v6")
    write_published_split(tmp_path, POOL, [3, 0])
    (tmp_path / "unseen_labels.pkl").unlink()
    assert source_error("openimages", str(tmp_path)) == (f"{tmp_path / 'top_400_unseen.csv'}: the published split needs unseen_labels.pkl beside "
                            f"it (not found in {tmp_path})")


def test_unseen_txt_takes_precedence_over_published_files(tmp_path):
    make_openimages(tmp_path, "v6")
    write_published_split(tmp_path, POOL, [3, 0, 2])
    (tmp_path / "unseen.txt").write_text("/m/006\n")
    src = open_source("openimages", str(tmp_path))
    assert src.vocab.ids[-1:] == ("/m/006",) and src.vocab.unseen_mask.sum() == 1
    assert src.split_rule.startswith("unseen = 1 MIDs listed in unseen.txt (unseen.txt takes precedence over "
                                     "top_400_unseen.csv); seen = 4 MIDs")


def test_computed_unseen_short_of_n_unseen_warns(tmp_path, caplog):
    make_openimages(tmp_path, "v6")
    src = open_source("openimages", str(tmp_path))    # n_unseen 400, the labels have 3 candidates
    assert src.vocab.ids[4:] == ("/m/007", "/m/004", "/m/005")
    assert src.split_rule.startswith(
        "unseen = 3 MIDs: the non-trainable classes with the most positive human labels in "
        f"oidv6-train-annotations-human-imagelabels.csv (asked for 400, only 3 found; no unseen.txt or "
        f"top_400_unseen.csv + unseen_labels.pkl in {tmp_path}); seen = 4 MIDs")
    assert _warnings(caplog) == [
        f"oidv6-train-annotations-human-imagelabels.csv: 3 unseen classes instead of 400; put the published "
        f"top_400_unseen.csv and unseen_labels.pkl in {tmp_path} for the papers' split"]


def test_openimages_labels_not_found_names_where_it_looked(tmp_path):
    make_openimages(tmp_path, "v6")
    assert source_error("openimages", str(tmp_path), split="validation") == (f"{tmp_path}: no Open Images validation image labels found (looked for "
                            f"[oidv7-|oidv6-]{{validation,val}}-annotations-human-imagelabels[-boxable].csv in "
                            f"{tmp_path} and {tmp_path / 'validation'})")


def test_openimages_no_images_names_where_it_looked(tmp_path):
    make_openimages(tmp_path, "v6", labels_in="split")
    for p in (tmp_path / "train").glob("*.jpg"):
        p.unlink()
    assert source_error("openimages", str(tmp_path)) == (f"{tmp_path}: no Open Images train images found (looked for <ImageID>.jpg in "
                            f"{tmp_path / 'train'} and {tmp_path / 'train'}_[0-9a-f])")


# ---- COCO and NUS-WIDE messages ----------------------------------------------------------------

def test_coco_unknown_split_names_available_ones(tmp_path):
    make_coco(tmp_path, "val2014")
    make_coco(tmp_path, "train2014")
    assert source_error("coco", str(tmp_path), split="train") == (f"{tmp_path / 'annotations' / 'instances_train.json'}: not found; "
                            "available splits: train2014, val2014")
    assert source_error("coco", str(tmp_path)) == f"{tmp_path}: pass --split: found annotations/instances_{{split}}.json for train2014, val2014"


def test_coco_images_folder_instead_of_root(tmp_path):
    make_coco(tmp_path, "val2014")
    images = tmp_path / "val2014"
    assert source_error("coco", str(images)) == (f"{images}: no COCO annotations/instances_{{split}}.json found (pass the folder that "
                            "holds annotations/ and the image folders)")
    assert source_error("coco", str(images), split="val2014") == (f"{images / 'annotations' / 'instances_val2014.json'}: not found; "
                            f"no annotations/instances_{{split}}.json in {images}")


def test_cell_warnings_are_capped_per_file(caplog):
    w = CellWarnings(limit=2)
    for line in range(1, 5):
        w.warn("Labels_dog_Train.txt", line, "'?' is not 0/1")
    w.warn("other.txt", 9, "bad")
    w.finish()
    assert _warnings(caplog) == [
        "Labels_dog_Train.txt:1: '?' is not 0/1", "Labels_dog_Train.txt:2: '?' is not 0/1", "other.txt:9: bad",
        "Labels_dog_Train.txt: 2 more malformed label cells not shown (4 in all; each such label is unknown)"]
    assert w.counts == {"Labels_dog_Train.txt": 4, "other.txt": 1}


def test_nuswide_warning_reaches_stderr_without_logging_setup(tmp_path):
    """With no logging configured (a plain `dart shard` run), the warning is printed on stderr."""
    import subprocess

    make_nuswide(tmp_path)
    code = ("import sys; from dart_core.data.sources import open_source; "
            "print(len(list(open_source('nuswide', sys.argv[1]).records)))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and r.stdout.strip() == "5"
    assert "Groundtruth/TrainTestLabels/Labels_animal_Train.txt:2: 'x' is not 0/1" in r.stderr
    assert "NUS_WID_Tags/Train_Tags1k.dat:4: column 3 ('sunset') is '2', not 0/1" in r.stderr


# ---- sample keys and relative paths ------------------------------------------------------------

TRICKY = ["写真/猫.jpg", "写真/犬.jpg", "a/b_c.jpg", "a_b/c.jpg", "with space.jpg", "quote'\"s.jpg", "a.jpg", "a.png"]


def make_tricky_folder(root) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        for i, rel in enumerate(TRICKY):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg(64, 48, i))
            w.writerow([rel, "cat" if i % 2 else "dog"])


def test_folder_keys_unique_for_every_path(tmp_path):
    make_tricky_folder(tmp_path)
    recs = list(open_source("folder", str(tmp_path)).records)
    assert [r.source["file"] for r in recs] == TRICKY
    assert all(r.error is None for r in recs)
    keys = [r.key for r in recs]
    assert len(set(keys)) == len(TRICKY)
    assert keys == [sample_key(p) for p in TRICKY]
    assert keys[TRICKY.index("a.jpg")] == "a" and keys[TRICKY.index("a.png")] != "a"
    assert all("." not in k and "/" not in k for k in keys)
    assert [r.path for r in recs] == [str(tmp_path / p) for p in TRICKY]


def test_every_source_keeps_the_relative_path_as_file(tmp_path):
    make_coco(tmp_path / "coco")
    make_nuswide(tmp_path / "nus")
    make_openimages(tmp_path / "oi", "v6")
    make_tricky_folder(tmp_path / "folder")
    for fmt, root in (("coco", "coco"), ("nuswide", "nus"), ("openimages", "oi"), ("folder", "folder")):
        recs = list(open_source(fmt, str(tmp_path / root)).records)
        assert recs and all(r.key == sample_key(r.source["file"]) for r in recs), fmt
    coco = _by_key(open_source("coco", str(tmp_path / "coco")))
    assert coco["COCO_val2014_000000000010"].source["file"] == "COCO_val2014_000000000010.jpg"


def test_shard_tricky_folder_end_to_end(tmp_path):
    """Every path is in the shards exactly once, with its relative path in the sample json and the
    parquet sidecar."""
    pq = pytest.importorskip("pyarrow.parquet")
    from dart_core.data.shard_run import shard_source
    from dart_core.options.data import ShardOptions

    make_tricky_folder(tmp_path / "src")
    out = tmp_path / "out"
    report = shard_source(ShardOptions(source=str(tmp_path / "src"), format="folder", out=str(out), workers=1),
                          progress=False)
    assert report["ok"] == len(TRICKY) and report["failed"] == 0
    files_json, members = [], []
    for tar in sorted((out / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                members.append(m.name)
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    assert meta["id"] == sample_key(meta["source"]["file"])
                    files_json.append(meta["source"]["file"])
    assert sorted(files_json) == sorted(TRICKY)
    assert sorted(members) == sorted(f"{sample_key(p)}.{ext}" for p in TRICKY for ext in ("jpg", "json"))
    rows = [r for f in sorted((out / "train").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(json.loads(r["source"])["file"] for r in rows) == sorted(TRICKY)
    assert {r["key"]: json.loads(r["source"])["file"] for r in rows} == {sample_key(p): p for p in TRICKY}


def test_dart_shard_prints_the_split_rule_before_the_run(tmp_path):
    """`dart shard` says which rule made the seen/unseen split, with the counts, on stderr before
    sharding starts; `--json` carries the same line as `split_rule`."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    make_openimages(tmp_path / "oi", "v4", labels_in="split", images="cvdf")
    write_published_split(tmp_path / "oi", POOL, [], csv_text=ROWS_CSV)
    rule = ("unseen = 3 MIDs: the rows of unseen_labels.pkl (4 MIDs) listed in top_400_unseen.csv; "
            "seen = 3 MIDs: classes-trainable.txt (4) minus the unseen ones (1 in both lists)")
    r = CliRunner().invoke(app, ["shard", str(tmp_path / "oi"), "--format", "openimages", "--out", str(tmp_path / "out"),
                                 "--workers", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == f"openimages train: {rule}"
    assert json.loads(r.stdout)["split_rule"] == rule
