"""Options of `dart shard` and `dart refresh` (flows/shard.py, flows/refresh.py)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dart_core.options._fields import Cli, Options

# dart_core.data.sources.FORMATS and dart_core.data.shard_writer.MODES (a test checks), spelled out
# here so that `dart --help` imports neither
SourceFormat = Literal["openimages", "nuswide", "coco", "folder"]
ShardMode = Literal["incremental", "overwrite", "extend"]
# dart_core.data.sources.folder.ABSENT
AbsentRule = Literal["negative", "unknown"]


class ShardOptions(Options):
    """One shard run: a source into OUT (flow `shard`; dart_core.data.shard_run.shard_source reads it)."""

    source: Annotated[str, Cli(argument=True)] = Field(description="dataset root: local dir or s3://bucket/prefix")
    format: SourceFormat = Field(description="the dataset's layout")
    out: str = Field(description="output root (local or s3://): classes.csv + <split>/ shards")
    shard_size: int = Field(5000, ge=1, description="samples per shard")
    mode: ShardMode = Field("incremental", description="incremental: shard what is not sharded yet (a rerun "
                                                       "resumes); extend: the same, appending the source's new "
                                                       "classes to classes.csv; overwrite: start over")
    workers: int | None = Field(None, ge=1, description="decoding processes (default: all cores)")
    split: str | None = Field(None, description="source split / output subdir (default per format)")
    image_size: int = Field(256, ge=1, description="shorter side after resizing")
    absent: AbsentRule | None = Field(None, description="folder only: a class an image's labels do not name is a "
                                                        "'negative' (default) or 'unknown' (`?cls` marks one unknown)")
    # how `dart shard` prints the report the flow returns; the flow and the library ignore it
    json_out: Annotated[bool, Cli("--json")] = Field(False, description="print the report as JSON")


class RefreshOptions(Options):
    """One refresh: the objects under PREFIX not sharded yet into OUT (flow `refresh`;
    dart_core.data.refresh.refresh_prefix reads it)."""

    prefix: Annotated[str, Cli(argument=True)] = Field(
        description="raw images (+ label CSVs) under s3://BUCKET/PREFIX (or a local dir)")
    out: str = Field(description="shards root (local or s3://)")
    split: str = Field("train", description="output subdir of OUT the new shards go to")
    shard_size: int = Field(5000, ge=1, description="samples per shard")
    workers: int | None = Field(None, ge=1, description="decoding processes (default: all cores)")
