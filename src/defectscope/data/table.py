"""The one dataset table: every reader turns its layout into it, everything downstream consumes it.

Columns: ``path`` (absolute), ``label``, ``split`` (train/val/test or empty), ``source`` (where the row came
from, e.g. ``labels.csv:17``), then any metadata columns the source had. The table is saved in each run.
"""

from __future__ import annotations

import csv
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from defectscope.data import wm811k
from defectscope.data.files import list_images
from defectscope.data.images import IMAGE_EXTENSIONS
from defectscope.data.wafer import WAFER_EXTENSIONS, WaferMapError
from defectscope.errors import DefectscopeError

log = logging.getLogger(__name__)

CORE_COLUMNS = ["path", "label", "split", "source"]
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
    "calib": "calib", "calibration": "calib",
}
_PATH_CANDIDATES = ("filename", "file", "path", "image", "image_path", "filepath", "file_name", "img")
_LABEL_CANDIDATES = ("label", "class", "target", "category", "defect", "type_label")

# ELPV defect probabilities 0, 1/3, 2/3, 1 as names an engineer reads without the paper at hand.
ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]


class DataError(DefectscopeError, ValueError):
    """A dataset that cannot be read as given; the message names the file and row."""


@dataclass
class BadFile:
    path: str
    source: str
    reason: str


def load_table(
    source: str | Path,
    *,
    image_root: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    classes: list[str] | None = None,
    skip_bad: bool = False,
    trust_pickle: bool = False,
    cache_dir: str | Path | None = None,
    label_conflicts: str = "refuse",
) -> tuple[pd.DataFrame, list[BadFile]]:
    """Read a class-per-folder tree, a CSV manifest, WM-811K's ``LSWMD.pkl`` or a named dataset into the table.

    Folders and manifests may name wafer maps (``.npy``/``.npz`` die grids, G85 ``.xml``, KLARF) as well as images.
    ``LSWMD.pkl`` is read only with ``trust_pickle`` (unpickling runs code) and converted once into
    ``cache_dir`` (see :mod:`defectscope.data.wm811k`); its unlabelled maps stay out of the table, in the
    conversion's ``unlabelled.csv``.

    One file given two labels is refused unless ``label_conflicts`` says which row wins (``"first"`` or
    ``"last"``) or ``"drop"`` leaves such files out (see :func:`resolve_label_conflicts`).

    Returns the table and the rows that were skipped (only with ``skip_bad``; otherwise the first
    problem raises :class:`DataError`). Files are checked to exist here; decoding is checked when
    the images are cached.

    >>> table, skipped = load_table("elpv")  # doctest: +SKIP
    """
    text = str(source)
    if text.lower() == "elpv":
        table = read_elpv()
    else:
        path = Path(source).expanduser()
        early_bad: list[BadFile] = []
        if path.is_dir():
            table = read_folder(path)
        elif path.is_file() and path.suffix.lower() in {".pkl", ".pickle"}:
            table, early_bad = read_wm811k(path, trust_pickle=trust_pickle, cache_dir=cache_dir,
                                           split_column=split_column, skip_bad=skip_bad)
        elif path.is_file() and path.suffix.lower() in {".csv", ".tsv", ".txt"}:
            table = read_manifest(
                path,
                image_root=image_root,
                path_column=path_column,
                label_column=label_column,
                split_column=split_column,
            )
        elif path.exists():
            raise DataError(f"{path}: expected a folder of class folders, a .csv manifest, LSWMD.pkl or 'elpv'")
        else:
            raise DataError(f"data source not found: {path} (give a folder, a .csv manifest or 'elpv')")
        table, bad = check_table(resolve_label_conflicts(table, label_conflicts), classes=classes,
                                 skip_bad=skip_bad)
        return table, early_bad + bad
    return check_table(resolve_label_conflicts(table, label_conflicts), classes=classes, skip_bad=skip_bad)


LABEL_CONFLICTS = ("refuse", "first", "last", "drop")


def resolve_label_conflicts(table: pd.DataFrame, wins: str = "refuse") -> pd.DataFrame:
    """Refuse (``wins="refuse"``) or settle one file listed with two different labels: a model trained on
    both learns neither. ``"first"`` / ``"last"`` keep the row that comes first / last in the source, ``"drop"``
    leaves every row of such a file out. Repeated rows with the same label are left as they are. The CLI's
    ``--label-conflicts`` and the config key ``data.label_conflicts`` pass ``wins``."""
    wins = "refuse" if wins == "error" else wins  # "error": this function's first name for "refuse"
    if wins not in LABEL_CONFLICTS:
        raise DataError(f"label_conflicts must be one of {', '.join(LABEL_CONFLICTS)}, got {wins!r}")
    if table.empty or "path" not in table or "label" not in table:
        return table
    labels_per_path = table.groupby("path", sort=False)["label"].nunique()
    clashing = labels_per_path[labels_per_path > 1].index
    if len(clashing) == 0:
        return table
    if wins == "refuse":
        example = table[table["path"] == clashing[0]]
        raise DataError(f"{len(clashing)} file(s) listed with two or more labels, e.g. {clashing[0]} as "
                        f"{' and '.join(map(repr, example['label'].unique()))} ({', '.join(example['source'])}): "
                        "fix the manifest, or say which row wins with --label-conflicts first|last, or leave "
                        "such files out with --label-conflicts drop (config key data.label_conflicts)")
    if wins == "drop":
        keep = ~table["path"].isin(clashing)
        log.warning("%d file(s) listed with two labels: left out (label_conflicts=drop)", len(clashing))
    else:
        keep = ~table["path"].isin(clashing) | ~table.duplicated("path", keep=wins)
        log.warning("%d file(s) listed with two labels: the %s row of each kept", len(clashing), wins)
    return table[keep].reset_index(drop=True)


