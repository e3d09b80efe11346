"""Source readers: each turns a dataset's own published layout into `SourceData`
(vocabulary + a stream of `InputRecord`s). All file access goes through a `Storage`."""
from __future__ import annotations

from dart_core.storage import Storage
from dart_core.data.records import SourceData, SourceError

FORMATS = ("openimages", "nuswide", "coco", "folder")


def open_source(fmt: str, root: str, *, split: str | None = None, fs: Storage | None = None,
                **options) -> SourceData:
    """Read the metadata of `root` in format `fmt`; records are produced lazily where possible."""
    fs = fs or Storage()
    if fmt == "folder":
        from dart_core.data.sources.folder import read_folder
        return read_folder(root, fs=fs, split=split or "train", **options)
    if fmt == "openimages":
        from dart_core.data.sources.openimages import read_openimages
        return read_openimages(root, fs=fs, split=split or "train", **options)
    if fmt == "nuswide":
        from dart_core.data.sources.nuswide import read_nuswide
        return read_nuswide(root, fs=fs, split=split or "train", **options)
    if fmt == "coco":
        from dart_core.data.sources.coco import read_coco
        return read_coco(root, fs=fs, split=split, **options)
    raise SourceError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "open_source", "SourceData", "SourceError"]
