"""Data plane: source readers (Open Images, NUS-WIDE, COCO, folder), the shard writer and the
training / inference reader. Plain library (no prefect): local paths and s3:// through
dart_core.storage; the shard format in `shard_format.py`."""
