"""Shard writer + reader on local disk: exact key sets, failed rows per reason, modes, the reader
contract, and exactly-once under kill -9."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dart_core.data.records import sample_key
from dart_core.data.reader import list_shards, make_loader
from dart_core.data.shard_run import ShardRunError, shard_source
from dart_core.options.data import ShardOptions
from dart_core.vocab import Vocabulary
from tests.data_fixtures import jpeg, make_folder

REPO = Path(__file__).resolve().parents[1]


def tar_samples(shard_dir: Path) -> dict[str, dict]:
    """key -> {ext: bytes} over every tar in the dir; asserts no key appears twice."""
    out: dict[str, dict] = {}
    for t in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert not (key in out and ext in out[key]), f"duplicate sample {key} in {t}"
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def parquet_rows(shard_dir: Path) -> list[dict]:
    return [r for p in sorted(shard_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    exp = make_folder(root / "src")
    report = shard_source(ShardOptions(source=str(root / "src"), format="folder", out=str(root / "out"), shard_size=5,
                                       workers=2), progress=False)
    return root, exp, report


def test_folder_shards_exact(folder_run):
    root, exp, report = folder_run
    shard_dir = root / "out" / "train"
    samples = tar_samples(shard_dir)
    assert set(samples) == set(exp["ok"])
    for key, lab in exp["ok"].items():
        meta = json.loads(samples[key]["json"])
        assert meta["id"] == key and meta["labels"] == lab
        im = Image.open(io.BytesIO(samples[key]["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) <= 256
    # EXIF orientation applied: stored 400x300 with orientation 6 -> 300x400 -> 256x341
    assert Image.open(io.BytesIO(samples[sample_key("img/rotated.jpg")]["jpg"])).size == (256, 341)
    # 16-bit white stays white (scaled, not clipped to garbage); alpha composited on white
    assert Image.open(io.BytesIO(samples[sample_key("img/sixteen.png")]["jpg"])).getpixel((5, 5))[0] > 240
    assert Image.open(io.BytesIO(samples[sample_key("img/alpha.png")]["jpg"])).getpixel((5, 5))[1] > 240
    rows = parquet_rows(shard_dir)
    assert len(rows) == exp["inputs"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert Counter(r["reason"] for r in failed) == Counter(exp["reasons"])
    assert {r["key"]: r["reason"] for r in failed if r["reason"] != "duplicate_id"} == exp["failed"]
    assert [r["key"] for r in failed if r["reason"] == "duplicate_id"] == [sample_key("img/g001.jpg")]
    assert all(r["error"].startswith(r["reason"] + ": ") for r in failed)
    assert report["reconciles"] and report["ok"] == len(exp["ok"]) and report["inputs"] == exp["inputs"]
    assert report["failed_by_reason"] == dict(sorted(exp["reasons"].items()))
    assert report["totals"]["inputs"] == exp["inputs"] and report["totals"]["ok"] == len(exp["ok"])
    n = len(list(shard_dir.glob("*.tar")))
    assert n == -(-len(exp["ok"]) // 5)
    for t in shard_dir.glob("*.tar"):
        stats = json.loads(t.with_name(t.stem + "_stats.json").read_text())
        assert stats["tar_bytes"] == t.stat().st_size
    assert Vocabulary.read_csv(root / "out" / "classes.csv").ids == ("cat", "dog", "bird")


def test_reader_eval_exactly_once_and_labels(folder_run):
    root, exp, _ = folder_run
    shards = list_shards(str(root / "out" / "train"))
    assert [Path(s).name for s in shards] == [f"{i:06d}.tar" for i in range(len(shards))]
    vocab = Vocabulary.read_csv(root / "out" / "classes.csv")
    pre = lambda im: torch.from_numpy(__import__("numpy").asarray(im.resize((32, 32)), dtype="float32")).permute(2, 0, 1)
    expected_order = [k for s in sorted((root / "out" / "train").glob("*.tar")) for k in
                      dict.fromkeys(m.name.split(".")[0] for m in tarfile.open(s).getmembers())]
    for workers in (0, 2):
        keys, labels = [], {}
        for imgs, lab, k in make_loader(str(root / "out" / "train"), vocab, pre, 4, train=False, num_workers=workers):
            assert imgs.dtype == torch.float32 and imgs.shape[1:] == (3, 32, 32)
            assert lab.dtype == torch.int8 and lab.shape == (len(k), 3)
            keys += k
            labels.update(zip(k, lab.tolist()))
        assert sorted(keys) == sorted(exp["ok"]) and len(keys) == len(set(keys))
        if workers == 0:
            assert keys == expected_order  # order within (and across) shards preserved
        for key, lab in exp["ok"].items():
            assert labels[key] == [lab.get(c, 0) for c in vocab.ids]
    # a subset / superset vocabulary: unknown ids ignored, absent classes 0
    other = Vocabulary.from_names(["dog", "zebra"])
    got = {k: l.tolist() for _, L, K in make_loader(shards, other, pre, 64, train=False) for k, l in zip(K, L)}
    assert got[sample_key("img/sub/g000.jpg")] == [1, 0] and got[sample_key("img/g001.jpg")] == [-1, 0]


def test_reader_eval_split_by_node_is_a_partition(folder_run, monkeypatch):
    root, exp, _ = folder_run
    vocab = Vocabulary.read_csv(root / "out" / "classes.csv")
    pre = lambda im: torch.zeros(3, 2, 2)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([k for _, _, K in make_loader(str(root / "out" / "train"), vocab, pre, 3, train=False) for k in K])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(exp["ok"])


def test_reader_train_shuffles_and_drops_last(folder_run):
    root, exp, _ = folder_run
    vocab = Vocabulary.read_csv(root / "out" / "classes.csv")
    pre = lambda im: torch.zeros(3, 2, 2)
    batches = list(make_loader(str(root / "out" / "train"), vocab, pre, 4, train=True, shuffle_buffer=50, seed=1))
    n = len(exp["ok"])
    assert all(len(b[2]) == 4 for b in batches) and len(batches) == n // 4
    keys = [k for b in batches for k in b[2]]
    assert len(set(keys)) == len(keys) and set(keys) <= set(exp["ok"])
    again = [k for b in make_loader(str(root / "out" / "train"), vocab, pre, 4, train=True, shuffle_buffer=50, seed=1) for k in b[2]]
    assert again == keys  # seeded
    assert keys != sorted(keys)
    full = [k for b in make_loader(str(root / "out" / "train"), vocab, pre, 4, train=True, drop_last=False,
                                   num_workers=2) for k in b[2]]
    assert sorted(full) == sorted(exp["ok"])


def test_validation_holdout_is_disjoint_stable_and_per_shard(folder_run):
    from dart_core.data.reader import is_validation

    root, exp, _ = folder_run
    vocab = Vocabulary.read_csv(root / "out" / "classes.csv")
    pre = lambda im: torch.zeros(3, 2, 2)
    urls = list_shards(str(root / "out" / "train"))
    held = urls[:2]

    def keys(**kw):
        return [k for b in make_loader(urls if "holdout" not in kw or kw["holdout"][1] is False else held, vocab,
                                       pre, 3, drop_last=False, **kw) for k in b[2]]

    train = keys(train=True, holdout=(0.5, False, held), num_workers=2)
    val = keys(train=False, holdout=(0.5, True, held), all_ranks=True)
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(exp["ok"])
    in_held = {k for b in make_loader(held, vocab, pre, 64, train=False) for k in b[2]}
    # exactly the held-out shards' keys that hash below the share, every time
    assert sorted(val) == sorted(k for k in in_held if is_validation(k, 0.5))
    assert keys(train=False, holdout=(0.5, True, held), all_ranks=True) == val
    assert not is_validation("any", 0.0) and is_validation("any", 1.0)


def _small_folder(root: Path, names: list[str], label: str = "cat") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / f"{n}.jpg").write_bytes(jpeg(120, 100, i))
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"{n}.jpg,{label}\n" for n in names))


def test_modes_incremental_extend_overwrite(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _small_folder(a, [f"a{i}" for i in range(7)])
    r = shard_source(ShardOptions(source=str(a), format="folder", out=str(out), shard_size=3, workers=1), progress=False)
    d = out / "train"
    assert sorted(p.name for p in d.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    # incremental rerun: nothing to do
    r = shard_source(ShardOptions(source=str(a), format="folder", out=str(out), shard_size=3, workers=1), progress=False)
    assert (r["skipped"], r["ok"], r["new_shards"]) == (7, 0, [])
    # a shard without its stats file is incomplete: redone under the same number
    (d / "000001_stats.json").unlink()
    r = shard_source(ShardOptions(source=str(a), format="folder", out=str(out), shard_size=3, workers=1), progress=False)
    assert (r["skipped"], r["ok"]) == (4, 3) and r["new_shards"] == [str(d / "000001.tar")]
    assert sorted(tar_samples(d)) == sorted(f"a{i}" for i in range(7))
    # incremental with another vocabulary: refused, naming classes.csv
    _small_folder(b, [f"b{i}" for i in range(4)], label="dog")
    with pytest.raises(ShardRunError, match="classes.csv: differs"):
        shard_source(ShardOptions(source=str(b), format="folder", out=str(out), shard_size=3, workers=1), progress=False)
    # extend: new shards after the last, vocabulary appended
    r = shard_source(ShardOptions(source=str(b), format="folder", out=str(out), shard_size=3, workers=1, mode="extend"),
                     progress=False)
    assert r["new_shards"] == [str(d / "000003.tar"), str(d / "000004.tar")]
    assert Vocabulary.read_csv(out / "classes.csv").ids == ("cat", "dog")
    assert sorted(tar_samples(d)) == sorted([f"a{i}" for i in range(7)] + [f"b{i}" for i in range(4)])
    assert r["totals"]["inputs"] == 11
    # overwrite: only the new source, numbered from 0
    r = shard_source(ShardOptions(source=str(b), format="folder", out=str(out), shard_size=3, workers=1,
                                  mode="overwrite"), progress=False)
    assert sorted(p.name for p in d.glob("*")) == ["000000.parquet", "000000.tar", "000000_stats.json",
                                                   "000001.parquet", "000001.tar", "000001_stats.json"]
    assert sorted(tar_samples(d)) == [f"b{i}" for i in range(4)]


def test_list_shards_ignores_incomplete(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for n in ("000000.tar", "000000_stats.json", "000001.tar", "000002_stats.json", "000003.tar", "000003_stats.json"):
        (d / n).write_bytes(b"")
    assert list_shards(str(d)) == [str(d / "000000.tar"), str(d / "000003.tar")]


KILL_SCRIPT = """
import sys
from dart_core.data.shard_run import shard_source
from dart_core.options.data import ShardOptions
shard_source(ShardOptions(source=sys.argv[1], format="folder", out=sys.argv[2], shard_size=7, workers=2),
             progress=False)
