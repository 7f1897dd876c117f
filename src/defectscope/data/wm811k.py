"""WM-811K (``LSWMD.pkl``): 811,457 wafer maps from 46,393 lots, 172,950 of them labelled with 9 classes.

The file is a pandas DataFrame pickled by Python 2 and a 2017 pandas. Reading it today needs three fixes,
all done here: ``encoding="latin1"`` for the Python 2 strings and numpy buffers; the module
``pandas.indexes`` renamed ``pandas.core.indexes`` (a custom ``Unpickler.find_class``), plus pandas' own
remaps of removed classes such as ``Int64Index``; and the cell values: ``failureType`` and ``trianTestLabel``
(sic) hold numpy arrays, ``[['Edge-Ring']]`` of shape (1, 1) when labelled and shape (0, 0) when not.

Unpickling runs whatever code the file names, so it happens only with ``trust_pickle=True`` (CLI
``--trust-pickle``). :func:`convert_lswmd` turns the pickle once into files that read without trust: one
compressed ``.npz`` per map (array ``die_states``), ``manifest.csv`` for the labelled maps, ``unlabelled.csv``
for the unlabelled pool (kept, split ``unlabelled``) and ``skipped.csv`` for maps that are not 2-D die grids.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.data.wafer import NPZ_KEY, WaferMapError, die_states
from defectscope.errors import DefectscopeError

log = logging.getLogger(__name__)

WM811K_CLASSES = ["Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Random", "Scratch", "Near-full", "none"]
MANIFEST, UNLABELLED, SKIPPED, INFO = "manifest.csv", "unlabelled.csv", "skipped.csv", "conversion.json"
UNLABELLED_SPLIT = "unlabelled"
_PER_FOLDER = 1000  # maps per sub-folder, so no directory holds 800k entries
CONVERT_VERSION = 1


class PickleTrustError(DefectscopeError, ValueError):
    """Reading a pickle was not explicitly allowed."""


def trust_message(path: str | os.PathLike) -> str:
    return (
        f"{path}: a pickle file can run arbitrary code when read, so defectscope reads it only when told to. "
        "If the file comes from a source you trust (e.g. the published WM-811K LSWMD.pkl), pass --trust-pickle "
        "(config data.trust_pickle: true), or convert it once to safe .npz files that read without trust: "
        f"defectscope wafer convert {path} --trust-pickle --out maps/  then  --data maps/manifest.csv"
    )


class _LegacyUnpickler(pickle.Unpickler):
    """The C unpickler with the module renames a 2017 pandas pickle needs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "pandas.indexes" or module.startswith("pandas.indexes."):
            module = "pandas.core.indexes" + module[len("pandas.indexes"):]
        try:
            from pandas.compat.pickle_compat import _class_locations_map as moved
        except ImportError:  # pandas' private table of moved classes; without it only our rename applies
            moved = {}
        module, name = moved.get((module, name), (module, name))
        return super().find_class(module, name)


