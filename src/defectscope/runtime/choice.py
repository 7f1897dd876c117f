"""``--runtime auto``: measure the runtimes, precisions and view counts this machine offers on the run's own
images and keep the fastest candidate that passes the acceptance test.

``defectscope export`` writes, beside ``model.onnx``, a check set ``model.check.npz`` (numpy arrays, no pickles):
the run's test images at the model's input size with their labels, a set of Drift images (corrupted test
images and far-off images), and the fp32 outputs of ONNX Runtime on both; and, for models that can be staged,
the backbone and head as two files (:mod:`defectscope.runtime.staged`). A candidate is

* a whole graph (``onnxruntime_fp32``, ``openvino_bf16``, ...), or
* a staged one (``openvino_bf16_backbone_4v``): the backbone at that precision on N of the model's test-time
  views, sent as one batch, and the head, the policy's score and its thresholds in fp32.

First start on a machine, bounded: every candidate's speed is measured on ``BENCH_IMAGES`` check images
(``PASSES`` timed passes, the best kept; candidates sharing a backbone are measured together), then the
candidates are tested in order of speed, fastest first, with
:func:`defectscope.runtime.acceptance.check` (the policy's caps hold on the check set with the candidate's own
outputs; accuracy, Drift AUROC and automation within stated margins; every differing decision listed with its
distance from a threshold) until one passes; ONNX Runtime fp32 is the reference and always passes. The
record (machine: CPU model, AVX512-BF16 / AMX / VNNI flags, cores, threads, runtime versions; every candidate's
speed and test; the choice and why; how long the choice took and its memory peak) goes in the sidecar JSON
when measured at export, else in ``model.runtime.json`` beside the model, written the first time the model
starts on a new machine, and is read instead of measuring again. Only numpy and the runtimes are used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.runtime import acceptance, staged
from defectscope.runtime import card as md
from defectscope.runtime import engines as rt

log = logging.getLogger(__name__)

BATCH = 32
BENCH_IMAGES = 64  # check images each candidate's speed is measured on
PASSES = 2  # timed passes per candidate; the best is kept (other processes only slow one down)
SELECTION_KEY = "runtime_selection"
FORMAT = 2
MATRIX_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
auroc = acceptance.auroc


def reference_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.check.npz")


def cache_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.runtime.json")


def candidate_key(runtime: str, precision: str, views: int | None = None) -> str:
    return f"{runtime}_{precision}" if views is None else f"{runtime}_{precision}_backbone_{views}v"


# -------------------------------------------------------------------------------------- reference set

def write_reference(model_path: Path, images: np.ndarray, labels: np.ndarray, drift_images: np.ndarray) -> Path:
    """Store the reference set and the fp32 ONNX Runtime outputs on it beside ``model_path``."""
    engine = rt.create_engine(model_path, "onnxruntime", "fp32")
    probs, drift = _outputs(engine, images)
    _, drift_on_drift = _outputs(engine, drift_images)
    path = reference_path(model_path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, images=images.astype(np.uint8), labels=labels.astype(np.int64),
                        drift_images=drift_images.astype(np.uint8), fp32_probabilities=probs,
                        fp32_drift=drift, fp32_drift_on_drift=drift_on_drift)
    tmp.replace(path)
    return path


def load_reference(model_path: str | Path) -> dict[str, np.ndarray] | None:
    path = reference_path(model_path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _inputs(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(255))[:, None]


def _outputs(engine: rt.Engine, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _inputs(images)
    probs, drift = [], []
    for i in range(0, len(x), BATCH):
        p, _, d = engine.run(x[i:i + BATCH])
        probs.append(p)
        drift.append(d)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(drift)


# ------------------------------------------------------------------------------------------- machine

def machine() -> dict[str, Any]:
    """What a measured speed depends on: CPU model, its vector/matrix flags, cores, runtime versions."""
    flags = rt.cpu_flags()
    versions = {}
    for name in rt.installed_runtimes():
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return {
        "cpu": rt.cpu_name(),
        "cores": os.cpu_count(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "vnni", "sse4"))),
        "matrix": {
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool({"amx_bf16", "amx_tile"} & flags),
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
            "present": [f for f in MATRIX_FLAGS if f in flags],
        },
        "runtimes": versions,
    }


def machine_key(info: dict[str, Any], threads: int, device: str) -> str:
    text = json.dumps({**info, "threads": threads, "device": device}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- choose

def view_counts(model_views: list[int]) -> list[int]:
    """The view counts worth measuring: all of the model's, then halving down to one (4 -> 4, 2, 1)."""
    counts, n = [], len(model_views)
    while n >= 1:
        counts.append(n)
        n //= 2
    return counts


