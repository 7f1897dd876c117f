"""Listing the image files of a folder, with one rule for every command that takes a folder."""

from __future__ import annotations

from pathlib import Path

from defectscope.data.images import IMAGE_EXTENSIONS


def is_hidden(path: Path, root: Path) -> bool:
    """A file or any folder between ``root`` and it whose name starts with a dot (an uploader's temporary
    file, ``.git``, a sorter's ``.part`` file) is hidden."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (path.name,)
    return any(part.startswith(".") for part in parts)


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (by extension, case-insensitive), sorted by path.

    Hidden files and files inside hidden folders are left out; symlinks to files are listed (the decoder
    reads what they point to) but symlinked folders are not descended into, so a link loop cannot hang a
    listing. A missing folder raises ``FileNotFoundError``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in candidates
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not is_hidden(p, root))
