"""Multi-process DART training, launched and watched by the `train` flow (`dart train --nproc N`).

The flow process starts `torch.distributed.run` (torchrun: one node, `--standalone` rendezvous on
loopback, N ranks; NCCL on GPUs, gloo on CPU) as a child it watches:

- every line the ranks and torchrun print goes to the flow's log as it comes (rank 0 logs the
  training; every rank logs one `rank r/N: pid P, device D` line when it starts);
- a rank that fails fails the flow with *that rank's* error: its own exception (a bad input ends
  as `RankError`, a ValueError, so `dart train` ends with one `error:` line and exit 2), or, for a
  rank that died of a signal (`kill -9`, the OOM killer), `rank r of N was killed by SIGKILL`
  (`RanksFailedError`, exit 1). torchrun stops the other ranks; the launcher makes sure they are gone;
- Ctrl-C (KeyboardInterrupt), a Prefect cancellation (SIGTERM, TerminationSignal) or any other
  exception in the flow process stops every rank: SIGTERM to torchrun (which stops its ranks),
  then SIGKILL to torchrun and the ranks after a grace period. If the flow process dies without a
  word (`kill -9`), torchrun gets SIGTERM from the kernel (PR_SET_PDEATHSIG), and a rank whose
  torchrun dies gets SIGKILL;
- rank 0 writes `OUT/last.pt` at every epoch's end, so rerunning the same command resumes there.

This module is also the program torchrun runs: `python -m flows.ranks torchrun ARGS` (torchrun
itself, reporting which rank failed how) and `python -m flows.ranks run SPEC.json` (one rank).
It imports neither Prefect nor torch at module level.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from dart_core.options.train import TrainOptions
from dart_core.settings import settings

# A private protocol between the launcher (flow process) and its children (torchrun, the ranks): set
# by `launch`, read here, never by a user, so these are not in dart_core.settings (docs/design.md,
# "Settings"). torchrun's own RANK / WORLD_SIZE / LOCAL_RANK are read through dart_core.settings.
ERRORS_ENV = "DART_RANK_ERRORS"  # folder: rank-<r>.pid at start, rank-<r>.json on an exception
REPORT_ENV = "DART_LAUNCH_REPORT"  # torchrun's account of the failed ranks (exit codes)
PARENT_ENV = "DART_LAUNCH_PARENT"  # pid of the flow process that started torchrun


class RankError(ValueError):
    """A rank stopped on bad input (the message names the file or option)."""


class RanksFailedError(RuntimeError):
    """A rank crashed or was killed; the message names the rank and how it ended."""


def _set_parent_death_signal(sig: int) -> None:
    """Linux: the kernel sends `sig` to this process when its parent dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 — not Linux: the launcher's own stop still applies
        pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


# ---- the flow side --------------------------------------------------------------------------------

def torchrun_command(nproc: int, spec_file: str) -> list[str]:
    return [sys.executable, "-u", "-m", "flows.ranks", "torchrun", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.2",
            "-m", "flows.ranks", "run", spec_file]