def candidate_rows(model_path: str | Path, device: str, card: md.ModelCard) -> list[dict[str, Any]]:
    """Every candidate to measure: the whole-graph pairs of :func:`engines.candidates`, then the staged ones."""
    pairs = rt.candidates(model_path, device)
    rows = [{"runtime": r, "precision": p, "layout": "full", "views": None} for r, p in pairs]
    model_views = list(card.spec.get("views") or [0])
    if not card.takes_metadata and staged.available(model_path):
        for runtime, precision in pairs:
            if runtime == "onnxruntime" and precision not in ("fp32", "int8") or not staged.available(
                    model_path, precision):
                continue
            rows += [{"runtime": runtime, "precision": precision, "layout": "staged", "views": n}
                     for n in view_counts(model_views)]
    for row in rows:
        row["key"] = candidate_key(row["runtime"], row["precision"], row["views"])
    return rows


def engine_for(model_path: str | Path, row: dict[str, Any], *, device: str = "cpu", threads: int = 1,
               cache: dict | None = None, providers: list[str] | None = None) -> rt.Engine:
    """The engine of a candidate row (whole graph or staged)."""
    if row.get("layout", "full") == "full":
        return rt.create_engine(model_path, row["runtime"], row["precision"], device=device, threads=threads,
                                providers=providers)
    views = staged.line_views(list(rt.read_card(model_path).spec.get("views") or [0]), int(row["views"]))
    return staged.create(model_path, row["runtime"], row["precision"], views, device=device, threads=threads,
                         stages=cache)


