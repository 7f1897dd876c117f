"""Cheap data checks that need no model: class counts per split, exact duplicates, duplicates across splits.

``train`` runs :func:`cheap_checks` and logs what it finds; ``defectscope audit`` (:mod:`defectscope.audit`)
reports the same and more. Nothing here changes a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

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