def read_wm811k(
    path: Path, *, trust_pickle: bool, cache_dir: str | Path | None = None, split_column: str | None = None,
    skip_bad: bool = False,
) -> tuple[pd.DataFrame, list[BadFile]]:
    """The labelled maps of ``LSWMD.pkl`` (converted once to .npz); maps that are not die grids are returned
    as skipped rows with ``skip_bad``, else the first raises. ``split_column="trianTestLabel"`` keeps the
    dataset's own Training/Test split."""
    try:
        conv = wm811k.converted_manifest(path, trust_pickle=trust_pickle, cache_dir=cache_dir)
    except (WaferMapError, wm811k.PickleTrustError) as exc:
        raise DataError(str(exc)) from None
    bad = [BadFile(path=str(path), source=source, reason=reason) for source, reason in conv.skipped]
    if bad and not skip_bad:
        raise DataError(f"{bad[0].source}: {bad[0].reason} ({len(bad)} such map(s), listed in "
                        f"{conv.out / wm811k.SKIPPED}); pass --skip-bad to train without them")
    if conv.unlabelled:
        log.info("%s: %d unlabelled maps kept apart as a pool in %s", path, conv.unlabelled,
                 conv.out / wm811k.UNLABELLED)
    table = read_manifest(conv.manifest, split_column=split_column)
    table["source"] = table.pop("meta_source")  # LSWMD.pkl:<row>, the row of the original file
    return table, bad


def read_folder(root: Path) -> pd.DataFrame:
    """``root/<class>/*.png`` or ``root/<split>/<class>/*.png`` (the split level then fixes the split)."""
    root = root.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root}: no class folders found (expected {root}/<class>/<image files>)")
    split_names = {d.name.lower() for d in subdirs}
    has_split_level = split_names <= set(_SPLIT_ALIASES) and "train" in {_SPLIT_ALIASES[s] for s in split_names}
    rows = []
    for top in subdirs:
        if has_split_level:
            split = _SPLIT_ALIASES[top.name.lower()]
            class_dirs = sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
        else:
            split, class_dirs = "", [top]
        for class_dir in class_dirs:
            for file in list_images(class_dir, recursive=True):
                rows.append({
                    "path": str(file),
                    "label": class_dir.name,
                    "split": split,
                    "source": str(file.relative_to(root)),
                })
    if not rows:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders")
    return pd.DataFrame(rows, columns=CORE_COLUMNS)