def read_lswmd(path: str | os.PathLike, *, trust_pickle: bool = False) -> pd.DataFrame:
    """The raw WM-811K DataFrame (cells as stored: arrays for labels). Refuses without ``trust_pickle``."""
    path = Path(path)
    if not trust_pickle:
        raise PickleTrustError(trust_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        try:
            obj = _LegacyUnpickler(io.BufferedReader(fh, 1 << 20), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ModuleNotFoundError,
                ValueError, TypeError) as exc:
            raise WaferMapError(f"{path}: not a readable WM-811K pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, pd.DataFrame):
        raise WaferMapError(f"{path}: the pickle holds a {type(obj).__name__}, not a pandas DataFrame")
    if "waferMap" not in obj.columns:
        raise WaferMapError(f"{path}: no 'waferMap' column (columns: {', '.join(map(str, obj.columns))}); "
                            "not the WM-811K LSWMD.pkl layout")
    return obj


def cell_text(value: Any) -> str:
    """A WM-811K label cell as text: ``[['Edge-Ring']]`` -> ``'Edge-Ring'``; empty (0, 0) arrays -> ``''``."""
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        if value.size != 1:
            raise WaferMapError(f"expected one value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("latin1")
    return str(value).strip()


def _number(value: Any) -> str:
    try:
        v = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return cell_text(value)
    return str(int(v)) if v.is_integer() else str(v)


@dataclass
class Conversion:
    """What :func:`convert_lswmd` wrote."""

    out: Path
    labelled: int = 0
    unlabelled: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST


def convert_lswmd(
    path: str | os.PathLike, out: str | os.PathLike, *, trust_pickle: bool = False, skip_bad: bool = True,
) -> Conversion:
    """Write every map of ``LSWMD.pkl`` as ``out/maps/NNN/<row>.npz`` plus the CSV tables (see module doc).

    Rows whose map is not a 2-D grid of 0/1/2 (WM-811K has a few 1-D or empty ones) are listed in
    ``skipped.csv`` with their row, or raise with ``skip_bad=False``. The manifests' ``source`` column is
    ``LSWMD.pkl:<row index>``; metadata columns keep the original names (``lotName``, ``waferIndex``,
    ``dieSize``, ``trianTestLabel`` with values Training/Test).
    """
    path, out = Path(path), Path(out)
    frame = read_lswmd(path, trust_pickle=trust_pickle)
    out.mkdir(parents=True, exist_ok=True)
    result = Conversion(out=out)
    labelled_rows: list[dict[str, str]] = []
    pool_rows: list[dict[str, str]] = []
    cols = set(frame.columns)
    for n, (index, row) in enumerate(frame.iterrows()):
        source = f"{path.name}:{index}"
        try:
            states = die_states(row["waferMap"])
            label = cell_text(row["failureType"]) if "failureType" in cols else ""
            tt = cell_text(row["trianTestLabel"]) if "trianTestLabel" in cols else ""
        except WaferMapError as exc:
            if not skip_bad:
                raise WaferMapError(f"{source}: {exc}") from None
            result.skipped.append((source, str(exc)))
            continue
        rel = Path("maps") / f"{n // _PER_FOLDER:04d}" / f"{index}.npz"
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(target, **{NPZ_KEY: states})
        record = {
            "path": rel.as_posix(),
            "label": label,
            "source": source,
            "lotName": cell_text(row["lotName"]) if "lotName" in cols else "",
            "waferIndex": _number(row["waferIndex"]) if "waferIndex" in cols else "",
            "dieSize": _number(row["dieSize"]) if "dieSize" in cols else "",
            "trianTestLabel": tt,
            "rows": str(states.shape[0]),
            "cols": str(states.shape[1]),
        }
        if label:
            labelled_rows.append(record)
        else:
            pool_rows.append({**record, "split": UNLABELLED_SPLIT})
    columns = ["path", "label", "source", "lotName", "waferIndex", "dieSize", "trianTestLabel", "rows", "cols"]
    pd.DataFrame(labelled_rows, columns=columns).to_csv(out / MANIFEST, index=False)
    pd.DataFrame(pool_rows, columns=[*columns, "split"]).to_csv(out / UNLABELLED, index=False)
    pd.DataFrame(result.skipped, columns=["source", "reason"]).to_csv(out / SKIPPED, index=False)
    result.labelled, result.unlabelled = len(labelled_rows), len(pool_rows)
    (out / INFO).write_text(json.dumps({
        "version": CONVERT_VERSION, "source": str(path.resolve()), "labelled": result.labelled,
        "unlabelled": result.unlabelled, "skipped": len(result.skipped)}, indent=2))
    log.info("%s: %d labelled maps -> %s, %d unlabelled -> %s, %d skipped -> %s", path, result.labelled,
             out / MANIFEST, result.unlabelled, out / UNLABELLED, len(result.skipped), out / SKIPPED)
    for source, reason in result.skipped[:20]:
        log.warning("skipped %s: %s", source, reason)
    return result


def converted_manifest(
    path: str | os.PathLike, *, trust_pickle: bool = False, cache_dir: str | os.PathLike | None = None,
) -> Conversion:
    """Convert ``LSWMD.pkl`` into the cache once (keyed by the file's path, size and time) and reuse it."""
    path = Path(path).resolve()
    if not trust_pickle:
        raise PickleTrustError(trust_message(path))
    st = path.stat()
    key = hashlib.sha256(f"v{CONVERT_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else Path(
        os.environ.get("DEFECTSCOPE_CACHE", Path.home() / ".cache" / "defectscope"))
    out = root / f"wm811k-{key}"
    info = out / INFO
    if info.is_file():
        done = json.loads(info.read_text())
        skipped = pd.read_csv(out / SKIPPED, dtype=str, keep_default_na=False)
        log.info("%s: using the converted maps in %s", path, out)
        return Conversion(out=out, labelled=done["labelled"], unlabelled=done["unlabelled"],
                          skipped=list(skipped.itertuples(index=False, name=None)))
    log.info("%s: converting once to %s (unpickling with --trust-pickle)", path, out)
    return convert_lswmd(path, out, trust_pickle=True, skip_bad=True)
