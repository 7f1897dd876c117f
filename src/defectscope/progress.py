"""Progress reporting for long loops: library code reports through :func:`progress`; only the CLI shows bars.

By default progress is silent. ``defectscope`` (the CLI) calls :func:`use_bars` when stderr is a terminal, so a
CI log or a redirected run gets the logged lines and no bar redraws. Messages go through :mod:`logging`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, unit: str = "it",
             enabled: bool = True) -> Any:
    """An iterable (or, without ``iterable``, a counter with ``update``) that shows a bar only in the CLI."""
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