def launch(spec: dict, nproc: int, log: Callable[[str], None], *, grace: float = 20.0) -> None:
    """Run `spec` (see `run_rank`) on `nproc` ranks under torchrun; return when all ranks finished.
    Raises RankError / RanksFailedError when a rank fails; stops every rank on any exception here."""
    tmp = Path(tempfile.mkdtemp(prefix="dart-ranks-"))
    errors, report = tmp / "errors", tmp / "torchrun.json"
    errors.mkdir()
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, ERRORS_ENV: str(errors), REPORT_ENV: str(report), PARENT_ENV: str(os.getpid()),
           "PYTHONUNBUFFERED": "1"}
    # torchrun would set 1 thread per rank (with a warning); share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, str(spec_file)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True,
                            errors="replace", bufsize=1)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="dart-ranks-log", daemon=True)
    reader.start()
    tail: list[str] = []
    try:
        open_stream = True
        while open_stream or proc.poll() is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                open_stream = False
                continue
            tail = (tail + [line])[-40:]
            log(line)
        proc.wait()
    except BaseException:  # Ctrl-C, a Prefect cancellation, anything: no rank outlives the flow
        log(f"stopping the {nproc} training ranks")
        stop(proc, errors, grace)
        raise
    finally:
        if proc.poll() is None:
            stop(proc, errors, grace)
    try:
        if proc.returncode != 0:
            raise failure(proc.returncode, nproc, errors, report, tail)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rank_pids(errors: Path) -> list[int]:
    pids = []
    for p in errors.glob("rank-*.pid"):
        try:
            pids.append(int(p.read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by torchrun) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop(proc: subprocess.Popen, errors: Path, grace: float) -> None:
    """SIGTERM torchrun (it stops its ranks); after `grace` s SIGKILL torchrun and any rank left."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and (proc.poll() is None or any(_alive(p) for p in rank_pids(errors))):
        time.sleep(0.1)
    for pid in [proc.pid] + rank_pids(errors):
        if _alive(pid) if pid != proc.pid else proc.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def failure(code: int, nproc: int, errors: Path, report: Path, tail: list[str]) -> Exception:
    """The exception that tells why the ranks failed: a rank killed by a signal other than the
    SIGTERM torchrun sends to stop the others, else the first rank that raised, else torchrun's code."""
    failed = json.loads(report.read_text()).get("failures", []) if report.exists() else []
    for f in sorted(failed, key=lambda f: (f.get("time") or 0, f["rank"])):
        if f["exitcode"] < 0 and -f["exitcode"] != signal.SIGTERM:
            return RanksFailedError(f"rank {f['rank']} of {nproc} was killed by {_signal_name(f['exitcode'])}; "
                                    "the other ranks were stopped")
    raised = []
    for p in errors.glob("rank-*.json"):
        try:
            raised.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    if raised:
        # a rank's own error before the errors of ranks that lost contact with it
        first = min(raised, key=lambda e: (e.get("peer_loss", False), e["time"], e["rank"]))
        msg = f"rank {first['rank']} of {nproc}: {first['message']}"
        return RankError(msg) if first["user_error"] else RanksFailedError(msg)
    for f in failed:
        if f["exitcode"] != 0:
            how = (f"was killed by {_signal_name(f['exitcode'])}" if f["exitcode"] < 0
                   else f"exited with code {f['exitcode']}")
            return RanksFailedError(f"rank {f['rank']} of {nproc} {how}")
    last = next((line for line in reversed(tail) if line.strip()), "")
    return RanksFailedError(f"torchrun exited with code {code}" + (f": {last.strip()}" if last else ""))


# ---- the torchrun side ----------------------------------------------------------------------------

def run_torchrun(args: list[str]) -> int:
    """torch.distributed.run's main, writing which rank failed how to $DART_LAUNCH_REPORT."""
    _set_parent_death_signal(signal.SIGTERM)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # the flow process died before the line above
        return 1
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except ChildFailedError as e:
        failures = [{"rank": int(r), "local_rank": f.local_rank, "exitcode": f.exitcode, "pid": f.pid,
                     "time": f.timestamp} for r, f in e.failures.items()]
        report = os.environ.get(REPORT_ENV)
        if report:
            Path(report).write_text(json.dumps({"failures": failures}))
        for f in failures:
            how = (f"killed by {_signal_name(f['exitcode'])}" if f["exitcode"] < 0 else f"exit code {f['exitcode']}")
            print(f"torchrun: rank {f['rank']} (pid {f['pid']}) ended: {how}", flush=True)
        return 1
    except SignalException as e:
        print(f"torchrun: stopped by {signal.Signals(e.sigval).name}; the ranks were stopped", flush=True)
        return 128 + int(e.sigval)
    return 0


def _is_user_error(e: BaseException) -> bool:
    from flows.cli._guard import user_error_types

    return isinstance(e, user_error_types())


PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "gloo/transport", "NCCL communicator",
             "ProcessGroupNCCL", "ProcessGroupGloo")


def _is_peer_loss(e: BaseException) -> bool:
    """A collective that failed because another rank went away: a consequence, not the cause."""
    try:
        import torch.distributed as dist

        if isinstance(e, getattr(dist, "DistNetworkError", ())):
            return True
    except ImportError:
        pass
    return isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_LOSS)


def run_rank(spec_file: str) -> int:
    """One rank: DART on shards (dart_core.train.train_on_shards, DDP inside). The spec file holds
    {"options": TrainOptions as JSON, "n_samples": the training samples, counted once by the flow}."""
    _set_parent_death_signal(signal.SIGKILL)  # torchrun gone (even by kill -9): this rank goes too
    s = settings()  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    rank, world, local_rank = s.rank, s.world_size, s.local_rank or 0
    errors = Path(os.environ[ERRORS_ENV]) if ERRORS_ENV in os.environ else None
    if errors is not None:
        (errors / f"rank-{rank}.pid").write_text(str(os.getpid()))
    try:
        spec = json.loads(Path(spec_file).read_text())
        options = TrainOptions.model_validate(spec["options"])
        # the device dart_core.train.rank_device will pick; said before the seconds of torch imports
        device = f"cuda:{local_rank}" if options.device == "cuda" else options.device
        print(f"rank {rank}/{world}: pid {os.getpid()}, device {device}", flush=True)
        if rank:  # the same warnings as rank 0's, once per rank: rank 0's are enough
            import warnings

            warnings.simplefilter("ignore")
        from dart_core.train import train_from_options

        train_from_options(options, spec["n_samples"], log=lambda m: print(m, flush=True))
        return 0
    except BaseException as e:  # noqa: BLE001 — reported to the launcher, then this rank exits 1
        from flows.cli._guard import describe

        user, peer = _is_user_error(e), _is_peer_loss(e)
        if errors is not None:
            (errors / f"rank-{rank}.json").write_text(json.dumps(
                {"rank": rank, "type": type(e).__name__, "message": describe(e), "user_error": user,
                 "peer_loss": peer, "time": time.time()}))
        if not (user or peer):  # a bug: the traceback is what helps
            traceback.print_exc()
        print(f"rank {rank}: {describe(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "torchrun":
        sys.exit(run_torchrun(rest))
    if mode == "run":
        sys.exit(run_rank(rest[0]))
    sys.exit(f"usage: python -m flows.ranks torchrun ARGS | run SPEC.json (not {mode!r})")
