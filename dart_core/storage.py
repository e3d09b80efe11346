"""The one storage layer: local paths and `s3://bucket/key`, in-process (boto3, imported lazily).

Functions over URLs (a URL is a local path or `s3://bucket/key`):
    read_bytes, write_bytes (atomic), open_read (a streaming binary file object), upload_file,
    move_file, download_file, exists, list_objects, list_names, list_dirs, delete, join,
    is_s3, split_s3, read_parquet_bytes
and two small objects over them:
    Storage         the source readers' file system (read_bytes / exists / join / list)
    ShardDir(url)   one folder of shard files, the shard writer's store
`register_webdataset()` makes webdataset open `s3://` URLs through `open_read` (no subprocess).

The S3 client takes endpoint, region and credentials from the usual AWS environment / profile
(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for MinIO and the tests' moto server); botocore's
"standard" retry mode retries throttling and 5xx answers with exponential backoff and jitter
(DART_S3_MAX_ATTEMPTS attempts, default 8; both read through dart_core.settings). One client per
process, re-created after a fork or in a spawned worker: a boto3 client is never shared across
processes. Large uploads go multipart.
Errors name the URL and the S3 error code, never a credential.
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dart_core.settings import settings

MULTIPART_THRESHOLD = 16 * 1024 * 1024
_MISSING = ("404", "NoSuchKey", "NotFound")


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    p = urlparse(str(url))
    if p.scheme != "s3" or not p.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return p.netloc, p.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def basename(url: str | os.PathLike) -> str:
    """The last component of a path or URL (`s3://b/x/train/` -> `train`)."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]


# ---- the client ---------------------------------------------------------------------------------
_client = None
_client_pid = None


def s3_client():
    """One client per process; retries on throttling / 5xx with exponential backoff.
    Re-created after a fork: a boto3 client must not be shared across processes."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        import boto3
        from botocore.config import Config

        s = settings()  # read when the client is created (tests change the endpoint, then reset_client)
        _client = boto3.session.Session().client(
            "s3",
            endpoint_url=s.s3_endpoint_url,
            config=Config(retries={"mode": "standard", "max_attempts": s.s3_max_attempts}),
        )
        _client_pid = os.getpid()
    return _client


def reset_client() -> None:
    """Forget the cached client (tests change the endpoint between servers)."""
    global _client
    _client = None


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _missing(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and _code(e) in _MISSING


# ---- functions over URLs ------------------------------------------------------------------------
def _tmp_name(path: Path) -> Path:
    """A hidden temp name beside `path`, unique per process and thread (then renamed onto it)."""
    import threading

    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole object / file; FileNotFoundError when absent (local and S3 alike)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            if _missing(e):
                raise FileNotFoundError(f"{url}: no such object") from None
            raise
    return Path(url).read_bytes()


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Atomic on local disk (temp + rename); a single PUT on S3 (objects appear whole)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    tmp.replace(path)


def upload_file(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a finished local file to `url`, whole (multipart above 16 MiB on S3; temp + rename locally)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().upload_file(str(local), bucket, key, Config=_transfer_config())
        return
    dst = Path(url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    shutil.copyfile(local, tmp)
    tmp.replace(dst)


def move_file(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Publish a finished local file at `url`, whole, and drop the local one: a rename when `url`
    is on the same local file system, else an upload (or a copy) then an unlink."""
    if not is_s3(url):
        try:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, url)
            return
        except OSError:  # another file system: copy to a temp name there, then rename
            pass
    upload_file(local, url)
    Path(local).unlink(missing_ok=True)


def download_file(url: str | os.PathLike, local: str | os.PathLike) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().download_file(bucket, key, str(local), Config=_transfer_config())
        return
    shutil.copyfile(url, local)


def exists(url: str | os.PathLike) -> bool:
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if _missing(e):
                return False
            raise
    return Path(url).exists()


def delete(url: str | os.PathLike) -> None:
    """Remove one object / file; absent is fine."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(url).unlink(missing_ok=True)


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    key: str  # relative to the listed prefix
    etag: str
    size: int


def _s3_prefix(url) -> tuple[str, str]:
    bucket, prefix = split_s3(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def list_objects(prefix_url: str | os.PathLike) -> list[ObjectInfo]:
    """Every object under a prefix, sorted by key (S3: paginated ListObjectsV2; local: a
    recursive walk, whose `etag` is size-mtime)."""
    out: list[ObjectInfo] = []
    if is_s3(prefix_url):
        bucket, prefix = _s3_prefix(prefix_url)
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Key"][len(prefix):],
                                      obj["ETag"].strip('"'), obj["Size"]))
        return sorted(out, key=lambda o: o.key)
    root = Path(prefix_url)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append(ObjectInfo(str(p), p.relative_to(root).as_posix(), f"{st.st_size}-{st.st_mtime_ns}", st.st_size))
    return sorted(out, key=lambda o: o.key)


def _delimited(dir_url) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly under an s3:// prefix: one delimited listing."""
    bucket, prefix = _s3_prefix(dir_url)
    files, dirs = [], []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        files += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        dirs += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return files, dirs


