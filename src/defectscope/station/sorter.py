r"""``defectscope sort``: file every new image of an inbox into ``OUT/<decision>/`` and log it, crash-safely.

The offline sorter of an inspection line (ONNX Runtime or OpenVINO, numpy and Pillow, never torch). Each image goes to
``OUT/GOOD``, ``OUT/<defect class>``, ``OUT/REVIEW``, ``OUT/Drift`` or, when it cannot be decoded (empty,
truncated, not an image), ``OUT/_unreadable``; one row per image goes to the results store
(:mod:`defectscope.station.store`: SQLite by default, ``OUT/results.db``, or any store URL).

Guarantees, in the order the code keeps them:

* **Nothing is lost or overwritten** (:mod:`defectscope.station.filing`). A name already taken in the class
  folder becomes ``name (1).png``; files are placed with a hard link, which fails rather than replace an
  existing file, and the source is unlinked only after that. Where hard links are impossible (another
  filesystem, some network shares) the file is copied to a temporary name, fsynced, verified (size and
  SHA-256) and only then given its name and the source deleted. ``mode="copy"`` never touches the inbox.
* **Write-ahead log.** For each file: hash it; look its row up; write a ``pending`` row holding the
  intended destination; place the file; mark the row ``done``. A restart first settles every ``pending``
  row: destination present with the right hash -> ``done`` (and a leftover source with the same hash is
  removed in move mode); otherwise the row becomes ``error`` and the source is filed again by the pass.
  So a run killed at any instant and started again files every input exactly once, with one ``done`` row
  per image.
* **One row per image, keyed by content and name** (``content_sha256``, ``file_name``): the same bytes
  under the same name are one image (a copy-mode re-run skips it; in move mode a re-delivered copy is
  removed from the inbox when the filed one is still in place, else it is filed again). Identical bytes
  under different names are different images: each is filed and logged.
* **Only finished files are taken**: a file's size and mtime must stay unchanged for ``settle_seconds``
  (:class:`defectscope.station.watch.Settler`).
  Hidden files (``.name``, e.g. an uploader's temporary file) are never taken.
* **Hostile inbox**: symlinks are never followed (skipped with a logged reason), directories and other
  non-regular files are left alone, every destination is resolved and must lie inside ``OUT``.
* **One bad file never stops the run**: an ``OSError`` (disk full, permission denied) marks that file's
  row ``error`` with the message; the next pass (or run) retries it.

One sorter per output folder at a time (``OUT/.defectscope-sort.lock``, POSIX only); the lock, the watch loop
and the signal handling live in :mod:`defectscope.station.watch`.

A model trained with metadata inputs (``lib``, ``window``...) gets them from the file's path: ``metadata_pattern``
is a regular expression with one named group per input, searched in the path relative to the inbox (so a folder
name can carry a value too: ``(?P<lib>Die\d+)/.*_w(?P<window>\d+)``). A file whose path does not give every
value is filed as ``_unreadable`` with the missing field in its error; nothing is guessed. (A sidecar file per
image would itself land in the inbox and race the image it describes; the name is already atomic with it.)
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import re
import sqlite3
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope.progress import progress as progress_bar
from defectscope.runtime.predictor import UNREADABLE, Prediction, Predictor, WithMetadata

# place_file is looked up in this module's namespace at each call: tests replace ``sorter.place_file`` to
# simulate a full disk or a crash mid-placement.
from defectscope.station.filing import (
    MAX_BYTES,
    SortError,
    check_inside,
    part_path,
    place_file,
    printable,
    read_regular,
    safe_file_name,
    safe_folder_name,
    sha256_file,
    unique_path,
)
from defectscope.station.store import Store, export_log, sqlite_path
from defectscope.station.watch import Settler, exclusive, stop_on_signals, watch_inbox

__all__ = ["MODES", "SortError", "export_log", "place_file", "safe_folder_name", "sort"]

_log = logging.getLogger(__name__)

MODES = ("move", "copy")
RETRY_SECONDS = 60.0  # watch mode: a file that failed is tried again after this long (or once it changes)


@dataclass
class _Item:
    path: Path
    name: str  # printable file name, the log key with the hash
    size: int
    sha256: str
    data: bytes | None  # None when too large to decode


# ---------------------------------------------------------------------------------------------- sorter

class _Sorter:
    def __init__(self, predictor: Predictor, inbox: Path, out: Path, mode: str, log_path: Path | str,
                 batch_size: int, stop: threading.Event, log: Callable[..., Any]) -> None:
        self.predictor, self.inbox, self.out, self.mode = predictor, inbox, out, mode
        self.batch_size, self.stop, self.say = batch_size, stop, log
        self.out_real = out.resolve()
        self.db = Store(log_path)  # written by the filing thread only (and by recover() before it starts)
        # A second connection for this thread's look-ups: in WAL mode a reader never waits for the writer's
        # fsynced commits, so reading the next files never stalls behind filing.
        self.reader = Store(log_path)
        # Never take our own output or log when they live inside the inbox.
        db_file = sqlite_path(log_path)
        self.excluded = {self.out_real, *(Path(str(db_file.resolve()) + s) for s in ("", "-wal", "-shm", "-journal")
                                          if db_file is not None)}
        self.model_id = hashlib.sha256(Path(predictor.model_path).read_bytes()).hexdigest()[:16]
        spec, prov = predictor.spec, predictor.provenance or {}
        version = prov.get("defectscope_version") or spec.get("defectscope_version")
        self.model_version = f"defectscope {version}, model created {spec.get('created')}"
        self.counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.errors: list[dict[str, str]] = []
        self.recovered = 0
        self.reported: set[tuple[Path, str]] = set()
        self.known: dict[Path, tuple[int, int, int]] = {}  # copy mode: settled files already logged
        self.failed: dict[Path, tuple[tuple[int, int, int], float]] = {}
        self.metadata_pattern: re.Pattern[str] | None = None  # set by sort() for a model with metadata inputs

    def metadata_of(self, path: Path) -> dict[str, str]:
        """The metadata inputs a file's path gives (named groups of the pattern that matched; {} when none)."""
        if self.metadata_pattern is None:
            return {}
        try:
            relative = path.relative_to(self.inbox).as_posix()
        except ValueError:
            relative = path.name
        found = self.metadata_pattern.search(relative)
        return {k: v for k, v in found.groupdict().items() if v is not None} if found else {}

    # ---- restart
    def recover(self) -> None:
        """Settle the ``pending`` rows an interrupted run left (see the module docstring)."""
        for row in self.db.rows("pending"):
            dest, src, sha = Path(row["destination"]), Path(row["source_path"]), row["content_sha256"]
            with suppress(FileNotFoundError, SortError):
                check_inside(dest, self.out_real)
                part_path(dest, row["id"]).unlink()
            if sha256_file(dest) == sha:
                if self.mode == "move" and sha256_file(src) == sha:
                    with suppress(OSError):
                        os.unlink(src)  # the interrupted move got as far as the link: finish it
                self.db.mark_done(row["id"])
                self.say(f"recovered {row['file_name']}: already filed as {dest}")
            else:
                self.db.mark_error(row["id"], "interrupted before the file was placed; filed again when seen")
                self.say(f"recovered {row['file_name']}: not placed yet, will be filed again")
            self.recovered += 1

    # ---- scanning
    def scan(self) -> dict[Path, tuple[int, int, int]]:
        """Regular, non-hidden files under the inbox (symlinks reported and skipped) -> size, mtime, inode."""
        found: dict[Path, tuple[int, int, int]] = {}
        for root, dirs, files in os.walk(self.inbox, followlinks=False, onerror=self._walk_error):
            base = Path(root)
            for d in list(dirs):
                p = base / d
                if d.startswith(".") or p.resolve() in self.excluded:
                    dirs.remove(d)
                elif p.is_symlink():
                    self._skip(p, "symlink", "a symbolic link (not followed)")
            dirs.sort()
            for name in sorted(files):
                p = base / name
                if name.startswith(".") or p.resolve() in self.excluded:
                    continue
                try:
                    st = p.lstat()
                except OSError:
                    continue  # vanished between listing and stat
                if stat.S_ISLNK(st.st_mode):
                    self._skip(p, "symlink", "a symbolic link (not followed)")
                elif not stat.S_ISREG(st.st_mode):
                    self._skip(p, "not_regular", "not a regular file")
                else:
                    sig = (st.st_size, st.st_mtime_ns, st.st_ino)
                    if self.known.get(p) == sig:
                        continue
                    failed = self.failed.get(p)
                    if failed and failed[0] == sig and time.monotonic() - failed[1] < RETRY_SECONDS:
                        continue
                    found[p] = sig
        return found

    def _walk_error(self, exc: OSError) -> None:
        self._report_error(Path(exc.filename or self.inbox), f"cannot list: {exc.strerror or exc}")

    def _skip(self, path: Path, reason: str, message: str) -> None:
        if (path, reason) not in self.reported:  # once per file, not once per scan
            self.reported.add((path, reason))
            self.skipped[reason] += 1
            self.say(f"skipped {path}: {message}")

    def _report_error(self, path: Path, message: str, sig: tuple[int, int, int] | None = None) -> None:
        self.errors.append({"path": str(path), "error": message})
        if sig is not None:
            self.failed[path] = (sig, time.monotonic())
        self.say(f"error: {printable(str(path))}: {message}")

    # ---- processing
    def process(self, paths: list[Path], sigs: dict[Path, tuple[int, int, int]], progress: Any = None) -> None:
        """Hash, classify and file ``paths``; stops between files once ``stop`` is set.

        Three stages overlap so the runtime is never idle: this thread reads and hashes the files and feeds
        them to the predictor (which decodes the next batch in its pool while the runtime runs this one,
        batches spanning files of any folder), and a filing thread places each classified file and writes
        its log rows while the next batch is inferred. Files are filed in the order they were read.
        """
        waiting: deque[_Item] = deque()  # read and sent to the predictor, in order

        def sources() -> Iterator[bytes]:
            for path in paths:
                if self.stop.is_set() or filer.failed:
                    return
                it = self._load(path, sigs[path])
                if it is None or self._already_done(it, sigs[path]):
                    if progress is not None:
                        progress.update(1)
                    continue
                waiting.append(it)
                if it.data is not None:
                    yield WithMetadata(it.data, self.metadata_of(path)) if self.metadata_pattern else it.data

        filer = _Filer(self, sigs, progress)
        try:
            for pred in self.predictor.iter_predict(sources(), self.batch_size):
                while waiting[0].data is None:  # too large to decode: filed as unreadable in its turn
                    it = waiting.popleft()
                    filer.put(it, _too_large(it))
                filer.put(waiting.popleft(), pred)
                if self.stop.is_set() or filer.failed:
                    break
            while waiting and not self.stop.is_set() and not filer.failed:
                it = waiting.popleft()
                filer.put(it, _too_large(it))
        finally:
            filer.close()  # waits for the files in hand; re-raises what stopped the filing thread

    def _load(self, path: Path, sig: tuple[int, int, int]) -> _Item | None:
        try:
            data, sha, size = read_regular(path)
        except FileNotFoundError:
            return None  # taken away by someone else meanwhile
        except (OSError, SortError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                self._skip(path, "symlink", "a symbolic link (not followed)")
            else:
                self._report_error(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}", sig)
            return None
        if size != sig[0]:
            self.skipped["unsettled"] += 1  # grew after it looked settled: the next pass takes it
            return None
        return _Item(path, printable(path.name), size, sha, data)

    def _already_done(self, it: _Item, sig: tuple[int, int, int], db: Store | None = None) -> bool:
        row = (db or self.reader).find(it.sha256, it.name)
        if row is None or row["status"] != "done":
            return False
        if self.mode == "copy":
            self.known[it.path] = sig
            self.skipped["already_done"] += 1
        elif sha256_file(Path(row["destination"])) == it.sha256:
            # Same name, same bytes, already filed and still there: the inbox copy is a duplicate.
            try:
                os.unlink(it.path)
            except OSError as exc:
                self._report_error(it.path, f"already filed as {row['destination']}; cannot remove: {exc}", sig)
                return True
            self.skipped["duplicate_removed"] += 1
            self.say(f"{it.path}: already filed as {row['destination']}; removed the inbox copy")
        else:
            return False  # its filed copy is gone: file this one again (the row is reused)
        return True

    def _file(self, it: _Item, pred: Prediction, sig: tuple[int, int, int]) -> None:
        row = self.db.find(it.sha256, it.name)
        if row is not None and row["status"] == "done" and self._already_done(it, sig, self.db):
            return  # a twin (same name and bytes) in another inbox folder was filed earlier in this batch
        folder = self.out / safe_folder_name(pred.decision)
        dest = unique_path(folder, safe_file_name(it.path.name))
        record = {
            "file_name": it.name, "source_path": printable(str(it.path)), "content_sha256": it.sha256,
            "size_bytes": it.size, "decision": pred.decision, "top_class": pred.top_class,
            "confidence": pred.confidence, "probabilities": pred.probabilities or None,
            "drift_score": pred.drift_score, "model_id": self.model_id, "model_version": self.model_version,
            # The image was decoded from its bytes, so the decoder's message names "<bytes>": name the file.
            "destination": str(dest), "error": pred.error and pred.error.replace("<bytes>", it.name, 1),
        }
        try:
            row_id = self.db.begin(record, None if row is None else row["id"])
        except sqlite3.Error as exc:  # the log itself failing (disk full): leave the file untouched, go on
            self._report_error(it.path, f"cannot write the log: {exc}", sig)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            check_inside(dest, self.out_real)
            place_file(it.path, dest, self.mode, it.sha256, part_path(dest, row_id))
        except (OSError, SortError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.db.mark_error(row_id, message)
            self._report_error(it.path, message, sig)
            return
        self.db.mark_done(row_id)
        self.failed.pop(it.path, None)
        if self.mode == "copy":
            self.known[it.path] = sig
        self.counts[pred.decision] += 1

    def close(self) -> None:
        self.db.close()
        self.reader.close()


class _Filer:
    """The filing thread: places each classified file and logs it, in order, while inference goes on.

    Once ``stop`` is set it files nothing more (those files have no row yet: the next run takes them). An
    exception escaping :meth:`_Sorter._file` (a bug, or a test's simulated crash) stops it; :meth:`close`
    re-raises it in the caller's thread.
    """

    def __init__(self, sorter: _Sorter, sigs: dict[Path, tuple[int, int, int]], progress: Any) -> None:
        self.sorter, self.sigs, self.progress = sorter, sigs, progress
        # Bounded: inference may run at most a couple of batches ahead of the disk.
        self.queue: queue.Queue[tuple[_Item, Prediction] | None] = queue.Queue(maxsize=2 * sorter.batch_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="defectscope-filer", daemon=True)
        self.thread.start()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def put(self, item: _Item, pred: Prediction) -> None:
        while not self.failed:
            try:
                self.queue.put((item, pred), timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.failed or self.sorter.stop.is_set():
                continue  # drain without filing, so put() never blocks
            item, pred = job
            try:
                self.sorter._file(item, pred, self.sigs[item.path])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by close()
                self.error = exc
            if self.progress is not None:
                self.progress.update(1)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _too_large(it: _Item) -> Prediction:
    return Prediction(path=str(it.path), top_class=None, confidence=None, probabilities={}, decision=UNREADABLE,
                      error=f"{it.path}: larger than {MAX_BYTES} bytes")


# ------------------------------------------------------------------------------------------ public API

def sort(
    model: str | Path | Predictor,
    inbox: str | Path,
    out: str | Path,
    *,
    mode: str = "move",
    log_path: str | Path | None = None,
    watch: bool = False,
    poll_interval: float = 1.0,
    settle_seconds: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
    stop_event: threading.Event | None = None,
    runtime: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    metadata_pattern: str | None = None,
) -> dict[str, Any]:
    """Classify the images under ``inbox`` (recursively) and file them into ``out/<decision>/``.

    ``metadata_pattern``: required for a model trained with metadata inputs, a regular expression with one named
    group per input, searched in each file's path relative to the inbox (see the module docstring).

    ``model`` is an exported ``.onnx`` file or a loaded :class:`Predictor` (``runtime``, ``precision`` and
    ``device`` apply to a file: ``auto`` is the fastest runtime that keeps the decisions, see
    :mod:`defectscope.runtime.choice`). ``mode="move"`` empties the
    inbox; ``"copy"`` leaves it as is (the log then keeps re-runs from filing a file twice). ``log_path``
    defaults to ``out/results.db``.

    One-shot (``watch=False``): looks twice, ``settle_seconds`` apart, and files what did not change;
    files still being written are left for the next run. ``watch=True``: runs until SIGINT/SIGTERM (handlers
    are installed only in the main thread) or ``stop_event`` is set, always finishing the file in hand;
    filesystem events (watchdog) wake it early, and it rescans every ``poll_interval`` seconds anyway,
    which is all it does where events are unavailable (network shares).

    Returns a summary: ``processed``, ``per_decision``, ``skipped`` (reason -> count), ``errors`` (path and
    message per failure), ``recovered`` (pending rows settled at start), ``seconds``, ``images_per_second``,
    ``out``, ``log``. Raises ``ValueError`` for a bad mode or inbox, ``RuntimeError`` if another sorter holds
    the output folder.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # Absolute paths in the log: a restart from another working directory must still find the files.
    inbox, out = Path(inbox).absolute(), Path(out).absolute()
    if not inbox.is_dir():
        raise ValueError(f"{inbox}: inbox is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if inbox.resolve() == out.resolve():
        raise ValueError("the inbox and the output folder must differ")
    # A database URL (sqlite:///..., postgresql://...) is kept as given; a bare path is a SQLite file.
    if log_path is None or "://" not in str(log_path):
        log_path = Path(log_path).absolute() if log_path is not None else out / "results.db"
    predictor = model if isinstance(model, Predictor) else Predictor(model, runtime=runtime, precision=precision,
                                                                     device=device)
    pattern = _metadata_pattern(predictor, metadata_pattern)
    stop = stop_event or threading.Event()
    started = time.perf_counter()
    log = _log.info
    with exclusive(out), stop_on_signals(stop, log):
        sorter = _Sorter(predictor, inbox, out, mode, log_path, batch_size, stop, log)
        sorter.metadata_pattern = pattern
        try:
            sorter.recover()
            if watch:
                watch_inbox(sorter, settle_seconds, poll_interval)
            else:
                _one_shot(sorter, settle_seconds, progress)
        finally:
            sorter.close()
    seconds = time.perf_counter() - started
    processed = sum(sorter.counts.values())
    summary = {
        "processed": processed, "per_decision": dict(sorter.counts), "skipped": dict(sorter.skipped),
        "errors": sorter.errors, "recovered": sorter.recovered, "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 2) if seconds > 0 else 0.0,
        "out": str(out), "log": str(log_path),
        "runtime": {"runtime": predictor.runtime, "precision": predictor.precision, "device": predictor.device},
    }
    per = ", ".join(f"{k} {v}" for k, v in sorted(sorter.counts.items())) or "nothing new"
    log(f"sorted {processed} image(s) in {seconds:.1f} s ({summary['images_per_second']}/s): {per}; "
        f"{len(sorter.errors)} error(s)")
    return summary


def _metadata_pattern(predictor: Predictor, pattern: str | None) -> re.Pattern[str] | None:
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


def _one_shot(sorter: _Sorter, settle_seconds: float, progress: bool) -> None:
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