"""


def test_kill9_exactly_once(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    names = [f"k{i:03d}" for i in range(150)]
    _small_folder(src, names)
    with open(src / "labels.csv", "a") as f:  # a few failed rows and a duplicate too
        f.write("missing.jpg,cat\nk005.jpg,cat\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(7)
    d = out / "train"
    kills = 0
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(out)], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # killed while it writes: at a random moment after it has completed 1-3 more shards (its
        # whole run takes well under a second once imported, so a fixed delay would often miss it)
        target = len(list(d.glob("*_stats.json"))) + rng.randint(1, 3)
        while p.poll() is None and len(list(d.glob("*_stats.json"))) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the whole group: writer and its decoding workers
            kills += 1
        p.wait()
    assert kills >= 3
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out)], env=env, timeout=300)
    assert done.returncode == 0
    samples = tar_samples(d)  # asserts no duplicate sample
    assert sorted(samples) == names
    rows = parquet_rows(d)
    assert len(rows) == 152
    assert Counter((r["status"], r["reason"]) for r in rows) == {("ok", None): 150, ("failed", "missing_file"): 1,
                                                                 ("failed", "duplicate_id"): 1}
    assert not list(d.glob("*.tmp*")) and all(t.with_name(t.stem + "_stats.json").exists() for t in d.glob("*.tar"))


def positive_only_folder(root: Path) -> None:
    """4 images, a positive-only labels file (with `-` and `?` marks on two rows), 4 classes."""
    (root / "img").mkdir(parents=True)
    rows = [("img/a.jpg", "cat"), ("img/b.jpg", "cat|?dog"), ("img/c.jpg", "dog|-bird|?fish"), ("img/d.jpg", "")]
    for i, (rel, _) in enumerate(rows):
        (root / rel).write_bytes(jpeg(64, 48, i))
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"{r},{lab}\n" for r, lab in rows))
    (root / "classes.csv").write_text("id,name,split\ncat,cat,seen\ndog,dog,seen\nbird,bird,seen\nfish,fish,unseen\n")


@pytest.mark.parametrize("absent, expected", [
    # vocabulary order cat, dog, bird, fish; 1 positive, -1 negative, 0 unknown
    (None, {"img/a.jpg": [1, -1, -1, -1], "img/b.jpg": [1, 0, -1, -1], "img/c.jpg": [-1, 1, -1, 0], "img/d.jpg": [-1, -1, -1, -1]}),
    ("unknown", {"img/a.jpg": [1, 0, 0, 0], "img/b.jpg": [1, 0, 0, 0], "img/c.jpg": [0, 1, -1, 0], "img/d.jpg": [0, 0, 0, 0]}),
])
def test_folder_absent_classes_in_the_shards(tmp_path, absent, expected):
    from typer.testing import CliRunner

    from dart_core.data.shard_format import labels_tensor
    from flows.cli import app

    expected = {sample_key(path): labels for path, labels in expected.items()}
    positive_only_folder(tmp_path / "src")
    args = ["shard", str(tmp_path / "src"), "--format", "folder", "--out", str(tmp_path / "out"), "--workers", "1"]
    r = CliRunner().invoke(app, args + (["--absent", absent] if absent else []))
    assert r.exit_code == 0, r.output
    shard_dir = tmp_path / "out" / "train"
    vocab = Vocabulary.read_csv(tmp_path / "out" / "classes.csv")
    index = {c: i for i, c in enumerate(vocab.ids)}
    got = {k: labels_tensor(json.loads(s["json"]), index, len(vocab)).tolist() for k, s in tar_samples(shard_dir).items()}
    assert got == expected
    rows = {r["key"]: (r["n_pos"], r["n_neg"]) for r in parquet_rows(shard_dir)}
    assert rows == {k: (v.count(1), v.count(-1)) for k, v in expected.items()}
    assert json.loads((shard_dir / "000000_stats.json").read_text())["absent"] == (absent or "negative")
    # a rerun under the other rule would mix two meanings of a missing label in one split: refused
    other = "negative" if absent else "unknown"
    r = CliRunner().invoke(app, args + ["--absent", other])
    assert r.exit_code == 2 and r.output == (
        f"error: {shard_dir / '000000_stats.json'}: written with --absent {absent or 'negative'}, this run asks "
        f"for --absent {other}; rerun with --absent {absent or 'negative'} or use --mode overwrite\n")


def test_absent_option_is_checked(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    positive_only_folder(tmp_path / "src")
    base = ["shard", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(app, base + ["--format", "folder", "--absent", "maybe"])
    # the wording of a rejected option value is the CLI's own; one error line naming it
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1
    assert "--absent" in r.output and "'maybe'" in r.output and "negative" in r.output and "unknown" in r.output
    r = CliRunner().invoke(app, base + ["--format", "coco", "--absent", "unknown"])
    assert r.exit_code == 2 and r.output == "error: --absent applies to --format folder only (coco defines its own negatives)\n"
    assert not (tmp_path / "out").exists()


def test_shards_that_do_not_record_the_rule_are_not_checked(tmp_path):
    """Folder shards written before the rule was recorded (the demo's name every class) resume."""
    positive_only_folder(tmp_path / "src")
    shard_source(ShardOptions(source=str(tmp_path / "src"), format="folder", out=str(tmp_path / "out"), workers=1),
                 progress=False)
    stats_file = tmp_path / "out" / "train" / "000000_stats.json"
    stats = json.loads(stats_file.read_text())
    del stats["absent"]
    stats_file.write_text(json.dumps(stats))
    r = shard_source(ShardOptions(source=str(tmp_path / "src"), format="folder", out=str(tmp_path / "out"), workers=1,
                                  absent="unknown"), progress=False)
    assert (r["skipped"], r["ok"], r["new_shards"], r["absent"]) == (4, 0, [], "unknown")


def test_worker_built_tar_members_are_the_bytes_tarfile_writes():
    """The writer appends members built in the workers (shard_format.tar_member / tar_end); a tar
    made that way must equal, byte for byte, the one the stdlib tarfile writes for the same members."""
    import tarfile

    from dart_core.data import shard_format as F

    members = [("k~0123.jpg", b"\xff\xd8" + b"x" * 1000), ("k~0123.json", b'{"id":"k~0123"}'),
               ("写真_" + "n" * 120 + ".jpg", b"y" * 512)]  # non-ASCII and > 100 characters: PAX records
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tw:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
            tw.addfile(ti, io.BytesIO(data))
    ours = b"".join(F.tar_member(n, d) for n, d in members)
    ours += F.tar_end(len(ours))
    assert ours == ref.getvalue() and len(ours) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(ours)) as tf:
        assert [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()] == members


def test_shard_numbers_stop_at_six_digits():
    """Shard names have six digits; a seventh would be invisible to every reader (silent loss), so
    the writer stops with a one-line error instead."""
    from dart_core.data.shard_writer import ShardWriteError, _next_number

    assert _next_number(iter([999_999])) == 999_999
    with pytest.raises(ShardWriteError, match="^shard number 1000000 exceeds the format's 1000000 shards per split; "
                                              "use a larger --shard-size or another --split$"):
        _next_number(iter([1_000_000]))
