"""S3 source and destination, the reader over s3://, refresh, and the CLI forms — against the
moto server on loopback (real HTTP, real boto3, no patched clients)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from dart_core.data.records import sample_key
from dart_core.data.reader import list_shards, make_loader
from dart_core.data.refresh import refresh_prefix
from dart_core.data.shard_run import shard_source
from dart_core.options.data import RefreshOptions, ShardOptions
from dart_core.vocab import Vocabulary
from dart_core import storage
from tests.data_fixtures import bad_images, jpeg

DART = str(Path(sys.executable).with_name("dart"))


def put(url: str, data: bytes) -> None:
    storage.write_bytes(url, data)


def s3_tar_keys(url: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tf:
        return [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".jpg")]


def upload_folder(base: str, n: int, prefix: str = "img/p") -> list[str]:
    keys = []
    rows = ["path,labels"]
    for i in range(n):
        put(f"{base}/{prefix}{i}.jpg", jpeg(200, 150, i))
        rows.append(f"{prefix}{i}.jpg,{'cat' if i % 2 else 'dog|-cat'}")
        keys.append(sample_key(f"{prefix}{i}.jpg"))
    data, _ = bad_images()["truncated.jpg"]
    put(f"{base}/img/trunc.jpg", data)
    rows += ["img/trunc.jpg,cat", "img/gone.jpg,cat", "../escape.jpg,cat"]
    put(f"{base}/labels.csv", ("\n".join(rows) + "\n").encode())
    put(f"{base}/classes.csv", b"id,name,split\ncat,cat,seen\ndog,dog,unseen\n")
    return keys


def test_s3_source_to_s3_shards_and_reader(s3_bucket):
    src, out = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards"
    keys = upload_folder(src, 9)
    r = shard_source(ShardOptions(source=src, format="folder", out=out, shard_size=4, workers=2), progress=False)
    assert r["ok"] == 9 and r["failed_by_reason"] == {"decode_error": 1, "missing_file": 1, "path_escapes_source": 1}
    assert r["reconciles"] and r["totals"]["inputs"] == 12
    names = storage.list_names(f"{out}/train")
    assert names == sorted(f"{i:06d}{s}" for i in range(3) for s in (".parquet", ".tar", "_stats.json"))
    assert storage.read_bytes(f"{out}/classes.csv").decode().splitlines()[1:] == ["cat,cat,seen", "dog,dog,unseen"]
    shards = list_shards(f"{out}/train")  # lists in-process (dart_core.storage)
    assert shards == [f"{out}/train/{i:06d}.tar" for i in range(3)]
    vocab = Vocabulary.from_names(["cat", "dog"])
    got = {}
    for imgs, lab, k in make_loader(shards, vocab, lambda im: torch.zeros(3, 4, 4), 4, train=False, num_workers=2):
        got.update(zip(k, lab.tolist()))
    assert sorted(got) == sorted(keys)
    assert got[sample_key("img/p0.jpg")] == [-1, 1] and got[sample_key("img/p1.jpg")] == [1, -1]  # "cat": dog, not named, is a negative
    # incremental rerun against S3: nothing new
    r = shard_source(ShardOptions(source=src, format="folder", out=out, shard_size=4, workers=1), progress=False)
    assert (r["skipped"], r["ok"], r["new_shards"]) == (12, 0, [])


def test_refresh_only_new_objects(s3_bucket):
    raw, out = f"s3://{s3_bucket}/incoming", f"s3://{s3_bucket}/shards"
    for i in range(5):
        put(f"{raw}/day1/x{i}.jpg", jpeg(160, 120, i))
    put(f"{raw}/day1/labels.csv", b"path,labels\nx0.jpg,cat\nx1.jpg,-cat|dog\n")
    put(f"{raw}/notes.txt", b"not an image")
    r1 = refresh_prefix(RefreshOptions(prefix=raw, out=out, shard_size=3, workers=1), progress=False)
    assert r1["new_objects"] == 5 and r1["new_shards"] == [f"{out}/train/000000.tar", f"{out}/train/000001.tar"]
    assert sorted(k for s in r1["new_shards"] for k in s3_tar_keys(s)) == sorted(sample_key(f"day1/x{i}.jpg") for i in range(5))
    before = {o.key: o.etag for o in storage.list_objects(out)}
    # nothing new: nothing written, nothing returned
    r2 = refresh_prefix(RefreshOptions(prefix=raw, out=out, shard_size=3, workers=1), progress=False)
    assert (r2["new_objects"], r2["new_shards"]) == (0, [])
    assert {o.key: o.etag for o in storage.list_objects(out)} == before
    # two new objects and one changed object -> only those, in a new shard after the last
    put(f"{raw}/day2/y0.jpg", jpeg(160, 120, 10))
    put(f"{raw}/day2/y1.jpg", jpeg(160, 120, 11))
    put(f"{raw}/day1/x4.jpg", jpeg(160, 120, 44))
    r3 = refresh_prefix(RefreshOptions(prefix=raw, out=out, shard_size=3, workers=1), progress=False)
    assert r3["new_objects"] == 3 and r3["new_shards"] == [f"{out}/train/000002.tar"]
    new_keys = s3_tar_keys(r3["new_shards"][0])
    # the changed object keeps its old sample and gets a new one keyed by its path and new ETag
    new_etag = next(o.etag for o in storage.list_objects(raw) if o.key == "day1/x4.jpg")
    assert new_keys == [sample_key(f"day1/x4.jpg#{new_etag}"), sample_key("day2/y0.jpg"), sample_key("day2/y1.jpg")]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(r1["new_shards"][0]))) as tf:
        meta = {m.name.split(".")[0]: json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")}
    assert meta[sample_key("day1/x0.jpg")]["labels"] == {"cat": 1} and meta[sample_key("day1/x1.jpg")]["labels"] == {"cat": -1, "dog": 1}
    assert storage.read_bytes(f"{out}/classes.csv").decode().splitlines() == ["id,name,split", "cat,cat,seen", "dog,dog,seen"]


def _dart(*args, env=None):
    return subprocess.run([DART, *args], capture_output=True, text=True, env=env or os.environ.copy(), timeout=300)


def test_cli_shard_and_refresh_forms(s3_bucket, tmp_path):
    src = f"s3://{s3_bucket}/cli-src"
    keys = upload_folder(src, 5)
    out = f"s3://{s3_bucket}/cli-out"
    p = _dart("shard", src, "--format", "folder", "--out", out, "--shard-size", "2", "--mode", "overwrite", "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert "inputs 8 = already sharded 0 + ok 5 + failed 3" in p.stdout and "reconciles: True" in p.stdout
    assert len(list_shards(f"{out}/train")) == 3
    # refresh: prints the new shards, one per line; second time prints nothing
    raw = f"s3://{s3_bucket}/raw2"
    for i in range(3):
        put(f"{raw}/z{i}.jpg", jpeg(100, 90, i))
    p = _dart("refresh", raw, "--out", str(tmp_path / "shards"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(tmp_path / "shards" / "train" / "000000.tar")]
    p = _dart("refresh", raw, "--out", str(tmp_path / "shards"))
    assert p.returncode == 0 and p.stdout == "" and "nothing new" in p.stderr
    # run-level errors: one line, exit 2, no traceback
    for args, needle in [(("shard", str(tmp_path / "nope"), "--format", "folder", "--out", str(tmp_path / "o")), "labels.csv"),
                         (("shard", src, "--format", "pascal", "--out", str(tmp_path / "o")), "--format"),
                         (("shard", src, "--format", "folder", "--out", str(tmp_path / "o"), "--mode", "append"), "--mode"),
                         (("shard", src, "--format", "coco", "--out", str(tmp_path / "o")), "instances"),
                         (("refresh", "s3://no-such-bucket-xyz/p", "--out", str(tmp_path / "o")), "no-such-bucket-xyz")]:
        p = _dart(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


# ---- the reader over s3:// is in-process; one shard id everywhere --------------------------------
def zeros(im):  # picklable preprocess (spawned DataLoader workers)
    return torch.zeros(3, 4, 4)


def s3_shards(bucket: str) -> tuple[str, list[str]]:
    src, out = f"s3://{bucket}/raw", f"s3://{bucket}/shards"
    keys = upload_folder(src, 9)
    shard_source(ShardOptions(source=src, format="folder", out=out, shard_size=4, workers=1), progress=False)
    return f"{out}/train", keys


def test_reader_streams_s3_in_process(s3_bucket):
    import inspect

    import psutil

    import dart_core.data.reader as reader_mod

    src = inspect.getsource(reader_mod)
    assert "pipe:" not in src and "subprocess" not in src
    root, keys = s3_shards(s3_bucket)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # the moto server
    vocab = Vocabulary.from_names(["cat", "dog"])
    got = []
    for _, _, k in make_loader(list_shards(root), vocab, zeros, 2, train=False, num_workers=0):
        got += k
        assert {p.pid for p in me.children(recursive=True)} == before  # no `cat` process per shard
    assert sorted(got) == sorted(keys)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_workers_over_s3_yield_every_sample_once(s3_bucket, context):
    from collections import Counter

    root, keys = s3_shards(s3_bucket)
    vocab = Vocabulary.from_names(["cat", "dog"])
    pipeline = make_loader(root, vocab, zeros, 2, train=False, num_workers=0)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2, multiprocessing_context=context)
    seen = Counter(k for _, _, ks in loader for k in ks)
    assert seen == Counter(keys)  # each sample exactly once across both workers, each with its own client


def test_one_shard_id_in_sidecar_stats_and_predictions(s3_bucket, tmp_path):
    from types import SimpleNamespace

    from dart_core.data.shard_format import shard_id
    from dart_core.infer import annotate_shard
    from dart_core.options.annotate import AnnotateOptions
    from dart_core.storage import read_parquet_bytes

    class Stub(torch.nn.Module):  # the interface annotate_shard uses, scores all zero
        backbone = SimpleNamespace(preprocess=zeros)

        def forward(self, images, with_priors=False):
            b = images.shape[0]
            return SimpleNamespace(logits=torch.zeros(b, 2), patch_logits=torch.zeros(b, 4, 2),
                                   topk=torch.zeros(b, 2, 2, dtype=torch.long))

    root, _ = s3_shards(s3_bucket)
    vocab = Vocabulary.from_names(["cat", "dog"])
    pred = tmp_path / "pred"
    for i, url in enumerate(list_shards(root)):
        sid = shard_id(url)
        assert sid == f"train-{i:06d}"
        sidecar = read_parquet_bytes(storage.read_bytes(url[: -len(".tar")] + ".parquet"))
        assert set(sidecar.column("shard").to_pylist()) == {sid}
        assert json.loads(storage.read_bytes(url[: -len(".tar")] + "_stats.json"))["shard"] == sid
        stats = annotate_shard(Stub(), vocab, url, pred, AnnotateOptions(
            checkpoint="stub", shards=url, classes="stub", out=pred, batch_size=4, decode_threads=0))
        assert stats["shard"] == sid and stats["images"] > 0
        assert json.loads((pred / "_done" / f"{sid}.json").read_text())["shard"] == sid
        assert (pred / "scores" / f"shard={sid}" / "part.parquet").is_file()


def test_s3_errors_name_the_url_not_the_credentials(s3_bucket):
    from dart_core.storage import open_read

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for call in (lambda: storage.read_bytes(f"s3://{s3_bucket}/nope"), lambda: open_read(f"s3://{s3_bucket}/nope"),
                 lambda: storage.read_bytes("s3://no-such-bucket-xyz/k"), lambda: storage.list_objects("s3://no-such-bucket-xyz/p")):
        with pytest.raises(Exception) as e:
            call()
        assert secret not in str(e.value) and secret not in repr(e.value.args)
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(f"s3://{s3_bucket}/nope")
