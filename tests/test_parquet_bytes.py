"""read_parquet_bytes: an in-memory parquet read that leaves no Arrow thread behind.

pq.read_table(io.BytesIO(data)) pre-buffers on Arrow's I/O threads; one of them can still be
releasing its view of the Python bytes while the interpreter shuts down, and the process aborts
(rc -6, "terminate called without an active exception") after doing its work — about 4 runs in 5
on this machine. Each read here runs in a fresh interpreter that exits right after it."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from dart_core.storage import read_parquet_bytes

SCRIPT = """
import io, pyarrow as pa, pyarrow.parquet as pq
from dart_core.storage import read_parquet_bytes
buf = io.BytesIO()
pq.write_table(pa.table({"key": [f"k{i}" for i in range(2000)], "n": list(range(2000))}), buf)
t = read_parquet_bytes(buf.getvalue(), columns=["n"])
print(t.num_rows, sum(t.column("n").to_pylist()))
"""


def test_reads_columns_exactly():
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": ["a", "b", "c"], "path": ["x", "y", "z"], "n": [1, 2, 3]}), buf)
    t = read_parquet_bytes(buf.getvalue().to_pybytes(), columns=["key", "n"])
    assert t.column_names == ["key", "n"]
    assert t.to_pylist() == [{"key": "a", "n": 1}, {"key": "b", "n": 2}, {"key": "c", "n": 3}]


def test_interpreter_exits_cleanly_after_a_read():
    for _ in range(12):
        p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (p.returncode, p.stderr)
        assert p.stdout.split() == ["2000", str(sum(range(2000)))]