def list_names(dir_url: str | os.PathLike) -> list[str]:
    """File names directly under a folder / prefix, sorted (not recursive; local dot-files,
    i.e. temp files of unfinished writes, left out). A missing folder has none."""
    if is_s3(dir_url):
        return sorted(_delimited(dir_url)[0])
    p = Path(dir_url)
    return sorted(q.name for q in p.iterdir() if q.is_file() and not q.name.startswith(".")) if p.is_dir() else []


def list_dirs(dir_url: str | os.PathLike) -> list[str]:
    """Sub-folder names directly under a folder / prefix, sorted (local dot-folders left out)."""
    if is_s3(dir_url):
        return sorted(_delimited(dir_url)[1])
    p = Path(dir_url)
    return sorted(q.name for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")) if p.is_dir() else []


class _BodyRaw(io.RawIOBase):
    """A botocore StreamingBody as a raw binary stream (for io.BufferedReader)."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._body.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_read(url: str | os.PathLike, bufsize: int = 1 << 20):
    """A readable binary file object streaming the object / file (S3: one GET, read as it goes)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            if _missing(e):
                raise FileNotFoundError(f"{url}: no such object") from None
            raise
        return io.BufferedReader(_BodyRaw(body), buffer_size=max(bufsize, io.DEFAULT_BUFFER_SIZE))
    return open(url, "rb")


def sha256(url: str | os.PathLike) -> str:
    """sha256 (hex) of a file's or object's bytes, streamed (FileNotFoundError when absent)."""
    import hashlib

    h = hashlib.sha256()
    with open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_parquet_bytes(data: bytes, columns: list[str] | None = None):
    """A parquet file held in memory, as a pyarrow Table, read synchronously.

    pq.read_table's default pre-buffering hands the reads to Arrow's I/O threads, which can still
    be releasing their view of the Python `bytes` after the call returns; if the interpreter is
    finalising by then, that thread aborts the process ("terminate called without an active
    exception", seen on `dart refresh`). Without pre-buffering or threads nothing outlives the call."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data), columns=columns, pre_buffer=False, use_threads=False)


# ---- webdataset ---------------------------------------------------------------------------------
def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset `gopen` handler for s3:// (see `register_webdataset`): read-only, in-process."""
    if mode != "rb":
        raise ValueError(f"{url}: s3:// shards are opened for reading only (mode {mode!r})")
    return open_read(url, max(bufsize, 1 << 20))


def register_webdataset() -> None:
    """Make webdataset open s3:// URLs with this module's client (idempotent, cheap). Call it in
    the process that opens the URLs: the reader does so from inside its pipeline, so DataLoader
    workers, forked or spawned, register too (and make their own client)."""
    import importlib

    # the module, not the `webdataset.gopen` function the package re-exports under the same name
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3


# ---- objects ------------------------------------------------------------------------------------
class Storage:
    """The file system the source readers and the shard writer's workers read through: local
    paths and s3:// alike. Picklable, stateless: each worker process makes its own client."""

    def read_bytes(self, url: str) -> bytes:  # FileNotFoundError when absent
        return read_bytes(url)

    def exists(self, url: str) -> bool:
        return exists(url)

    def join(self, base: str, *parts: str) -> str:
        return join(base, *parts)

    def list(self, prefix: str) -> list[str]:  # keys relative to prefix, recursive, sorted
        return [o.key for o in list_objects(prefix)]


class ShardDir:
    """One folder (local dir or s3:// prefix) of shard files: the shard writer's store.

    The writer stages each file locally and `publish`es it whole: a rename within the local file
    system (staging is inside the folder), or an upload (multipart) whose object also appears
    whole or not at all."""

    def __init__(self, url: str | os.PathLike):
        self.url = join(url)

    def list_names(self) -> list[str]:
        return list_names(self.url)

    def read_bytes(self, name: str) -> bytes:
        return read_bytes(self.url_of(name))

    def publish(self, local: str | os.PathLike, name: str) -> None:
        move_file(local, self.url_of(name))

    def delete(self, name: str) -> None:
        delete(self.url_of(name))

    def url_of(self, name: str) -> str:
        return join(self.url, name)

    def staging_dir(self) -> Path:
        """A local scratch dir, empty at start; the writer removes it when done."""
        if is_s3(self.url):
            import tempfile

            return Path(tempfile.mkdtemp(prefix="dart-shard-"))  # a killed run leaves it in /tmp
        d = Path(self.url) / ".staging"
        shutil.rmtree(d, ignore_errors=True)  # leftovers of a killed run
        d.mkdir(parents=True, exist_ok=True)
        return d
