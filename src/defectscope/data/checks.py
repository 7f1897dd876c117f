"""Cheap data checks that need no model: class counts per split, exact duplicates, duplicates across splits.

``train`` runs :func:`cheap_checks` and logs what it finds; ``defectscope audit`` (:mod:`defectscope.audit`)
reports the same and more. Nothing here changes a file.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from defectscope.errors import DefectscopeError

MIN_PER_CLASS_SPLIT = 5  # fewer images than this in a class and split gives a metric with no meaning


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, or ``""`` when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def hash_files(paths: Iterable[str], threads: int | None = None) -> list[str]:
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per label (rows) and split (columns, plus ``total``)."""
    split = table["split"].replace("", "(none)") if "split" in table else pd.Series("(none)", index=table.index)
    counts = pd.crosstab(table["label"], split)
    counts["total"] = counts.sum(axis=1)
    return counts


class ClassError(DefectscopeError, ValueError):
    """A set of labels no classifier should be trained on: one class, or a class too small to learn or measure."""


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 image``, ``2 images``: a count with its noun agreeing."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def check_classes(table: pd.DataFrame, min_images: int = MIN_PER_CLASS_SPLIT, *, where: str = "",
                  flag: str = "--min-class-images") -> None:
    """Refuse a table with a single class, or with a class of fewer than ``min_images`` images.

    A tiny class is most often a mistyped label (``GOD`` beside ``GOOD``): the message names its rows (the
    table's ``source``: file and line, or folder) and the existing classes it is close to, and says how to
    accept it anyway (``flag`` 1). ``where``: the data source, for the message.
    """
    prefix = f"{where}: " if where else ""
    counts = table["label"].value_counts()
    if len(counts) < 2:
        only = counts.index[0] if len(counts) else "(none)"
        raise ClassError(f"{prefix}only one class ({only!r}, {plural(int(counts.sum()), 'image')}); a classifier "
                         "needs at least two: add images of the other classes (one folder or label per class)")
    small = [(name, int(n)) for name, n in counts.items() if n < min_images]
    if not small:
        return
    lines = []
    for name, n in sorted(small, key=lambda item: item[1]):
        rows = table.loc[table["label"] == name, "source"].astype(str).tolist()
        shown = ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        others = [str(c) for c in counts.index if c != name and counts[c] >= min_images]
        close = _close_matches(str(name), others)
        hint = f" - a typo of {' or '.join(repr(c) for c in close)}?" if close else ""
        lines.append(f"class {name!r} has {plural(n, 'image')} ({shown}){hint}")
    raise ClassError(f"{prefix}{'; '.join(lines)}: fewer than {min_images} images of a class cannot be learned "
                     f"or measured. Fix the label, add images, or pass {flag} 1 to train on it as it is")


def _close_matches(name: str, candidates: list[str]) -> list[str]:
    lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lower), n=2, cutoff=0.6)
    return [lower[f] for f in found]


def duplicate_groups(table: pd.DataFrame, keys: list[str]) -> list[list[int]]:
    """Row positions sharing a key (e.g. a file hash), groups of two or more; empty keys never match."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key:
            groups.setdefault(key, []).append(i)
    return [rows for rows in groups.values() if len(rows) > 1]


def cross_split(table: pd.DataFrame, groups: list[list[int]]) -> list[list[int]]:
    """The groups whose rows sit in more than one split: the same image in train and test is leakage."""
    if "split" not in table:
        return []
    split = table["split"].to_numpy()
    return [g for g in groups if len({split[i] for i in g if split[i]}) > 1]


def cheap_checks(table: pd.DataFrame, hashes: list[str] | None = None) -> list[str]:
    """Warnings worth a look before training: tiny classes per split, exact duplicates, leakage."""
    warnings: list[str] = []
    counts = class_counts(table)
    for split in [c for c in counts.columns if c != "total"]:
        small = counts.index[(counts[split] > 0) & (counts[split] < MIN_PER_CLASS_SPLIT)].tolist()
        missing = counts.index[counts[split] == 0].tolist()
        if small:
            warnings.append(f"split {split!r}: fewer than {MIN_PER_CLASS_SPLIT} images of {', '.join(small)}")
        if missing and split != "(none)":
            warnings.append(f"split {split!r}: no images of {', '.join(missing)}")
    hashes = hash_files(table["path"]) if hashes is None else hashes
    groups = duplicate_groups(table, hashes)
    if groups:
        paths = table["path"].to_numpy()
        example = ", ".join(os.path.basename(paths[i]) for i in groups[0][:3])
        extra = sum(len(g) - 1 for g in groups)
        warnings.append(f"{extra} exact duplicate file(s) in {len(groups)} group(s), e.g. {example}")
        labels = table["label"].to_numpy()
        conflicting = [g for g in groups if len({labels[i] for i in g}) > 1]
        if conflicting:
            g = conflicting[0]
            warnings.append(f"{len(conflicting)} duplicate group(s) carry different labels, e.g. "
                            + ", ".join(f"{os.path.basename(paths[i])}={labels[i]}" for i in g[:3]))
        leaks = cross_split(table, groups)
        if leaks:
            g = leaks[0]
            warnings.append(f"{len(leaks)} duplicate group(s) span splits (leakage), e.g. "
                            + ", ".join(f"{os.path.basename(paths[i])} in {table['split'].iloc[i]}" for i in g[:3]))
    return warnings
