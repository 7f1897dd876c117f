"""Progress reporting for long loops: library code reports through :func:`progress`; only the CLI shows it.

By default progress is silent. ``defectscope`` (the CLI) calls :func:`use_bars` when stderr is a terminal, and
:func:`use_lines` when it is not: a CI log or a piped run gets, instead of bar redraws, one logged line per
loop every ``DEFECTSCOPE_PROGRESS_SECONDS`` (default 30) seconds, so a long epoch shows it is alive.
Messages go through :mod:`logging`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)
LINE_SECONDS_ENV = "DEFECTSCOPE_PROGRESS_SECONDS"
DEFAULT_LINE_SECONDS = 30.0
_bar_factory: Callable[..., Any] | None = None


class _Silent:
    """The progress object when no bars are wanted: iterates and ignores updates."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Lines(_Silent):
    """The progress object of a non-terminal log: a line every ``interval`` seconds, none for a quick loop."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, interval: float):
        super().__init__(iterable)
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.desc, self.total, self.unit, self.interval = desc or "progress", total, unit, interval
        self.n = 0
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info(self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        done = f"{self.n} {self.unit}"
        if self.total:
            left = elapsed * (self.total - self.n) / max(self.n, 1)
            done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%}), about {left:.0f}s left"
        return f"{self.desc}: {done}, {elapsed:.0f}s so far"


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, unit: str = "it",
             enabled: bool = True) -> Any:
    """An iterable (or, without ``iterable``, a counter with ``update``) that shows progress only in the CLI:
    a bar on a terminal, a line every so often in a log."""
    if _bar_factory is None or not enabled:
        return _Silent(iterable)
    return _bar_factory(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def use_bars(enabled: bool = True) -> None:
    """Show tqdm bars for :func:`progress` (the CLI calls this when stderr is a terminal)."""
    global _bar_factory
    if enabled:
        from tqdm.auto import tqdm

        _bar_factory = tqdm
    else:
        _bar_factory = None


def use_lines(interval: float | None = None) -> None:
    """Log a progress line per loop every ``interval`` seconds (default: $DEFECTSCOPE_PROGRESS_SECONDS or 30);
    the CLI calls this when stderr is not a terminal."""
    global _bar_factory
    if interval is None:
        try:
            interval = float(os.environ.get(LINE_SECONDS_ENV, DEFAULT_LINE_SECONDS))
        except ValueError:
            interval = DEFAULT_LINE_SECONDS  # a malformed setting must not stop a training run
    every = interval

    def lines(iterable, *, desc, total, unit, **_bar_options):
        return _Lines(iterable, desc, total, unit, every)

    _bar_factory = lines


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Plain ``message`` lines on stderr for the ``defectscope`` loggers (warnings prefixed), as a CLI prints."""
    handler = logging.StreamHandler()
    handler.setFormatter(_CliFormatter())
    root = logging.getLogger("defectscope")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message
