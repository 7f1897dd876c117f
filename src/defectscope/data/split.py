"""Stratified train/val/test splits from one seed, optionally by metadata and kept together by group."""

from __future__ import annotations

import numpy as np
import pandas as pd

from defectscope.data.table import DataError

THREE_WAY = ("train", "val", "test")
# A fourth share, "calib", holds images for the decision policy that training and early stopping never see.
FOUR_WAY = ("train", "val", "calib", "test")


def assign_splits(
    table: pd.DataFrame,
    fractions: tuple[float, float, float] | list[float] = (0.70, 0.15, 0.15),
    *,
    seed: int = 0,
    stratify: list[str] | None = None,
    group_column: str | None = None,
) -> pd.DataFrame:
    """Return a copy of the table with every row's ``split`` filled in.

    Three fractions give train/val/test; four give train/val/calib/test.

    Rows that already carry a split keep it (a predefined split is honoured). The rest are split per
    stratum (label plus the ``stratify`` columns) so each split mirrors the class mix; with
    ``group_column`` whole groups are assigned, stratified by each group's most common label.
    """
    table = table.copy()
    if "split" not in table.columns:
        table["split"] = ""
    table["split"] = table["split"].fillna("").astype(str)
    todo = table["split"] == ""
    if not todo.any():
        return table
    for col in (stratify or []) + ([group_column] if group_column else []):
        if col not in table.columns:
            raise DataError(f"cannot split by column {col!r}: the table has {', '.join(table.columns)}")
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, dtype=float)
    if len(fractions) not in (3, 4):
        raise DataError(f"split fractions must be 3 (train, val, test) or 4 (train, val, calib, test): {fractions}")
    names = THREE_WAY if len(fractions) == 3 else FOUR_WAY
    pending = table[todo]
    keys = pending[["label", *(stratify or [])]].astype(str).agg("|".join, axis=1)
    if group_column:
        units = pending.groupby(group_column, sort=True)
        group_key = {g: keys.loc[idx].mode().iloc[0] for g, idx in units.groups.items()}
        strata: dict[str, list] = {}
        for group, key in sorted(group_key.items(), key=lambda kv: str(kv[0])):
            strata.setdefault(key, []).append(group)
        for key in sorted(strata):
            groups = strata[key]
            order = rng.permutation(len(groups))
            sizes = np.array([len(units.groups[groups[i]]) for i in order])
            for i, split in zip(order, _allocate_by_size(sizes, fractions, names), strict=True):
                table.loc[units.groups[groups[i]], "split"] = split
    else:
        for key in sorted(keys.unique()):
            idx = keys.index[keys == key].to_numpy()
            idx = idx[rng.permutation(len(idx))]
            counts = _counts(len(idx), fractions)
            start = 0
            for split, n in zip(names, counts, strict=True):
                table.loc[idx[start:start + n], "split"] = split
                start += n
    return table


def _counts(n: int, fractions: np.ndarray) -> list[int]:
    """Largest-remainder rounding; a stratum too small for all splits fills train first, then test."""
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    # Keep at least one training example of every stratum: a class absent from training can't be learned.
    if n > 0 and counts[0] == 0 and fractions[0] > 0:
        donor = int(np.argmax(counts))
        counts[donor] -= 1
        counts[0] += 1
    return counts.tolist()


def _allocate_by_size(sizes: np.ndarray, fractions: np.ndarray, names: tuple[str, ...]) -> list[str]:
    """Greedy: each group goes to the split furthest below its target share of images."""
    targets = fractions * sizes.sum()
    filled = np.zeros(len(fractions))
    out = []
    for size in sizes:
        deficit = np.where(fractions > 0, (targets - filled) / np.maximum(targets, 1e-9), -np.inf)
        k = int(np.argmax(deficit))
        filled[k] += size
        out.append(names[k])
    return out


def split_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split, for the run log and the terminal."""
    names = FOUR_WAY if (table["split"] == "calib").any() else THREE_WAY
    return pd.crosstab(table["label"], table["split"]).reindex(columns=list(names), fill_value=0)
