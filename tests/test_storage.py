from dart_core import storage


def test_s3_roundtrip_and_listing(s3_bucket, tmp_path):
    storage.write_bytes(f"s3://{s3_bucket}/a/x.bin", b"hello")
    big = tmp_path / "big.bin"
    big.write_bytes(b"z" * (storage.MULTIPART_THRESHOLD + 10))
    storage.upload_file(big, f"s3://{s3_bucket}/a/sub/big.bin")  # multipart
    assert storage.read_bytes(f"s3://{s3_bucket}/a/x.bin") == b"hello"
    objs = storage.list_objects(f"s3://{s3_bucket}/a")
    assert sorted(o.key for o in objs) == ["sub/big.bin", "x.bin"]
    assert {o.size for o in objs} == {5, storage.MULTIPART_THRESHOLD + 10}
    # multipart ETags carry a part count suffix
    assert [o.etag for o in objs if o.key == "sub/big.bin"][0].endswith("-2")
    assert storage.exists(f"s3://{s3_bucket}/a/x.bin")
    assert not storage.exists(f"s3://{s3_bucket}/a/nope")


def test_local_write_is_atomic_and_listed(tmp_path):
    storage.write_bytes(str(tmp_path / "d" / "f.txt"), b"1")
    assert [o.key for o in storage.list_objects(str(tmp_path))] == ["d/f.txt"]
    assert not list(tmp_path.rglob(".*tmp*"))