def _speeds(model_path: Path, rows: list[dict[str, Any]], x: np.ndarray, device: str, threads: int,
            passes: int) -> dict[str, Any]:
    """Images/s of every candidate on ``x``, measured group by group (one backbone or graph at a time, freed
    after) so that at most one compiled model per group is held: a bounded first start."""
    results: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["layout"], row["runtime"], row["precision"]), []).append(row)
    for group in groups.values():
        cache: dict = {}
        built = {}
        for row in group:
            try:
                built[row["key"]] = engine_for(model_path, row, device=device, threads=threads, cache=cache)
            except (rt.RuntimeUnavailable, RuntimeError) as exc:
                results[row["key"]] = {**_public(row), "accepted": False, "refused": f"unavailable: {exc}"}
        for engine in built.values():
            engine.run(x[:BATCH])  # warm-up: first-call allocations and kernel selection are not speed
        speeds: dict[str, list[float]] = {k: [] for k in built}
        for _ in range(passes):
            for key, engine in built.items():  # interleaved within the group
                start = time.perf_counter()
                for i in range(0, len(x), BATCH):
                    engine.run(x[i:i + BATCH])
                speeds[key].append(len(x) / (time.perf_counter() - start))
        for row in group:
            if row["key"] in built:
                engine = built[row["key"]]
                results[row["key"]] = {**_public(row), "device": engine.device,
                                       "images_per_second": round(max(speeds[row["key"]]), 2),
                                       "images_per_second_passes": [round(v, 2) for v in speeds[row["key"]]]}
        del built, cache
    return results


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("runtime", "precision", "layout", "views")}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def select(model_path: str | Path, *, device: str = "cpu", threads: int | None = None,
           decide: Any = None, passes: int = PASSES, bench_images: int = BENCH_IMAGES,
           only: Any = None, check_all: bool = False) -> dict[str, Any]:
    """Measure the candidates, test them fastest first, choose; returns the record.

    ``only(row) -> bool`` restricts the candidates (a pinned runtime or precision). ``check_all``: test
    every candidate, not only until the first passes (the bench does). ``decide`` is ignored (the policy
    is read from the model's card; kept for callers of the old signature). Without a check set (a model
    exported by an older defectscope) only fp32 candidates are measured, on random inputs, and ONNX
    Runtime fp32 is kept: reduced precision is never chosen untested.
    """
    started = time.perf_counter()
    model_path = Path(model_path)
    threads = threads or os.cpu_count() or 1
    card = rt.read_card(model_path)
    ref = load_reference(model_path)
    rows = [r for r in candidate_rows(model_path, device, card) if only is None or only(r)]
    if ref is None:
        log.warning("%s: no check set %s beside it; only fp32 is considered", model_path,
                    reference_path(model_path).name)
        rows = [r for r in rows if r["precision"] == "fp32" and r["layout"] == "full"]
    if not rows:
        raise rt.RuntimeUnavailable("neither onnxruntime nor openvino is installed (or nothing matches)")
    if ref is not None and len(ref["images"]):
        x = _inputs(ref["images"][:bench_images])
    else:
        x = np.random.default_rng(0).random((2 * BATCH, 1, card.image_size, card.image_size), dtype=np.float32)
    results = _speeds(model_path, rows, x, device, threads, passes)
    measured = time.perf_counter() - started
    order = sorted((k for k, r in results.items() if "images_per_second" in r),
                   key=lambda k: -results[k]["images_per_second"])
    best = _test_in_order(model_path, rows, results, order, ref, card, device, threads, check_all)
    if best is None:
        raise rt.RuntimeUnavailable(f"{model_path}: no runtime passed the checks: "
                                    + "; ".join(f"{k}: {r.get('refused')}" for k, r in results.items()))
    chosen = results[best]
    faster = [k for k in order[:order.index(best)]]
    why = (f"{best}: the fastest candidate ({chosen['images_per_second']}/s on {len(x)} check images) that "
           "passed the acceptance test" + (f"; faster but refused: {', '.join(faster)}" if faster else ""))
    info = machine()
    record = {
        "format": FORMAT,
        "chosen": {**_public(chosen), "device": chosen["device"], "images_per_second": chosen["images_per_second"],
                   "key": best},
        "why": why,
        "machine": info, "machine_key": machine_key(info, threads, device), "threads": threads, "device": device,
        "batch_size": BATCH, "bench_images": len(x), "rules": acceptance.rules(),
        "candidates": results,
        "first_start": {"seconds_measuring": round(measured, 1),
                        "seconds_total": round(time.perf_counter() - started, 1), "peak_rss_mb": _peak_rss_mb()},
        "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    log.info("%s: %s", model_path.name, summary(record))
    return record


def _test_in_order(model_path: Path, rows: list[dict[str, Any]], results: dict[str, dict[str, Any]],
                   order: list[str], ref: dict[str, np.ndarray] | None, card: md.ModelCard, device: str,
                   threads: int, check_all: bool) -> str | None:
    """Run the acceptance test on the candidates in ``order`` until one passes (all with ``check_all``);
    the key of the fastest that passed. ONNX Runtime fp32 is the reference: it passes by definition."""
    by_key = {r["key"]: r for r in rows}
    best = None
    for key in order:
        row = results[key]
        if ref is None:
            row["accepted"] = row["precision"] == "fp32" and row["runtime"] == "onnxruntime"
        elif key == "onnxruntime_fp32":  # the reference: its outputs are the check set's, nothing to run
            row.update(acceptance.check(ref["fp32_probabilities"], ref["fp32_drift"], ref["fp32_drift_on_drift"],
                                        ref, card.policy, card.classes), reference=True)
        elif best is not None and not check_all:
            row["accepted"], row["checked"] = None, False  # slower than the choice: not tested
            continue
        else:
            cache: dict = {}
            engine = engine_for(model_path, by_key[key], device=device, threads=threads, cache=cache)
            probs, drift = _outputs(engine, ref["images"])
            _, drift_on_drift = _outputs(engine, ref["drift_images"])
            del engine, cache
            row.update(acceptance.check(probs, drift, drift_on_drift, ref, card.policy, card.classes))
        if row.get("accepted") and best is None:
            best = key
    return best


def summary(record: dict[str, Any]) -> str:
    """One line: every candidate's speed (and why it was refused), then the choice."""
    def state(r: dict[str, Any]) -> str:
        if r.get("accepted"):
            return ""
        return " (not tested: slower than the choice)" if r.get("checked") is False else f" (refused: {r['refused']})"

    parts = [f"{k} {r.get('images_per_second', '-')}/s{state(r)}" for k, r in record["candidates"].items()]
    chosen = record["chosen"]
    key = chosen.get("key", f"{chosen['runtime']}_{chosen['precision']}")
    return f"{', '.join(parts)} -> {key} ({chosen['device']})"


# ------------------------------------------------------------------------------------------- records

def _pin_key(threads: int, device: str, runtime: str, precision: str) -> str:
    key = machine_key(machine(), threads, device)
    return key if (runtime, precision) == ("auto", "auto") else f"{key}:{runtime}:{precision}"


def recorded(model_path: str | Path, threads: int, device: str, runtime: str = "auto",
             precision: str = "auto") -> dict[str, Any] | None:
    """The selection recorded for this machine (sidecar first, then the cache file), or None."""
    key = _pin_key(threads, device, runtime, precision)
    sidecar = md.sidecar_path(model_path)
    for path, pick in ((sidecar, lambda d: d.get(SELECTION_KEY)),
                       (cache_path(model_path), lambda d: d.get("machines", {}).get(key))):
        try:
            record = pick(json.loads(Path(path).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if (isinstance(record, dict) and record.get("format") == FORMAT
                and record.get("pin_key", record.get("machine_key")) == key):
            return record
    return None


def remember(model_path: str | Path, record: dict[str, Any]) -> Path | None:
    """Add ``record`` to the cache file beside the model (best effort: a read-only folder only logs)."""
    path = cache_path(model_path)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data.setdefault("machines", {})[record.get("pin_key", record["machine_key"])] = record
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot record the runtime choice in %s (%s); it will be measured again next start", path, exc)
        return None
    return path


def resolve(model_path: str | Path, runtime: str, precision: str, *, device: str = "cpu",
            threads: int | None = None, decide: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the chosen candidate: runtime, precision, layout, views; the selection record or None) for the
    requested values, ``auto`` resolved; read from the record when this machine has one, else measured once
    and recorded. ``runtime='openvino', precision='auto'`` chooses among OpenVINO's candidates only.
    """
    if runtime != "auto" and precision != "auto":
        return {"runtime": runtime, "precision": precision, "layout": "full", "views": None}, None
    threads = threads or os.cpu_count() or 1
    record = recorded(model_path, threads, device, runtime, precision)
    pinned = (runtime, precision) != ("auto", "auto")
    if record is None and pinned:  # the machine's auto record may already hold an accepted candidate of the pin
        record = recorded(model_path, threads, device)
        if record is not None and not any(r.get("accepted") and runtime in ("auto", r["runtime"])
                                          and precision in ("auto", r["precision"])
                                          for r in record["candidates"].values()):
            record = None
    if record is None:
        only = (lambda r: runtime in ("auto", r["runtime"]) and precision in ("auto", r["precision"])) if pinned \
            else None
        record = select(model_path, device=device, threads=threads, only=only)
        if pinned:
            record["pin_key"] = _pin_key(threads, device, runtime, precision)
        remember(model_path, record)
    ok = {k: r for k, r in record["candidates"].items() if r.get("accepted")
          and runtime in ("auto", r["runtime"]) and precision in ("auto", r["precision"])}
    if not ok:
        raise rt.RuntimeUnavailable(f"{model_path}: no accepted candidate for runtime {runtime}, precision "
                                    f"{precision} on this machine (see {cache_path(model_path).name})")
    best = ok[max(ok, key=lambda k: ok[k]["images_per_second"])]
    return _public({"layout": "full", "views": None, **best}), record
