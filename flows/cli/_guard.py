"""How every `dart` command ends; the app's group class (flows.cli._app) wraps each command in
`guarded()`, so commands raise and never print errors themselves.

- A user mistake (an option value out of range, a missing or malformed input, a checkpoint that
  does not fit, ...) ends as ONE line `error: ...` on stderr, exit code 2. Prefect's task and flow
  engines log a failing run's exception with its traceback at ERROR level before re-raising it;
  for these exception types that log record is dropped (the run's state keeps the message).
- Ctrl-C, to the `dart` process alone or to its whole process group (a terminal), ends the command
  within seconds with exit code 130 and `interrupted; rerun the same command to resume`: work on
  other threads is asked to stop too (dart_core.interrupt), child processes never see the signal
  (see `_sigint_stops_everything`), and every stage publishes its output atomically, so a rerun
  redoes exactly what was cut short.
"""
from __future__ import annotations

import _thread
import logging
import re
import signal
import sys
import threading
from contextlib import contextmanager

import typer
from typer._click import exceptions as click_exceptions  # typer's own copy of click

from dart_core import interrupt

INTERRUPTED = "interrupted; rerun the same command to resume"

# Exception types whose message is the whole story, by module: only a module already imported can
# have raised one, and importing the others to check would cost seconds (torch) on every error.
USER_ERRORS = {
    "dart_core.vocab": ("VocabularyError",),
    "dart_core.checkpoint": ("CheckpointError",),
    "dart_core.backbone": ("BackboneError",),
    "dart_core.crg.graph": ("CRGError",),
    "dart_core.crg.mine": ("CRGMiningError",),
    "dart_core.crg.client": ("LLMError",),
    "dart_core.data.records": ("SourceError",),
    "dart_core.data.reader": ("ShardsError",),
    "dart_core.data.shard_writer": ("ShardWriteError",),
    "dart_core.data.shard_run": ("ShardRunError",),
    "dart_core.evaluate": ("PredictionsError",),
    "dart_core.infer": ("AnnotateError",),
    "dart_core.predictions": ("AnnotateError",),
    "botocore.exceptions": ("ClientError", "BotoCoreError"),  # bucket or key missing, no credentials
    "boto3.exceptions": ("Boto3Error",),
}


# Failures that are no user mistake but whose message is the whole story (a training rank killed by
# a signal, flows.ranks): one `error:` line and exit 1, no traceback.
REPORTED_FAILURES = {
    "flows.ranks": ("RanksFailedError",),
}


def reported_failure_types() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[mod], name) for mod, names in REPORTED_FAILURES.items() if mod in sys.modules
                 for name in names)


def user_error_types() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[mod], name) for mod, names in USER_ERRORS.items() if mod in sys.modules
             for name in names]
    # ValueError: dart_core.train reports bad settings so; OSError: missing files, permissions, full disks
    return (*found, ValueError, OSError)


def one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()


def describe(e: BaseException) -> str:
    # our messages (and the ValueErrors / OSErrors our code raises) say what is wrong; a library's
    # exception is named, its message alone may not tell where it came from
    plain = type(e).__module__.startswith(("dart_core", "flows", "builtins"))
    return one_line(str(e) if plain else f"{type(e).__name__}: {e}")


class _QuietRunLogs(logging.Filter):
    """Drops what would bury the one line that matters: a user error's traceback, and after
    Ctrl-C the task runs' crash reports (a pair of ERROR lines per shard still queued)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect.task_runs" and interrupt.stop_requested():
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not isinstance(exc, (*user_error_types(), *reported_failure_types()))


# the loggers of Prefect's run engines (task runs, flow runs): where a failing run's traceback goes
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def _on_sigint(signum, frame):
    interrupt.request_stop()
    raise KeyboardInterrupt


def _watch_sigint(done: threading.Event) -> None:
    while not done.is_set():
        if signal.sigtimedwait({signal.SIGINT}, 0.2) is not None:
            interrupt.request_stop()  # at once: the main thread may be waiting on a busy worker thread
            _thread.interrupt_main()  # KeyboardInterrupt there, as soon as it runs Python again


@contextmanager
def _sigint_stops_everything():
    """Route Ctrl-C to the command alone.

    SIGINT is blocked in the main thread for the command's duration, so every thread and process
    started meanwhile inherits the block: Prefect's task threads, DataLoader and decoding workers,
    the forkserver, Prefect's temporary API server. A terminal's Ctrl-C, which signals the whole
    process group, no longer kills those children mid-item (nor the API server the interrupted
    run must report to), and no thread other than the watcher below receives it. Before this,
    the kernel could hand the signal to a worker thread; the main thread, blocked waiting on a
    task, then did not notice it until that task's whole shard was done.
    The watcher takes SIGINT with sigtimedwait, tells long loops to stop (dart_core.interrupt)
    and raises KeyboardInterrupt in the main thread."""
    interrupt.reset()
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)  # a thread created before still may get it
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield
        return
    # multiprocessing's resource tracker, started by the first pool or DataLoader, ends its spawn
    # with SIG_UNBLOCK (not a restore of the mask) in the thread that starts it: that task thread
    # would then take SIGINT and hand it to every worker it starts. Started now, before the block,
    # it is never started again.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    done = threading.Event()
    watcher = threading.Thread(target=_watch_sigint, args=(done,), name="dart-sigint", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)


@contextmanager
def guarded():
    """Run one command: user errors -> `error:` line + exit 2, Ctrl-C -> exit 130."""
    quiet = _QuietRunLogs()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        with _sigint_stops_everything():
            yield
    except click_exceptions.NoArgsIsHelpError:
        raise  # `dart crg` alone: typer prints the help
    except click_exceptions.UsageError as e:  # bad option value, missing option, unknown command
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        typer.echo(f"error: {one_line(e.format_message())}{where}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        if isinstance(e, reported_failure_types()):
            typer.echo(f"error: {describe(e)}", err=True)
            raise typer.Exit(1) from None
        if not isinstance(e, user_error_types()):
            raise  # a bug: the traceback is what helps
        typer.echo(f"error: {describe(e)}", err=True)
        raise typer.Exit(2) from None
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
