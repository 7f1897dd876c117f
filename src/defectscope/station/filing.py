"""Crash-safe filing of one file: never overwrite, never delete a user's image before its copy is durable.

The sorter's disk primitives (:mod:`defectscope.station.sorter` adds the write-ahead log around them):

* A name already taken in the class folder becomes ``name (1).png`` (:func:`unique_path`).
* :func:`place_file` puts a file with a hard link, which fails rather than replace an existing file, and unlinks
  the source only after that. Where hard links are impossible (another filesystem, some network shares) the
  file is copied to a temporary name, fsynced, verified (size and SHA-256) and only then given its name and
  the source deleted. ``mode="copy"`` never touches the source.
* Files are opened without following symlinks; every destination must resolve inside the output folder
  (:func:`check_inside`); decisions and file names become safe single path components.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from contextlib import suppress
from pathlib import Path

from defectscope.errors import DefectscopeError

__all__ = ["MAX_BYTES", "DirSync", "SortError", "check_inside", "part_path", "place_file", "printable", "read_regular",
           "safe_file_name", "safe_folder_name", "sha256_file", "unique_path"]

MAX_BYTES = 1 << 30  # larger files are hashed in chunks and filed as unreadable, never read into memory
# os.link failures that mean "no hard links here" (not "no permission" or "disk full"): copy instead.
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_BAD_NAME_CHARS = set('/\\:*?"<>|\0') | {chr(c) for c in range(32)}


class SortError(DefectscopeError):
    """A file the sorter refuses to place (a destination outside OUT, a source that changed)."""


# ----------------------------------------------------------------------------------------------- names

def printable(text: str) -> str:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) made storable in SQLite."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def safe_folder_name(decision: str) -> str:
    """A decision as one folder name: no separators, no ``..``, no control or Windows-reserved characters."""
    name = "".join("_" if ch in _BAD_NAME_CHARS else ch for ch in decision).strip().rstrip(".")
    name = "_" + name.lstrip(".") if name.startswith(".") else name
    return name or "_"


def safe_file_name(name: str) -> str:
    """A file name kept as one storable path component (``.`` and ``..`` become ``_``)."""
    name = "".join("_" if ch in _BAD_NAME_CHARS else ch for ch in printable(name))
    return "_" if name in ("", ".", "..") else name


def unique_path(folder: Path, name: str, taken: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """``folder/name``, or ``folder/name (1).ext``, ``(2)``... whichever does not exist yet (nor is in ``taken``,
    the names a batch has given out but not placed yet)."""
    candidate = folder / name
    stem, suffix = (name[: -len(Path(name).suffix)], Path(name).suffix) if Path(name).suffix else (name, "")
    i = 0
    while candidate in taken or os.path.lexists(candidate):
        i += 1
        candidate = folder / f"{stem} ({i}){suffix}"
    return candidate


def check_inside(path: Path, root: Path) -> None:
    """Raise :class:`SortError` unless ``path`` resolves inside ``root`` (itself already resolved)."""
    # resolve() follows any symlink planted in OUT (e.g. OUT/GOOD -> /etc), so this catches those too.
    if not path.resolve().is_relative_to(root):
        raise SortError(f"destination {path} resolves outside the output folder {root}")


# ------------------------------------------------------------------------------------------ file ops

def sha256_file(path: Path) -> str | None:
    """Hash of a regular file (symlinks not followed), or None when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()


def read_regular(path: Path) -> tuple[bytes | None, str, int]:
    """(content or None if too large, sha256, size) of a regular file, opened without following symlinks.

    O_NONBLOCK keeps a FIFO planted in the inbox from hanging the sorter on open.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with os.fdopen(os.open(path, flags), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SortError("not a regular file")
        if st.st_size <= MAX_BYTES:
            data = f.read()
            return data, hashlib.sha256(data).hexdigest(), len(data)
        h, size = hashlib.sha256(), 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
        return None, h.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    # Makes a new name durable across a power cut; not possible on every platform, hence best effort.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def part_path(dest: Path, row_id: int) -> Path:
    """The temporary name a copy is written under; derived from the row so recovery can find it."""
    return dest.parent / f".defectscope-{row_id}.part"


class DirSync:
    """The last two steps of several :func:`place_file` calls, done once for all of them: fsync each folder
    that got a new name (once per folder, not once per file), then - only then - remove the sources of moves.

    The order is the guarantee: no source is unlinked before its new name is durable, so a power cut in
    between leaves the image in both places (recovery finishes the move), never in none.
    """

    def __init__(self) -> None:
        self.folders: set[Path] = set()
        self.sources: list[Path] = []

    def finish(self) -> dict[Path, OSError]:
        """fsync the folders, unlink the sources; the sources that could not be removed -> why."""
        for folder in sorted(self.folders):
            _fsync_dir(folder)
        failed: dict[Path, OSError] = {}
        for src in self.sources:
            try:
                os.unlink(src)
            except OSError as exc:
                failed[src] = exc
        self.folders.clear()
        self.sources.clear()
        return failed


def place_file(src: Path, dest: Path, mode: str, sha256: str, part: Path, later: DirSync | None = None) -> None:
    """Put ``src`` at ``dest`` (which must not exist) and, in move mode, remove ``src``. Never overwrites.

    Same filesystem: a hard link then unlink, atomic per step and refusing an existing ``dest`` (plain
    ``os.rename`` would silently replace it). Otherwise, or in copy mode: copy to ``part``, fsync, verify
    size and SHA-256 against ``sha256``, link to ``dest``, and only then delete the source. Raises OSError
    (disk full, permission) or SortError (the source changed since it was hashed).

    ``later``: the folder's fsync and the source's removal are left to ``later.finish()`` (a batch of files
    shares them); the file's own bytes are still fsynced here.
    """
    if mode == "move":
        try:
            os.link(src, dest, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_HARDLINK:
                raise
        else:
            _finish(src, dest, mode, later)
            return
    with suppress(FileNotFoundError):
        part.unlink()  # a leftover of an interrupted copy of this same row
    try:
        with open(src, "rb") as fin, open(part, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        if sha256_file(part) != sha256:
            raise SortError(f"{src} changed while it was copied; left in place")
        _link_no_clobber(part, dest)
    finally:
        with suppress(FileNotFoundError):
            part.unlink()
    _finish(src, dest, mode, later)


def _finish(src: Path, dest: Path, mode: str, later: DirSync | None) -> None:
    if later is not None:
        later.folders.add(dest.parent)
        if mode == "move":
            later.sources.append(src)
        return
    _fsync_dir(dest.parent)
    if mode == "move":
        os.unlink(src)


def _link_no_clobber(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK:
            raise
        if os.path.lexists(dest):  # no hard links (FAT, some shares): check, then rename - a narrow window only
            raise FileExistsError(errno.EEXIST, "destination exists", str(dest)) from exc
        os.replace(src, dest)

