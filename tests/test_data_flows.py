"""The `shard` and `refresh` Prefect flows against a real (temporary) Prefect server."""
from __future__ import annotations

from tests.data_fixtures import jpeg


def test_shard_and_refresh_flows(prefect_harness, tmp_path):
    from dart_core.options.data import RefreshOptions, ShardOptions
    from flows.refresh import refresh
    from flows.shard import shard

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.jpg").write_bytes(jpeg(150, 120, i))
    (src / "labels.csv").write_text("path,labels\n" + "".join(f"f{i}.jpg,a|-b\n" for i in range(5)) + "nope.jpg,a\n")
    report = shard(ShardOptions(source=str(src), format="folder", out=str(tmp_path / "out"), shard_size=2, workers=1))
    assert report["ok"] == 5 and report["failed_by_reason"] == {"missing_file": 1}
    assert report["totals"] == {"shards": 3, "inputs": 6, "ok": 5, "failed": 1, "failed_by_reason": {"missing_file": 1}}
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "n0.jpg").write_bytes(jpeg(90, 90, 1))
    first = refresh(RefreshOptions(prefix=str(raw), out=str(tmp_path / "out"), shard_size=2, workers=1))
    assert first == [str(tmp_path / "out" / "train" / "000003.tar")]
    assert refresh(RefreshOptions(prefix=str(raw), out=str(tmp_path / "out"), shard_size=2, workers=1)) == []
