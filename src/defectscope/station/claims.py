"""Several sorters on one inbox: each file is claimed by one worker with an atomic rename, dead workers' claims
are taken over.

A move-mode sorter is a *worker* with its own claim folder, ``INBOX/.defectscope-claims/<worker>/`` (hidden, so
no sorter scans it as inbox). Before it reads a file it renames it there, keeping its path relative to the inbox
(:meth:`Claims.claim`); ``rename`` within one filesystem is atomic, so of two workers (processes, or machines on
one share) renaming the same file exactly one succeeds and the other gets ``ENOENT`` and moves on. From then on
only the owner touches the file, and the sorter's write-ahead log (:mod:`defectscope.station.sorter`) makes
placing it crash-safe.

A worker is alive while it holds an exclusive ``flock`` on ``<worker>/.alive`` (released by the kernel when the
process dies, even by ``kill -9``) and, for shares whose locks cannot be trusted, while it touches that file at
least every ``lease_seconds`` (a heartbeat thread does, every quarter lease). :meth:`Claims.take_over` renames
a dead worker's whole folder into the taker's own (``<taker>/.taken-<dead>/...``), again one atomic rename, so
exactly one worker inherits each dead worker's files; those are filed like any other claim. A clean stop hands
the files it claimed but did not file back to the inbox (:meth:`Claims.release`) and removes its folder.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

__all__ = ["ALIVE", "CLAIMS_DIR", "TAKEN_PREFIX", "Claims"]

CLAIMS_DIR = ".defectscope-claims"
ALIVE = ".alive"
TAKEN_PREFIX = ".taken-"
AGAIN_PREFIX = ".again-"
# os.link failures that mean "no hard links here": release falls back to a checked rename.
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Claims:
    """This worker's claim folder under ``inbox``: claim, list, take over the dead's, release on a clean stop."""

    def __init__(self, inbox: Path, lease_seconds: float = 60.0, say: Callable[..., Any] = print) -> None:
        self.inbox, self.lease, self.say = inbox, lease_seconds, say
        self.root = inbox / CLAIMS_DIR
        self.worker = _worker_id()
        self.mine = self.root / self.worker
        for _ in range(5):  # another worker may remove an empty root between our mkdirs
            with suppress(FileNotFoundError):
                self.mine.mkdir(parents=True)
                break
        # Locked before it gets its name, so any ALIVE file another worker can open is already held by its owner.
        starting = self.mine / f"{ALIVE}-starting"
        self._alive = os.open(starting, os.O_RDWR | os.O_CREAT, 0o644)
        _lock(self._alive, blocking=True)
        os.rename(starting, self.mine / ALIVE)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="defectscope-claims-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.lease / 4)):
            with suppress(OSError):
                os.utime(self._alive)

    # ---- claiming
    def owns(self, path: Path) -> bool:
        return path.is_relative_to(self.mine)

    def claim(self, path: Path) -> Path | None:
        """Move ``path`` (under the inbox) into this worker's folder; None when another worker took it first."""
        dest = self.mine / path.relative_to(self.inbox)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dest):  # our own earlier claim of that path, still unfiled: only we write here
            dest = self.mine / f"{AGAIN_PREFIX}{secrets.token_hex(4)}" / path.relative_to(self.inbox)
            dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        return dest

    def origin(self, claimed: Path) -> Path:
        """The inbox path a claimed file came from. Hidden folders at the front are ours (taken over, repeated
        claims); no inbox path starts with one, since scans skip hidden folders."""
        parts = claimed.relative_to(self.mine).parts
        while len(parts) > 1 and parts[0].startswith("."):
            parts = parts[1:]
        return self.inbox.joinpath(*parts)

    def files(self) -> dict[Path, tuple[int, int, int]]:
        """Every file this worker holds (its own claims and the folders it took over) -> size, mtime, inode."""
        found: dict[Path, tuple[int, int, int]] = {}
        for root, dirs, names in os.walk(self.mine, followlinks=False):
            dirs.sort()
            for name in sorted(names):
                p = Path(root) / name
                if p.parent == self.mine and name == ALIVE:
                    continue
                with suppress(OSError):
                    st = p.lstat()
                    if stat.S_ISREG(st.st_mode):
                        found[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return found

    # ---- the dead
    def take_over(self) -> list[str]:
        """Inherit the folders of dead workers; returns their ids."""
        taken = []
        with suppress(FileNotFoundError):
            for d in sorted(self.root.iterdir()):
                if d == self.mine or not d.is_dir() or not self._dead(d):
                    continue
                try:
                    os.rename(d, self.mine / f"{TAKEN_PREFIX}{d.name}")
                except OSError:
                    continue  # another worker took it first
                with suppress(OSError):
                    os.unlink(self.mine / f"{TAKEN_PREFIX}{d.name}" / ALIVE)
                taken.append(d.name)
                self.say(f"took over the claims of sorter {d.name} (not running)")
        return taken

    def others_alive(self) -> bool:
        """Whether any other worker on this inbox is running now."""
        with suppress(FileNotFoundError):
            return any(d != self.mine and d.is_dir() and not self._dead(d) for d in self.root.iterdir())
        return False

    def _dead(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / ALIVE, os.O_RDWR)
        except FileNotFoundError:  # died before creating it, or still starting: dead once older than a lease
            with suppress(OSError):
                return time.time() - folder.stat().st_mtime > self.lease
            return False
        except OSError:
            return False
        try:
            if _lock(fd, blocking=False):
                return True  # nobody holds it: its process is gone (closing fd releases our lock)
            # Held, but no heartbeat for a lease: a hung machine, or a share whose locks cannot be trusted.
            return time.time() - os.fstat(fd).st_mtime > self.lease
        finally:
            os.close(fd)

    # ---- stopping
    def release(self, clean: bool) -> None:
        """Stop the heartbeat and drop the lock. On a clean stop, give back what was claimed but not filed (never
        replacing an inbox file) and remove the folder; after a crash, leave everything to be taken over."""
        self._stop.set()
        self._beat.join(timeout=5)
        if clean:
            for path in self.files():
                self._give_back(path)
            _remove_empty(self.mine, keep_alive=False)
        os.close(self._alive)
        with suppress(OSError):
            self.root.rmdir()  # only when no other worker is there

    def unclaim(self, path: Path) -> None:
        """Put one claimed file back where it was found, unless a new file took that name meanwhile."""
        dest = self.origin(path)
        with suppress(OSError):
            if not os.path.lexists(dest):
                os.rename(path, dest)

    def _give_back(self, path: Path) -> None:
        with suppress(OSError):
            if path.lstat().st_nlink > 1:
                return  # a placement's leftover link: the next worker settles it
            dest = self.origin(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest, follow_symlinks=False)  # fails rather than replace a newer file
            except OSError as exc:
                if exc.errno not in _NO_HARDLINK:
                    raise
                if os.path.lexists(dest):
                    return
                os.rename(path, dest)
                return
            os.unlink(path)


def _lock(fd: int, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the heartbeat alone says who is alive
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _remove_empty(folder: Path, keep_alive: bool) -> None:
    """Remove ``folder``'s empty subfolders bottom-up, its ALIVE file, then the folder itself if empty."""
    for root, dirs, _names in os.walk(folder, topdown=False):
        for d in dirs:
            with suppress(OSError):
                (Path(root) / d).rmdir()
    if not keep_alive:
        with suppress(OSError):
            os.unlink(folder / ALIVE)
    with suppress(OSError):
        folder.rmdir()
