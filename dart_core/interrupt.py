"""Ctrl-C for work that does not run on the main thread.

Python raises KeyboardInterrupt in the main thread only: Prefect's task threads and the CRG
miner's request threads would keep going until their whole item (a shard, a class's queries) is
done. The `dart` CLI calls `request_stop()` as soon as SIGINT arrives (flows.cli._guard); long
loops call `check()` between units of work whose output is published atomically, so a rerun
redoes exactly the unit that was cut short.
"""
from __future__ import annotations

import threading

_stop = threading.Event()


class Interrupted(KeyboardInterrupt):
    """Raised by `check()` once a stop was requested. A KeyboardInterrupt, so that no
    `except Exception` on the way (per-sample error handling, Prefect retries) swallows it."""


def request_stop() -> None:
    _stop.set()


def reset() -> None:
    """A new command in the same process (tests, notebooks) starts without a pending stop."""
    _stop.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def check() -> None:
    if _stop.is_set():
        raise Interrupted()


def sleep(seconds: float) -> None:
    """time.sleep that a stop request cuts short (raising Interrupted): backoffs, polling."""
    if _stop.wait(seconds):
        raise Interrupted()

