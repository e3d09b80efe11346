"""Local-or-S3 paths for the flows. boto3 lives here, never in dart_core.

Any URL may be a local path or `s3://bucket/key`. The S3 client takes endpoint, region and
credentials from the usual AWS environment / profile (AWS_ENDPOINT_URL works for MinIO and for the
tests' moto server); botocore's "standard" retry mode retries throttling and 5xx answers with
exponential backoff and jitter. Large uploads go multipart through boto3's transfer manager.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

MULTIPART_THRESHOLD = 16 * 1024 * 1024


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    p = urlparse(str(url))
    if p.scheme != "s3" or not p.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return p.netloc, p.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


_client = None
_client_pid = None


def s3_client():
    """One client per process; retries on throttling / 5xx with exponential backoff.
    Re-created after a fork: a boto3 client must not be shared across processes."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client_pid = os.getpid()
        import boto3
        from botocore.config import Config

        max_attempts = int(os.environ.get("DART_S3_MAX_ATTEMPTS", "8"))
        _client = boto3.client(
            "s3",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
            config=Config(retries={"mode": "standard", "max_attempts": max_attempts}),
        )
    return _client


def reset_client() -> None:
    """Forget the cached client (tests change the endpoint between servers)."""
    global _client
    _client = None


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def read_bytes(url: str) -> bytes:
    if is_s3(url):
        bucket, key = split_s3(url)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(url).read_bytes()


def write_bytes(url: str, data: bytes) -> None:
    """Atomic on local disk (temp + rename); a single PUT on S3 (objects appear whole)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def upload_file(local: str | Path, url: str) -> None:
    """Copy a finished local file to `url` (multipart above 16 MiB on S3)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().upload_file(str(local), bucket, key, Config=_transfer_config())
        return
    dst = Path(url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(local, tmp)
    tmp.replace(dst)


def download_file(url: str, local: str | Path) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().download_file(bucket, key, str(local), Config=_transfer_config())
        return
    shutil.copyfile(url, local)


def exists(url: str) -> bool:
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(url).exists()


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    key: str  # relative to the listed prefix
    etag: str
    size: int


def list_objects(prefix_url: str) -> list[ObjectInfo]:
    """Every object under a prefix (S3: paginated ListObjectsV2; local: a recursive walk)."""
    out: list[ObjectInfo] = []
    if is_s3(prefix_url):
        bucket, prefix = split_s3(prefix_url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Key"][len(prefix):],
                                      obj["ETag"].strip('"'), obj["Size"]))
        return out
    root = Path(prefix_url)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append(ObjectInfo(str(p), p.relative_to(root).as_posix(), f"{st.st_size}-{st.st_mtime_ns}", st.st_size))
    return out


def delete(url: str) -> None:
    """Remove one object / file; absent is fine."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(url).unlink(missing_ok=True)


def list_names(dir_url: str) -> list[str]:
    """File names directly under a directory / prefix (S3: one delimited listing, not recursive)."""
    if is_s3(dir_url):
        bucket, prefix = split_s3(dir_url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        names = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        return sorted(names)
    p = Path(dir_url)
    return sorted(q.name for q in p.iterdir() if q.is_file()) if p.is_dir() else []


class StorageFS:
    """dart_core's FileSystem protocol over local paths and s3:// (picklable: no client state;
    each worker process makes its own client on first use)."""

    def read_bytes(self, url: str) -> bytes:
        if is_s3(url):
            from botocore.exceptions import ClientError

            try:
                return read_bytes(url)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(url) from None
                raise
        return read_bytes(url)

    def exists(self, url: str) -> bool:
        return exists(url)

    def join(self, base: str, *parts: str) -> str:
        return join(base, *parts)

    def list(self, prefix: str) -> list[str]:
        return sorted(o.key for o in list_objects(prefix))


class S3ShardStore:
    """dart_core's ShardStore over an s3:// prefix: files staged in a local temp dir, uploaded
    whole (multipart above 16 MiB); the writer publishes the stats file last."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._staging = None

    def list_names(self) -> list[str]:
        return list_names(self.url)

    def read_bytes(self, name: str) -> bytes:
        return read_bytes(self.url_of(name))

    def publish(self, local, name: str) -> None:
        upload_file(local, self.url_of(name))
        Path(local).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        delete(self.url_of(name))

    def url_of(self, name: str) -> str:
        return join(self.url, name)

    def staging_dir(self) -> Path:
        import tempfile

        # a fresh dir per run; the writer removes it when done (a killed run leaves it in /tmp)
        self._staging = Path(tempfile.mkdtemp(prefix="dart-shard-"))
        return self._staging


def shard_store(url: str):
    if is_s3(url):
        return S3ShardStore(url)
    from dart_core.data.store import LocalShardStore

    return LocalShardStore(url)


def _main(argv: list[str]) -> int:
    """`python -m flows.storage cat URL` (stream an object to stdout) and `ls URL` (names under a
    prefix): used by dart_core's reader to read s3:// shards without importing boto3 itself."""
    import sys

    if len(argv) != 2 or argv[0] not in ("cat", "ls"):
        print("usage: python -m flows.storage cat|ls URL", file=sys.stderr)
        return 2
    cmd, url = argv
    if cmd == "ls":
        print("\n".join(list_names(url)))
        return 0
    out = sys.stdout.buffer
    if is_s3(url):
        bucket, key = split_s3(url)
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(1 << 20):
            out.write(chunk)
    else:
        with open(url, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
    out.flush()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
