r"""``defectscope sort``: file every new image of an inbox into ``OUT/<decision>/`` and log it, crash-safely.

The offline sorter of an inspection line (ONNX Runtime or OpenVINO, numpy and Pillow, never torch). Each image goes to
``OUT/GOOD``, ``OUT/<defect class>``, ``OUT/REVIEW``, ``OUT/Drift`` or, when it cannot be decoded (empty,
truncated, not an image), ``OUT/_unreadable``; one row per image goes to the results store
(:mod:`defectscope.station.store`: SQLite by default, ``OUT/results.db``, or any store URL).

Guarantees, in the order the code keeps them:

* **Nothing is lost or overwritten** (:mod:`defectscope.station.filing`): a name taken becomes ``name (1).png``;
  placement is a hard link then an unlink (or a verified, fsynced copy where links are impossible).
* **Several sorters, one inbox** (move mode, :mod:`defectscope.station.claims`): each file is first claimed by an
  atomic rename into the worker's ``INBOX/.defectscope-claims/<worker>/``; a dead worker's claims are taken over.
  Any number of move-mode sorters (processes, machines on one share, with one PostgreSQL store) run side by side;
  a copy-mode sorter cannot claim and runs alone per output folder (a one-line error otherwise).
* **Write-ahead log.** For each file: hash it; look its row up; write a ``pending`` row holding the intended
  destination; place the file; mark the row ``done``. A batch shares the steps' commits and fsyncs, never their
  order: its pending rows are one transaction committed before any of its files is touched; each file's bytes
  are fsynced, each folder once; a move's source is removed only after its folder's fsync; the outcomes are
  one transaction after that. Pending rows are settled at start and after a takeover:
  destination present with the right hash -> ``done``; otherwise (no other worker alive) ``error``, and the file
  is filed again, the row reused. A worker killed at any instant thus files every input exactly once.
* **One image per content and name** (``content_sha256``, ``file_name``): a copy-mode re-run skips it; in move
  mode a re-delivered copy (or a twin in another folder) whose filed copy is still in place is removed from the
  inbox with a row of its own saying so (``request_id`` ``duplicate:...``), else filed again. Identical bytes
  under different names are different images.
* **Only finished files are taken** (size and mtime unchanged for ``settle_seconds``, :class:`Settler`); hidden
  files (``.name``) never.
* **Hostile inbox**: symlinks and files with more than one hard link (a link to a file outside the inbox) are
  refused with a logged reason and left in place; other non-regular files are left alone; every destination
  must resolve inside ``OUT``.
* **One bad file never stops the run**: an ``OSError`` marks its row ``error``; the next pass retries it.

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
import re
import sqlite3
import stat
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from defectscope.runtime.predictor import Prediction, Predictor, WithMetadata
from defectscope.station.claims import TAKEN_PREFIX, Claims

# place_file is looked up in this module's namespace at each call: tests replace ``sorter.place_file`` to
# simulate a full disk or a crash mid-placement.
from defectscope.station.filing import (
    DirSync,
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
from defectscope.station.sort_steps import Filer, Item, linked_message, same_inode, too_large
from defectscope.station.sort_steps import metadata_pattern as compile_pattern
from defectscope.station.store import Store, export_log, sqlite_path
from defectscope.station.watch import exclusive, one_shot, stop_on_signals, watch_inbox

__all__ = ["MODES", "SortError", "export_log", "place_file", "safe_folder_name", "sort"]

_log = logging.getLogger(__name__)

MODES = ("move", "copy")
RETRY_SECONDS = 60.0  # watch mode: a file that failed is tried again after this long (or once it changes)
LEASE_SECONDS = 60.0  # a worker whose claim folder's heartbeat is older than this is taken for dead
_NAME_TRIES = 50


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
        self.claims: Claims | None = None  # move mode: this worker's claim folder (set by sort())

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
        """Settle the ``pending`` rows an interrupted run left (see the module docstring).

        With other workers running, a pending row may be theirs, in hand: only rows whose file is already in
        place are settled (marking them done is what their owner does next anyway); the rest are settled when
        their claimed file, taken over from its dead worker, is filed again.
        """
        alone = self.claims is None or not self.claims.others_alive()
        for row in self.db.rows("pending"):
            dest, src, sha = Path(row["destination"]), Path(row["source_path"]), row["content_sha256"]
            if alone:
                with suppress(FileNotFoundError, SortError):
                    check_inside(dest, self.out_real)
                    part_path(dest, row["id"]).unlink()
            if sha256_file(dest) == sha:
                if self.claims is None and self.mode == "move" and sha256_file(src) == sha:
                    with suppress(OSError):
                        os.unlink(src)  # the interrupted move got as far as the link: finish it
                self.db.mark_done(row["id"])
                self.say(f"recovered {row['file_name']}: already filed as {dest}")
            elif alone:
                self.db.mark_error(row["id"], "interrupted before the file was placed; filed again when seen")
                self.say(f"recovered {row['file_name']}: not placed yet, will be filed again")
            else:
                continue
            self.recovered += 1

    # ---- scanning
    def scan(self) -> dict[Path, tuple[int, int, int]]:
        """Regular, non-hidden files under the inbox (symlinks and files with other hard links reported and
        skipped) and the files this worker holds in its claim folder -> size, mtime, inode.

        In move mode it first takes over the claims of dead workers (and settles their log rows).
        """
        found: dict[Path, tuple[int, int, int]] = {}
        if self.claims is not None and self.claims.take_over():
            self.recover()
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
                elif st.st_nlink > 1:
                    self._skip(p, "hard_link", linked_message(st.st_nlink))
                elif self._wanted(p, sig := (st.st_size, st.st_mtime_ns, st.st_ino)):
                    found[p] = sig
        if self.claims is not None:
            found.update((p, sig) for p, sig in self.claims.files().items() if self._wanted(p, sig))
        return found

    def _wanted(self, p: Path, sig: tuple[int, int, int]) -> bool:
        if self.known.get(p) == sig:
            return False
        failed = self.failed.get(p)
        return not (failed and failed[0] == sig and time.monotonic() - failed[1] < RETRY_SECONDS)

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

        Three stages overlap so the runtime is never idle: this thread reads and hashes the files (their rows
        looked up a batch at a time) and feeds them to the predictor (which decodes the next batch in its pool
        while the runtime runs this one, batches spanning files of any folder), and a filing thread places
        each batch of classified files and writes its log rows (:meth:`_file_batch`) while the next batch is
        inferred. Files are filed in the order they were read.
        """
        waiting: deque[Item] = deque()  # read and sent to the predictor, in order

        def sources() -> Iterator[bytes]:
            for start in range(0, len(paths), self.batch_size):
                if self.stop.is_set() or filer.failed:
                    return
                for it in self._take_batch(paths[start:start + self.batch_size], sigs, progress):
                    waiting.append(it)
                    if it.data is not None:
                        yield WithMetadata(it.data, self.metadata_of(it.origin)) if self.metadata_pattern else it.data

        filer = Filer(self, sigs, progress)
        try:
            for pred in self.predictor.iter_predict(sources(), self.batch_size):
                while waiting[0].data is None:  # too large to decode: filed as unreadable in its turn
                    it = waiting.popleft()
                    filer.put(it, too_large(it))
                filer.put(waiting.popleft(), pred)
                if self.stop.is_set() or filer.failed:
                    break
            while waiting and not self.stop.is_set() and not filer.failed:
                it = waiting.popleft()
                filer.put(it, too_large(it))
        finally:
            filer.close()  # waits for the files in hand; re-raises what stopped the filing thread

    def _take_batch(self, paths: list[Path], sigs: dict[Path, tuple[int, int, int]], progress: Any) -> list[Item]:
        """Claim and read ``paths``; the files that need filing (their log rows looked up in one query)."""
        items = []
        for path in paths:
            it = self._take(path, sigs)
            if it is not None:
                items.append(it)
            elif progress is not None:
                progress.update(1)
        rows = self.reader.find_many([(it.sha256, it.name) for it in items]) if items else {}
        wanted = []
        for it in items:
            if self._already_done(it, sigs[it.path], row=rows.get((it.sha256, it.name)), looked_up=True) \
                    or self._refused(it):
                if progress is not None:
                    progress.update(1)
            else:
                wanted.append(it)
        return wanted

    def _take(self, path: Path, sigs: dict[Path, tuple[int, int, int]]) -> Item | None:
        """Claim ``path`` (move mode; None when another worker took it) and read it."""
        if self.claims is None or self.claims.owns(path):
            return self._load(path, sigs[path], self.claims.origin(path) if self.claims else path)
        try:
            claimed = self.claims.claim(path)
        except OSError as exc:
            self._report_error(path, f"cannot claim (move into {self.claims.mine}): {exc}", sigs[path])
            return None
        if claimed is None:
            self.skipped["claimed_by_another_sorter"] += 1
            return None
        sigs[claimed] = sigs[path]
        return self._load(claimed, sigs[claimed], path)

    def _refused(self, it: Item) -> bool:
        """A file with another hard link (perhaps to a file outside the inbox) is never filed."""
        with suppress(OSError):
            links = os.lstat(it.path).st_nlink
            if links > 1:
                self._skip(it.origin, "hard_link", linked_message(links))
                if self.claims is not None:
                    self.claims.unclaim(it.path)
                return True
        return False

    def _load(self, path: Path, sig: tuple[int, int, int], origin: Path) -> Item | None:
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
        return Item(path, origin, printable(path.name), size, sha, data)

    def _already_done(self, it: Item, sig: tuple[int, int, int], db: Store | None = None,
                      row: dict[str, Any] | None = None, looked_up: bool = False) -> bool:
        """Whether this file needs no filing now: logged and filed already (a duplicate, recorded and removed;
        or the leftover link of a move interrupted after its link), or a twin another worker has in hand.
        ``looked_up``: ``row`` is the result of a look-up already made (None: no row)."""
        db = db or self.reader
        row = row if row is not None or looked_up else db.find(it.sha256, it.name)
        if row is None:
            return False
        if self.mode == "copy":
            if row["status"] != "done":
                return False
            self.known[it.path] = sig
            self.skipped["already_done"] += 1
            return True
        dest = Path(row["destination"])
        if sha256_file(dest) != it.sha256:
            # Its filed copy is gone, or it was never placed: file this one (the row is reused), unless the row
            # is in the hands of a live worker filing a twin (same name and bytes): then look again next pass.
            return row["status"] == "pending" and self._busy(it)
        if same_inode(it.path, dest):  # the move was interrupted after the link: finish it
            with suppress(FileNotFoundError):
                os.unlink(it.path)
            if row["status"] != "done":
                db.mark_done(row["id"])
            self.say(f"{it.origin}: already filed as {dest}; finished its interrupted move")
            return True
        if row["status"] == "pending" and self._busy(it):
            return True
        self._duplicate(it, row, db, sig)
        return True

    def _busy(self, it: Item) -> bool:
        taken = any(part.startswith(TAKEN_PREFIX) for part in it.path.parts)
        if self.claims is None or taken or not self.claims.others_alive():
            return False
        self.skipped["busy"] += 1
        return True

    def _duplicate(self, it: Item, row: dict[str, Any], db: Store, sig: tuple[int, int, int]) -> None:
        """Same name, same bytes as an image already filed and still in place: one image, filed once. The copy is
        removed from the inbox, and its own row says so (never a silent deletion)."""
        dest = row["destination"]
        record = {k: row.get(k) for k in ("decision", "verdict", "top_class", "confidence", "probabilities",
                                          "drift_score", "model_id", "model_version", "destination", "reason")}
        record.update(file_name=it.name, source_path=printable(str(it.origin)), content_sha256=it.sha256,
                      size_bytes=it.size, needs_review=False, request_id=f"duplicate:{uuid.uuid4().hex[:12]}",
                      error=f"a duplicate of row {row['id']} (same name and bytes, filed as {dest}): this copy "
                            "was removed from the inbox, not filed twice")
        try:
            row_id = db.begin(record)
            os.unlink(it.path)
        except (OSError, sqlite3.Error) as exc:
            if "row_id" in locals():
                db.mark_error(row_id, f"cannot remove the duplicate: {exc}")
            self._report_error(it.origin, f"already filed as {dest}; cannot log or remove this copy: {exc}", sig)
            return
        db.mark_done(row_id)
        self.skipped["duplicate_removed"] += 1
        self.say(f"{it.origin}: already filed as {dest}; removed the inbox copy (row {row_id} says so)")

    def _record(self, it: Item, pred: Prediction) -> dict[str, Any]:
        """The log row of a classified file, but its destination."""
        return {
            "file_name": it.name, "source_path": printable(str(it.origin)), "content_sha256": it.sha256,
            "size_bytes": it.size, "decision": pred.decision, "verdict": pred.verdict, "top_class": pred.top_class,
            "confidence": pred.confidence, "probabilities": pred.probabilities or None,
            "drift_score": pred.drift_score, "model_id": self.model_id, "model_version": self.model_version,
            "reason": pred.reason or None,
            # The image was decoded from its bytes, so the decoder's message names "<bytes>": name the file.
            "error": pred.error and pred.error.replace("<bytes>", it.name, 1),
        }

    def _file_batch(self, jobs: list[tuple[Item, Prediction]], sigs: dict[Path, tuple[int, int, int]]) -> None:
        """File classified files as :meth:`_file` does each, with the write-ahead log kept batch-wide: every
        ``pending`` row is committed (one transaction) before any file is touched, each file placed and its
        bytes fsynced, each folder fsynced once, the moves' sources removed only then, and the outcomes
        committed (one transaction). A crash anywhere leaves pending rows that :meth:`recover` settles.

        What cannot share the batch is filed image by image after it: a second file with the same name and
        bytes (it must see the first one's row), a name another worker took meanwhile, and the whole batch
        when its pending rows cannot be written (a twin's row written by another worker, a full disk).
        """
        rows = self.db.find_many([(it.sha256, it.name) for it, _ in jobs])
        plan: list[tuple[Item, Prediction, dict[str, Any], int | None]] = []
        after, seen, reserved = [], set(), set()
        for it, pred in jobs:
            key = (it.sha256, it.name)
            if key in seen:
                after.append((it, pred))
                continue
            seen.add(key)
            row = rows.get(key)
            if row is not None and self._already_done(it, sigs[it.path], self.db, row):
                continue
            folder = self.out / safe_folder_name(pred.decision)
            dest = unique_path(folder, safe_file_name(it.path.name), reserved)
            reserved.add(dest)
            plan.append((it, pred, {**self._record(it, pred), "destination": str(dest)},
                         None if row is None else row["id"]))
        if plan:
            try:
                ids = self.db.begin_many([(record, row_id) for _, _, record, row_id in plan])
            except sqlite3.Error:
                after = [(it, pred) for it, pred, _, _ in plan] + after  # _file reports or skips each
            else:
                after += self._place_batch(plan, ids, sigs)
        for it, pred in after:
            self._file(it, pred, sigs[it.path])

    def _place_batch(self, plan: list[tuple[Item, Prediction, dict[str, Any], int | None]], ids: list[int],
                     sigs: dict[Path, tuple[int, int, int]]) -> list[tuple[Item, Prediction]]:
        """Place the files of a batch whose pending rows are written; the files to file again one by one."""
        later, placed, errors, again = DirSync(), [], {}, []
        for (it, pred, record, _), row_id in zip(plan, ids, strict=True):
            dest = Path(record["destination"])
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                check_inside(dest, self.out_real)
                place_file(it.path, dest, self.mode, it.sha256, part_path(dest, row_id), later)
            except FileExistsError:
                again.append((it, pred))  # another worker took the name: its row (still pending) is reused
            except (OSError, SortError) as exc:
                errors[row_id] = f"{type(exc).__name__}: {exc}"
                self._report_error(it.origin, errors[row_id], sigs[it.path])
            else:
                placed.append((it, pred, row_id))
        kept = later.finish()  # folders fsynced, then the moves' sources removed
        for it, _, row_id in placed:
            if it.path in kept:
                errors[row_id] = f"{type(kept[it.path]).__name__}: {kept[it.path]}"
                self._report_error(it.origin, errors[row_id], sigs[it.path])
        self.db.settle_many([row_id for _, _, row_id in placed if row_id not in errors], errors)
        for it, pred, row_id in placed:
            if row_id not in errors:
                self._filed(it, pred, sigs[it.path])
        return again

    def _file(self, it: Item, pred: Prediction, sig: tuple[int, int, int]) -> None:
        """File one classified file: its pending row, the file placed, the row done (each step committed)."""
        row = self.db.find(it.sha256, it.name)
        if row is not None and self._already_done(it, sig, self.db, row):
            return  # e.g. a twin (same name and bytes) in another inbox folder was filed earlier in this batch
        folder = self.out / safe_folder_name(pred.decision)
        record = self._record(it, pred)
        row_id = None if row is None else row["id"]
        for _ in range(_NAME_TRIES):  # another worker may take the free name between looking and linking
            dest = unique_path(folder, safe_file_name(it.path.name))
            try:
                row_id = self.db.begin({**record, "destination": str(dest)}, row_id)
            except sqlite3.Error as exc:  # the log itself failing (disk full): leave the file untouched, go on
                if row_id is None and self.db.find(it.sha256, it.name) is not None:
                    self.skipped["busy"] += 1  # a twin's row, written by another worker meanwhile: next pass
                    return
                self._report_error(it.origin, f"cannot write the log: {exc}", sig)
                return
            try:
                folder.mkdir(parents=True, exist_ok=True)
                check_inside(dest, self.out_real)
                place_file(it.path, dest, self.mode, it.sha256, part_path(dest, row_id))
                break
            except FileExistsError:
                continue
            except (OSError, SortError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                self.db.mark_error(row_id, message)
                self._report_error(it.origin, message, sig)
                return
        else:
            self.db.mark_error(row_id, f"no free name in {folder} after {_NAME_TRIES} tries")
            self._report_error(it.origin, f"no free name in {folder}", sig)
            return
        self.db.mark_done(row_id)
        self._filed(it, pred, sig)

    def _filed(self, it: Item, pred: Prediction, sig: tuple[int, int, int]) -> None:
        self.failed.pop(it.path, None)
        if self.mode == "copy":
            self.known[it.path] = sig
        self.counts[pred.decision] += 1

    def close(self) -> None:
        self.db.close()
        self.reader.close()


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
    lease_seconds: float = LEASE_SECONDS,
    choice_seconds: float | None = None,
) -> dict[str, Any]:
    """Classify the images under ``inbox`` (recursively) and file them into ``out/<decision>/``.

    ``metadata_pattern``: required for a model trained with metadata inputs, a regular expression with one named
    group per input, searched in each file's path relative to the inbox (see the module docstring).

    ``model`` is an exported ``.onnx`` file or a loaded :class:`Predictor` (``runtime``, ``precision`` and
    ``device`` apply to a file: ``auto`` is the fastest runtime that keeps the decisions, see
    :mod:`defectscope.runtime.choice`; ``choice_seconds`` bounds that choice on a machine's first start).
    ``mode="move"`` empties the inbox; ``"copy"`` leaves it as is (the log then keeps re-runs from filing a
    file twice). ``log_path`` defaults to ``out/results.db``.

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
                                                                     device=device, choice_seconds=choice_seconds)
    pattern = compile_pattern(predictor, metadata_pattern)
    stop = stop_event or threading.Event()
    started = time.perf_counter()
    log = _log.info
    with exclusive(out, shared=mode == "move"), stop_on_signals(stop, log):
        sorter = _Sorter(predictor, inbox, out, mode, log_path, batch_size, stop, log)
        sorter.metadata_pattern = pattern
        clean = False
        try:
            if mode == "move":
                sorter.claims = Claims(inbox, lease_seconds, log)
                sorter.claims.take_over()
            sorter.recover()
            if watch:
                watch_inbox(sorter, settle_seconds, poll_interval)
            else:
                one_shot(sorter, settle_seconds, progress)
            clean = True
        finally:
            if sorter.claims is not None:
                sorter.claims.release(clean)  # after a crash, the claims stay for the next worker to take over
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
