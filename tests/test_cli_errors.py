"""The `dart` CLI as a user meets it, run as a real process: a mistake ends with exit code 2 and ONE
`error:` line naming the file, row or option, with no traceback (also when the error arises inside
a Prefect flow or task); Ctrl-C, to the process group or to `dart` alone, stops `annotate` and
`shard` within seconds with exit code 130, and rerunning the same command finishes the job with
exactly one row per sample."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from importlib import metadata
from pathlib import Path

import duckdb
import pytest

from dart_core.data.records import sample_key
from tests.annotate_fixtures import COLOURS, make_shards, world  # noqa: F401
from tests.conftest import REPO
from tests.data_fixtures import jpeg
from tests.model_fixtures import tiny_clip_ckpt  # noqa: F401

STOP_WITHIN_S = 10


@pytest.fixture(scope="module")
def cli_env(prefect_harness):
    """The environment of a `dart` process: the test harness's Prefect API (a temporary server per
    process would take ~10 s to start)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(),
            "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def dart(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, *expected: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# ---- mistakes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--batch-size", "0"], ["--batch-size"]),
    (["--device", "gpu"], ["--device", "cpu, cuda, cuda:N"]),
    (["--mode", "sideways"], ["--mode", "'new', 'append', 'overwrite'"]),
])
def test_option_out_of_range_or_choice(world, tmp_path, extra, expected):
    """Rejected while parsing, before any flow starts (no Prefect API is needed)."""
    args = ["annotate", "--checkpoint", world["checkpoint"], "--shards", world["shards"], "--classes",
            world["classes"], "--out", str(tmp_path / "pred"), *extra]
    r = dart(args, {**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_error_line(r, *expected)
    assert not (tmp_path / "pred").exists()


def train_args(world, tmp_path, **kw) -> list[str]:
    opts = {"shards": str(Path(world["shards"]) / "val"), "classes": world["classes"], "out": str(tmp_path / "run"),
            "backbone": "dart-tiny-vit", "pretrained": world["clip"], "batch-size": "4", "epochs": "1",
            "top-k-share": "0.25"} | kw
    return ["train", *[a for k, v in opts.items() for a in (f"--{k}", v)]]


def test_missing_classes_file_inside_the_train_task(world, tmp_path, cli_env):
    missing = tmp_path / "nope" / "classes.csv"
    assert_one_error_line(dart(train_args(world, tmp_path, classes=str(missing)), cli_env), str(missing))


def test_malformed_classes_csv_names_the_row(world, tmp_path, cli_env):
    bad = tmp_path / "classes.csv"
    bad.write_text("id,name,split\nred,red,seen\ngreen,green,sometimes\n")
    assert_one_error_line(dart(train_args(world, tmp_path, classes=str(bad)), cli_env), str(bad), "line 3")


def test_shards_root_names_its_splits(world, tmp_path, cli_env):
    """`--shards` given the dataset root (classes.csv + split folders), not one of its splits."""
    line = assert_one_error_line(dart(train_args(world, tmp_path, shards=world["shards"]), cli_env))
    assert line == (f"error: --shards {world['shards']} holds no shards; it has splits val: "
                    f"pass {Path(world['shards']) / 'val'}")


def annotate_args(world, out, **kw) -> list[str]:
    opts = {"checkpoint": world["checkpoint"], "shards": world["shards"], "classes": world["classes"],
            "out": str(out), "batch-size": "4"} | kw
    return ["annotate", *[a for k, v in opts.items() for a in (f"--{k}", v)]]


def test_corrupt_checkpoint_is_named_without_unsafe_advice(world, tmp_path, cli_env):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(Path(world["checkpoint"]).read_bytes()[:2000])  # truncated
    r = dart(annotate_args(world, tmp_path / "pred", checkpoint=str(ckpt)), cli_env)
    assert_one_error_line(r, str(ckpt), "not a readable DART checkpoint")
    assert "weights_only" not in r.stderr + r.stdout


def test_vocabulary_that_does_not_fit_the_checkpoint(world, tmp_path, cli_env):
    """Raised inside the Prefect flow: Prefect's own traceback of it is not printed."""
    small = tmp_path / "classes.csv"
    small.write_text("id,name,split\nred,red,seen\ngreen,green,seen\nyellow,yellow,unseen\n")
    assert_one_error_line(dart(annotate_args(world, tmp_path / "pred", classes=str(small)), cli_env),
                          world["checkpoint"], "'blue'")


def test_version():
    r = dart(["--version"], {**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == f"dart-annotate {metadata.version('dart-annotate')}"


def test_cli_choices_are_the_library_s():
    """flows.cli.data spells out the choices so that `dart --help` does not import the data plane."""
    from dart_core.data.shard_writer import MODES
    from dart_core.data.sources import FORMATS
    from flows.cli.data import ShardMode, SourceFormat

    assert typing.get_args(SourceFormat) == FORMATS and typing.get_args(ShardMode) == MODES


# ---- annotate output: identity, takeover of a dead run, the lock ----------------------------------

def test_append_names_the_input_that_differs():
    from dart_core.predictions import identity_differences

    run = {"checkpoint_hash": "0123456789abcdef", "vocab_hash": "v1", "crg_hash": "9b0d4e77aaaa0000"}
    assert identity_differences(run, dict(run)) == ""
    assert identity_differences(run, dict(run, crg_hash="3f2a9c1eaaaa0000")) == \
        "its CRG was 9b0d4e77, this run's is 3f2a9c1e"
    # a common 8-character prefix: longer until the two differ
    assert identity_differences(run, dict(run, checkpoint_hash="01234567ffffffff", crg_hash=None)) == \
        "its checkpoint was 0123456789ab, this run's is 01234567ffff; its CRG was 9b0d4e77, this run's is none"


def test_a_run_that_finished_no_shard_never_blocks_the_next(tmp_path):
    import json

    from dart_core.predictions import AnnotateError, output_lock, prepare_output
    from dart_core.vocab import Vocabulary

    vocab = Vocabulary.from_names(list(COLOURS), unseen={"yellow"})
    meta = {"checkpoint_hash": "a" * 16, "vocab_hash": vocab.hash(), "crg_hash": None}
    out = tmp_path / "pred"
    prepare_output(out, dict(meta, checkpoint_hash="b" * 16), vocab, None)  # a run that then failed
    (out / "_staging" / "val-000000").mkdir(parents=True)
    prepare_output(out, meta, vocab, None)  # another checkpoint, same folder, mode new: proceeds
    assert json.loads((out / "run.json").read_text())["checkpoint_hash"] == "a" * 16
    assert not (out / "_staging").exists()
    (out / "_done").mkdir()
    (out / "_done" / "val-000000.json").write_text("{}")  # once a shard is finished, it is that run's
    with pytest.raises(AnnotateError, match="its checkpoint was aaaaaaaa, this run's is bbbbbbbb"):
        prepare_output(out, dict(meta, checkpoint_hash="b" * 16), vocab, None)
    with output_lock(out):  # a live run holds the folder ...
        with pytest.raises(AnnotateError, match="being written by another run"):
            with output_lock(out):
                pass
    with output_lock(out):  # ... and lets it go however it ends
        pass


def test_only_transient_faults_are_retried():
    from flows.retry import is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError("classes.csv")) and not is_transient(ValueError("bad row"))


# ---- Ctrl-C -------------------------------------------------------------------------------------

def start(args: list[str], env: dict) -> subprocess.Popen:
    # a session of its own, like a terminal's foreground job: killpg reaches every process of it
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen, whole_group: bool) -> None:
    """Ctrl-C as a terminal sends it (to the process group) or as `kill -INT PID` does."""
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still running {STOP_WITHIN_S} s after SIGINT ({'group' if whole_group else 'pid'})")
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command to resume" in err.splitlines()
    assert "Traceback" not in err, err[-3000:]


def stop_twice_then_finish(args: list[str], env: dict, units, what: str, total: int | None = None) -> None:
    """Run `dart ARGS` and Ctrl-C it once a `what` is done (SIGINT to its process group, as a
    terminal sends), rerun and Ctrl-C it after one more (SIGINT to the pid alone), then rerun to the
    end: `units()` counts the units done so far."""
    first = start(args, env)
    wait_for(lambda: units() >= 1, first, f"a {what}")
    interrupt(first, whole_group=True)
    before = units()
    second = start(args, env)  # the same command resumes; the interrupted run does not block it
    wait_for(lambda: units() > before, second, f"a further {what}")
    interrupt(second, whole_group=False)
    if total is not None:
        assert units() < total
    r = dart(args, env)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # three `dart annotate` processes, each ~10 s to start on a loaded 2-core machine
def test_ctrl_c_annotate_then_rerun(world, tmp_path, cli_env):
    shards = tmp_path / "shards"
    keys = make_shards(shards / "val", n_shards=12, per_shard=6)
    shutil.copy(world["classes"], shards / "classes.csv")
    out = tmp_path / "pred"
    args = annotate_args(world, out, shards=str(shards), **{"batch-size": "2"})

    def done() -> int:
        return len(list((out / "_done").glob("*.json")))

    stop_twice_then_finish(args, cli_env, done, "finished shard", total=12)  # enough shards that a stop lands before the end
    rows = duckdb.sql(f"SELECT image_id, count(*) FROM read_parquet('{out}/scores/*/*.parquet') "
                      "GROUP BY image_id").fetchall()
    assert sorted(k for k, _ in rows) == sorted(keys) and {n for _, n in rows} == {1}


def folder_source(root: Path, n: int) -> list[str]:
    """n images (a few distinct pictures, copied) with labels.csv and classes.csv."""
    pictures = [jpeg(480, 360, seed) for seed in range(8)]
    (root / "img").mkdir(parents=True)
    names = [f"k{i:04d}" for i in range(n)]
    for i, name in enumerate(names):
        (root / "img" / f"{name}.jpg").write_bytes(pictures[i % len(pictures)])
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"img/{k}.jpg,{'cat' if i % 2 else 'dog'}\n"
                                                             for i, k in enumerate(names)))
    (root / "classes.csv").write_text("id,name,split\ncat,cat,seen\ndog,dog,seen\n")
    return names


def test_ctrl_c_shard_then_rerun(tmp_path, cli_env):
    names = folder_source(tmp_path / "src", 900)
    out = tmp_path / "shards"
    args = ["shard", str(tmp_path / "src"), "--format", "folder", "--out", str(out), "--shard-size", "40",
            "--workers", "2"]

    def complete() -> int:
        return len(list((out / "train").glob("*_stats.json")))

    stop_twice_then_finish(args, cli_env, complete, "complete shard")
    rows = duckdb.sql(f"SELECT key, count(*) FROM read_parquet('{out}/train/*.parquet') GROUP BY key").fetchall()
    assert sorted(k for k, _ in rows) == sorted(sample_key(f"img/{k}.jpg") for k in names) and {n for _, n in rows} == {1}
