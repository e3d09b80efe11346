"""Data plane: source readers (Open Images, NUS-WIDE, COCO, folder), the shard writer and the
training / inference reader. Plain library: local I/O by default, remote I/O through injected
file-system objects (see `fs.py`), so no boto3 or prefect import here."""
