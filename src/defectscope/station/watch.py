"""Watching an inbox for the sorter: which files have settled, the watch loop, the output lock, SIGINT/SIGTERM.

The loop is :func:`watch_inbox`: it rescans every ``poll_interval`` seconds and files what settled; filesystem
events (watchdog, when installed and usable) only wake it early, so it still works on network shares without
events. :func:`exclusive` holds ``OUT/.defectscope-sort.lock`` (POSIX only): shared by any number of move-mode
sorters, exclusive for a copy-mode one. :func:`stop_on_signals` turns SIGINT/SIGTERM into a stop request that
lets the file in hand finish.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from defectscope.errors import DefectscopeError
from defectscope.progress import progress as progress_bar

__all__ = ["LOCK_NAME", "InboxSorter", "OutputBusy", "Settler", "exclusive", "one_shot", "stop_on_signals",
           "watch_inbox"]

LOCK_NAME = ".defectscope-sort.lock"

Signature = tuple[int, int, int]  # size, mtime_ns, inode


class InboxSorter(Protocol):
    """What the watch loop needs of the sorter of :mod:`defectscope.station.sorter` (a structural type, so this
    module never imports the sorter that imports it)."""

    inbox: Path
    stop: threading.Event
    say: Callable[..., Any]
    skipped: Counter[str]

    def scan(self) -> dict[Path, Signature]: ...

    def process(self, paths: list[Path], sigs: dict[Path, Signature], progress: Any = None) -> None: ...


class Settler:
    """Files whose (size, mtime, inode) stayed the same for ``settle`` seconds across observations."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self.seen: dict[Path, tuple[Signature, float]] = {}

    def observe(self, snapshot: dict[Path, Signature]) -> tuple[list[Path], int]:
        """(settled files, number still changing or too new)."""
        now, seen, ready = time.monotonic(), {}, []
        for path, sig in snapshot.items():
            old = self.seen.get(path)
            since = old[1] if old and old[0] == sig else now
            seen[path] = (sig, since)
            if old and old[0] == sig and now - since >= self.settle:
                ready.append(path)
        self.seen = seen
        return ready, len(snapshot) - len(ready)


def one_shot(sorter: InboxSorter, settle_seconds: float, progress: bool) -> None:
    """One pass: look twice, ``settle_seconds`` apart, and file what did not change."""
    settler = Settler(settle_seconds)
    settler.observe(sorter.scan())
    if settler.seen:
        sorter.stop.wait(settle_seconds)
    ready, unsettled = settler.observe(sorter.scan())
    if unsettled:
        sorter.skipped["unsettled"] += unsettled
        sorter.say(f"{unsettled} file(s) still being written (or new): left for the next run")
    sigs = {p: settler.seen[p][0] for p in ready}
    bar = progress_bar(total=len(ready), unit="img", desc="sorting", enabled=progress and bool(ready))
    try:
        sorter.process(ready, sigs, bar)
    finally:
        bar.close()


def watch_inbox(sorter: InboxSorter, settle_seconds: float, poll_interval: float) -> None:
    """File what settles in ``sorter.inbox`` until ``sorter.stop`` is set (a pass in hand always finishes)."""
    wake = threading.Event()
    observer = _start_observer(sorter.inbox, wake, sorter.say)
    settler = Settler(settle_seconds)
    sorter.say(f"watching {sorter.inbox} ({'events + ' if observer else ''}scan every {poll_interval:g} s); "
               "Ctrl-C to stop")
    try:
        while not sorter.stop.is_set():
            ready, unsettled = settler.observe(sorter.scan())
            sorter.process(ready, {p: settler.seen[p][0] for p in ready})
            # Files waiting to settle need another look after settle_seconds, not a full poll interval.
            timeout = min(poll_interval, settle_seconds) if unsettled else poll_interval
            deadline = time.monotonic() + timeout
            while not sorter.stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if wake.wait(min(left, 0.1)):
                    wake.clear()
                    break
    finally:
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)


def _start_observer(inbox: Path, wake: threading.Event, say: Callable[..., Any]) -> Any:
    """A watchdog observer that sets ``wake`` on any change, or None (then the scan loop alone polls)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class _Wake(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            wake.set()

    try:
        observer = Observer()
        observer.schedule(_Wake(), str(inbox), recursive=True)
        observer.start()
    except Exception as exc:  # inotify limits, unsupported share...: polling still works
        say(f"filesystem events unavailable ({exc}); polling only")
        return None
    return observer


class OutputBusy(DefectscopeError, RuntimeError):
    """A copy-mode sorter and another sorter on one output folder."""


@contextmanager
def exclusive(out: Path, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``out`` (released on any exit): shared by move-mode sorters, which claim their
    files (:mod:`defectscope.station.claims`) and run side by side; exclusive for copy mode, which cannot claim."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(out / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            raise OutputBusy(f"{out}: another sorter is filing into it and one of the two is in copy mode, which "
                             "runs alone; stop it, or sort in move mode (any number of move-mode sorters share "
                             "an inbox and an output folder)") from None
        yield


@contextmanager
def stop_on_signals(stop: threading.Event, say: Callable[..., Any]) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` (a second one interrupts at once); only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # safe: the write-ahead log recovers whatever was in hand
        stop.set()
        say(f"{signal.Signals(signum).name}: finishing the file in hand, then stopping")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