def read_manifest(
    csv_path: Path,
    *,
    image_root: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
) -> pd.DataFrame:
    """A CSV with one row per image, e.g. the die-bridge format ``filename, window, lib, Label``.

    Unknown columns become metadata; an unnamed index column (pandas' ``to_csv`` default) is dropped.
    """
    csv_path = csv_path.resolve()
    sep = "\t" if csv_path.suffix.lower() == ".tsv" else None
    try:
        raw = pd.read_csv(csv_path, sep=sep, engine="python", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: not a readable CSV manifest: {exc}") from None
    if raw.empty:
        raise DataError(f"{csv_path}: the manifest has no rows")
    raw = raw.drop(columns=[c for c in raw.columns if c.startswith("Unnamed:") or c == ""])
    path_col = path_column or _find_column(raw, _PATH_CANDIDATES, csv_path, "path", "--path-column")
    label_col = label_column or _find_column(raw, _LABEL_CANDIDATES, csv_path, "label", "--label-column")
    for col in (path_col, label_col, split_column):
        if col and col not in raw.columns:
            raise DataError(f"{csv_path}: no column {col!r}; columns are {', '.join(raw.columns)}")
    root = Path(image_root).expanduser().resolve() if image_root else csv_path.parent
    _check_image_root(root, [p.strip() for p in raw[path_col]], csv_path, given=image_root is not None)
    table = pd.DataFrame({
        "path": [str((root / p.strip()).resolve()) if p.strip() else "" for p in raw[path_col]],
        "label": raw[label_col].str.strip(),
        "split": [_normalise_split(v, f"{csv_path.name}:{i + 2}") for i, v in enumerate(raw[split_column])]
        if split_column else "",
        # Line numbers as an editor shows them: the header is line 1.
        "source": [f"{csv_path.name}:{i + 2}" for i in range(len(raw))],
    })
    meta = raw.drop(columns=[c for c in (path_col, label_col, split_column) if c])
    for col in meta.columns:
        if col in CORE_COLUMNS:
            table[f"meta_{col}"] = meta[col].values
        else:
            table[col] = meta[col].values
    return table


def _check_image_root(root: Path, names: list[str], csv_path: Path, *, given: bool) -> None:
    """Refuse an image folder that does not exist, or one under which none of the first files are while they
    all sit one folder down (``input_train/`` holding ``input_train/input_train/*.png``), naming the fix."""
    flag = "--image-root" if given else "--image-root (default: the CSV's folder)"
    if not root.is_dir():
        raise DataError(f"{csv_path.name}: the image folder {root} does not exist; point {flag} at the folder "
                        "the manifest's file names are relative to")
    sample = [n for n in names if n and not Path(n).is_absolute()][:20]
    if not sample or any((root / n).exists() for n in sample):
        return
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if all((sub / n).exists() for n in sample):
            raise DataError(f"{csv_path.name}: {sample[0]} is not in {root} but in {sub}: the images are one "
                            f"folder down; pass --image-root {sub}")


def read_elpv() -> pd.DataFrame:
    """ELPV solar cells from the ``elpv-dataset`` package: 4 defect-probability classes, cell type as metadata."""
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("the ELPV images come from the PyPI package 'elpv-dataset': pip install elpv-dataset") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise DataError(f"elpv-dataset is installed but {labels} is missing")
    rows = []
    for lineno, line in enumerate(labels.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"{labels}:{lineno}: expected 'path probability type', got {line!r}")
        rel, prob, cell_type = parts
        level = round(float(prob) * 3)  # 0, 1/3, 2/3, 1 -> 0..3
        rows.append({
            "path": str((labels.parent / rel).resolve()),
            "label": ELPV_CLASSES[level],
            "split": "",
            "source": f"labels.csv:{lineno}",
            "type": cell_type,
            "defect_probability": float(prob),
        })
    return pd.DataFrame(rows)


def is_wafer_source(source: str | Path) -> bool:
    """Whether a data source holds wafer maps, from a cheap look: ``LSWMD.pkl``, or a folder / manifest whose
    first few files are .npy/.npz/.xml die grids (decides the ``wafer`` config preset)."""
    path = Path(str(source)).expanduser()
    suffix = path.suffix.lower()
    if suffix in {".pkl", ".pickle"}:
        return True
    if path.is_dir():
        for file in itertools.islice(path.rglob("*"), 5000):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS and not file.name.startswith("."):
                return file.suffix.lower() in WAFER_EXTENSIONS
        return False
    if path.is_file() and suffix in {".csv", ".tsv", ".txt"}:
        try:
            head = pd.read_csv(path, sep="\t" if suffix == ".tsv" else None, engine="python", dtype=str,
                               keep_default_na=False, nrows=5)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error):
            return False
        cells = [str(v).strip().lower() for v in head.to_numpy().ravel()]
        return any(c.endswith(tuple(WAFER_EXTENSIONS)) for c in cells)
    return False


def check_table(
    table: pd.DataFrame, *, classes: list[str] | None = None, skip_bad: bool = False
) -> tuple[pd.DataFrame, list[BadFile]]:
    """Check every row names an existing file and a known label; drop or raise on the rest."""
    bad: list[BadFile] = []
    keep = []
    allowed = set(classes) if classes else None
    for row in table.itertuples(index=False):
        reason = None
        if not row.path:
            reason = "no file name"
        elif not Path(row.path).exists():
            reason = "file not found"
        elif not Path(row.path).is_file():
            reason = "not a file"
        elif not isinstance(row.label, str) or not row.label:
            reason = "empty label"
        elif allowed is not None and row.label not in allowed:
            reason = f"unknown label {row.label!r} (known: {', '.join(classes)})"
        if reason is None:
            keep.append(True)
            continue
        if not skip_bad:
            raise DataError(f"{row.source}: {row.path or '<empty>'}: {reason}")
        bad.append(BadFile(path=row.path, source=row.source, reason=reason))
        keep.append(False)
    table = table[keep].reset_index(drop=True)
    if table.empty:
        raise DataError("no usable images remain in the dataset")
    return table, bad


def class_names(table: pd.DataFrame, classes: list[str] | None = None) -> list[str]:
    """Class order: as configured, else sorted label names (stable across runs and machines)."""
    if classes:
        return list(classes)
    return sorted(table["label"].unique())


def _find_column(raw: pd.DataFrame, candidates: tuple[str, ...], csv_path: Path, what: str, flag: str) -> str:
    lower = {c.lower().strip(): c for c in raw.columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise DataError(
        f"{csv_path}: cannot tell which column holds the image {what}; columns are "
        f"{', '.join(raw.columns)}. Name it with {flag}"
    )


def _normalise_split(value: str, where: str) -> str:
    value = (value or "").strip().lower()
    if not value:
        return ""
    if value not in _SPLIT_ALIASES:
        raise DataError(f"{where}: unknown split value {value!r}; use train, val, calib or test")
    return _SPLIT_ALIASES[value]
