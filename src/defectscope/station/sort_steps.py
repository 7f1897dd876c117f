"""The sorter's pieces around :class:`defectscope.station.sorter._Sorter`: the item in hand, the filing thread,
the messages and checks the sorter shares, the metadata pattern a model with metadata inputs needs."""

from __future__ import annotations

import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from defectscope.runtime.predictor import UNREADABLE, Prediction, Predictor
from defectscope.station.filing import MAX_BYTES

__all__ = ["Filer", "Item", "linked_message", "metadata_pattern", "same_inode", "too_large"]


@dataclass
class Item:
    path: Path  # where the file is now (in move mode, this worker's claim folder)
    origin: Path  # where it was found in the inbox (the log's source_path)
    name: str  # printable file name, the log key with the hash
    size: int
    sha256: str
    data: bytes | None  # None when too large to decode



class FilingSorter(Protocol):
    """What the filing thread needs of the sorter."""

    batch_size: int
    stop: threading.Event

    def _file_batch(self, jobs: list[tuple[Item, Prediction]], sigs: dict[Path, tuple[int, int, int]]) -> None: ...


class Filer:
    """The filing thread: places the classified files and logs them, a batch at a time and in order, while
    inference goes on (its fsyncs wait with the GIL released).

    :meth:`put` gathers the files of a batch; the thread files each batch with one commit for its pending rows
    and one for their outcome (:meth:`_Sorter._file_batch`). Once ``stop`` is set it files nothing more (those
    files have no row yet: the next run takes them). An exception escaping the filing (a bug, or a test's
    simulated crash) stops it; :meth:`close` re-raises it in the caller's thread.
    """

    def __init__(self, sorter: FilingSorter, sigs: dict[Path, tuple[int, int, int]], progress: Any) -> None:
        self.sorter, self.sigs, self.progress = sorter, sigs, progress
        self.batch: list[tuple[Item, Prediction]] = []
        # Bounded: inference may run at most a couple of batches ahead of the disk.
        self.queue: queue.Queue[list[tuple[Item, Prediction]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="defectscope-filer", daemon=True)
        self.thread.start()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def put(self, item: Item, pred: Prediction) -> None:
        self.batch.append((item, pred))
        if len(self.batch) >= self.sorter.batch_size:
            self.flush()

    def flush(self) -> None:
        """Hand the files gathered so far to the thread."""
        batch, self.batch = self.batch, []
        while batch and not self.failed:
            try:
                self.queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        while (jobs := self.queue.get()) is not None:
            if self.failed or self.sorter.stop.is_set():
                continue  # drain without filing, so flush() never blocks
            try:
                self.sorter._file_batch(jobs, self.sigs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by close()
                self.error = exc
            if self.progress is not None:
                self.progress.update(len(jobs))

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def linked_message(links: int) -> str:
    return (f"has {links} hard links (another name, perhaps outside the inbox, shares its bytes): not filed; "
            "copy the file into the inbox instead of linking it")


def same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def too_large(it: Item) -> Prediction:
    return Prediction(path=str(it.origin), top_class=None, confidence=None, probabilities={}, decision=UNREADABLE,
                      error=f"{it.origin}: larger than {MAX_BYTES} bytes")


def metadata_pattern(predictor: Predictor, pattern: str | None) -> re.Pattern[str] | None:
    """The compiled pattern; refused up front when it cannot give every metadata input the model needs."""
    fields = predictor.metadata_fields
    if not fields:
        return None
    if not pattern:
        raise ValueError(f"the model needs metadata inputs ({', '.join(fields)}) with every image: give a "
                         "metadata pattern, a regular expression with named groups matched against the file path, "
                         f"e.g. --metadata-pattern '(?P<{fields[0]}>[^_/]+)_'")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"metadata pattern {pattern!r}: {exc}") from None
    missing = [f for f in fields if f not in compiled.groupindex]
    if missing:
        raise ValueError(f"metadata pattern {pattern!r} has no named group for {', '.join(missing)} "
                         f"(write (?P<{missing[0]}>...))")
    return compiled
