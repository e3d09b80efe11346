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


def s3_client():
    """One client per process; retries on throttling / 5xx with exponential backoff."""
    global _client
    if _client is None:
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
