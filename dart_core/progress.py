"""Progress for long loops, fit for a terminal and for a log.

On a terminal: tqdm's live bar (count, rate, ETA when the total is known) on stderr. Elsewhere
(a log file, Prefect's UI, CI): the same figures as one plain line at most every `every` seconds,
through `log`, so a log is not flooded with carriage-return redraws and still shows the pace.
"""
from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm


class _Lines:
    """A file for tqdm that turns each redraw into one log call (no \\r, no repeats)."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.last = log, None

    def write(self, s: str) -> None:
        line = s.replace("\r", "").strip()
        if line and line != self.last:
            self.last = line
            self.log(line)

    def flush(self) -> None:
        pass


def progress_bar(total: int | None = None, desc: str = "", unit: str = "img", log: Callable[[str], None] | None = None,
                 enabled: bool = True, every: float = 30.0, terminal: bool | None = None) -> tqdm:
    """A tqdm bar: live on a terminal (`terminal` None = stderr is a TTY), else a line every
    `every` seconds through `log` (print to stderr by default); `enabled=False`: silent."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if terminal if terminal is not None else sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, smoothing=0.1, mininterval=1.0, file=sys.stderr)
    out = _Lines(log or (lambda s: print(s, file=sys.stderr, flush=True)))
    fmt = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}"
           if total else "{desc}: {n_fmt} {unit}, {rate_fmt}, {elapsed} elapsed")
    # delay: a run shorter than `every` logs nothing (its summary says enough)
    return tqdm(total=total, desc=desc, unit=unit, file=out, mininterval=every, maxinterval=every, delay=every,
                bar_format=fmt, smoothing=0.1)
