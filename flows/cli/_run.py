"""How a `dart` command runs its flow when the command's own output is the report.

`dart shard`, `dart refresh`, `dart eval` and `dart crg mine` run their Prefect flows (a run per command, in the
Prefect UI like any other), but print exactly what they printed as plain functions: their report
on stdout, their progress and split lines on stderr, one `error:` line for a mistake. So, while
the flow runs, Prefect's own console lines (the temporary server, "Beginning flow run", "Finished
in state ...", a failed task's report) are kept off the terminal — they still reach the Prefect
API — and with `echo=True` the messages the flow's tasks log (`get_run_logger().info(...)`) are
printed as plain stderr lines, as the command printed them before. Logs of other libraries
(warnings of dart_core's source readers, ...) are untouched.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import typer

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _from_prefect(record: logging.LogRecord) -> bool:
    return record.name == "prefect" or record.name.startswith("prefect.")


class _DropPrefect(logging.Filter):
    """On Prefect's console handlers: while active, no record of Prefect's loggers. Once installed
    it also keeps dropping the temporary server's own line (logger `prefect`), which comes at the
    process's exit, after the command."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_from_prefect(record) and (self.active or record.name == "prefect"))


_drop = _DropPrefect()


class _Echo(logging.Handler):
    """A flow's or task's own message (not one of Prefect's engine) as a plain stderr line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        import prefect

        self._prefect_dir = os.path.dirname(prefect.__file__) + os.sep

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.pathname.startswith(self._prefect_dir):
            return
        typer.echo(record.getMessage(), err=True)


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    found = []
    for logger in [logging.getLogger(), *[logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                          if n == "prefect" or n.startswith("prefect.")]]:
        found += [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler) and h not in found]
    return found


@contextmanager
def plain_output(echo: bool = False):
    """Run a flow inside: Prefect's console lines are not shown; with `echo`, the flow's own log
    messages are printed as plain stderr lines."""
    import prefect.main  # noqa: F401 - configures Prefect's logging (its console handlers) first

    handlers = _console_handlers()
    for h in handlers:
        if _drop not in h.filters:
            h.addFilter(_drop)
    _drop.active += 1
    echo_handler = _Echo() if echo else None
    loggers = [logging.getLogger(n) for n in RUN_LOGGERS]
    if echo_handler:
        for lg in loggers:
            lg.addHandler(echo_handler)
    try:
        yield
    finally:
        _drop.active -= 1
        if echo_handler:
            for lg in loggers:
                lg.removeHandler(echo_handler)
