"""``--runtime auto``: measure the runtimes, precisions and view counts this machine offers on the run's own
images and keep the fastest candidate that passes the acceptance test.

``defectscope export`` writes, beside ``model.onnx``, a check set ``model.check.npz`` (numpy arrays, no pickles):
the run's test images at the model's input size with their labels, a set of Drift images (corrupted test
images and far-off images), and the fp32 outputs of ONNX Runtime on both; and, for models that can be staged,
the backbone and head as two files (:mod:`defectscope.runtime.staged`). A candidate is

* a whole graph (``onnxruntime_fp32``, ``openvino_bf16``, ...), or
* a staged one (``openvino_bf16_backbone_4v``): the backbone at that precision on N of the model's test-time
  views, sent as one batch, and the head, the policy's score and its thresholds in fp32.

First start on a machine, bounded: the candidates are measured group by group (those sharing a backbone or
graph together, one group compiled at a time and its memory released before the next): the speed on
``BENCH_IMAGES`` check images (``PASSES`` timed passes, interleaved, the best kept); a pre-screen on the outputs
of the first pass (:func:`defectscope.runtime.acceptance.screen`: a far flip among these images refuses the
candidate exactly, without its full test); then, engine still in hand, the full
:func:`defectscope.runtime.acceptance.check` of each candidate faster than the best accepted so far (the
policy's caps hold on the check set with the candidate's own outputs; accuracy, Drift AUROC and automation
within stated margins; every differing decision listed with its distance from a threshold). ONNX Runtime
fp32, the reference, is measured first and passes without running. Past the budget (``CHOICE_SECONDS``, the
``--choice-seconds`` of ``sort``), nothing more is measured or tested and the best accepted so far is kept;
the record says what was left out, and ``defectscope export`` makes the whole choice without a budget. The
record (machine: CPU model, AVX512-BF16 / AMX / VNNI flags, cores, threads, runtime versions; every candidate's
speed and test; the choice and why; how long the choice took and its memory peak) goes in the sidecar JSON
when measured at export, else in ``model.runtime.json`` beside the model, written the first time the model
starts on a new machine, and is read instead of measuring again. Only numpy and the runtimes are used.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import resource
import time
from contextlib import suppress
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
# The first start's time budget (seconds): past it, no further candidate is measured or tested once one has
# passed (ONNX Runtime fp32, the reference, passes without running); the best accepted so far is kept. The
# overrun is one candidate group's measurement or one full test (~15 s on a loaded 2-core machine).
CHOICE_SECONDS = 60.0
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
        # int8 from the backbone's own file: export keeps it on its own test, and may have refused the whole
        # graph's int8 file while the backbone's passed.
        for runtime, precision in rt.candidates(model_path, device, staged.backbone_path(model_path, "int8")):
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


def _group_order(key: tuple[str, str, str]) -> tuple[int, int]:
    """The order groups are measured in under a time budget: the fp32 reference first (the choice's fallback),
    then reduced precision (where a line gains most), whole graphs before staged ones of the same precision,
    fp32 alternatives last."""
    layout, runtime, precision = key
    if (layout, runtime, precision) == ("full", "onnxruntime", "fp32"):
        return (0, 0)
    # Whole graphs before staged ones: under a loaded machine's budget a staged candidate refused by its full
    # test (bf16 4 views: automation) used the time the whole bf16 graph, which passes, needed.
    return (2 if precision == "fp32" else 1, 0 if layout == "full" else 1)


def _release() -> None:
    """Give a freed candidate's memory back (compiled graphs, arenas) before the next one is built: the
    allocator keeps freed blocks otherwise, and peaks of successive candidates would pile up."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_mb() -> float | None:
    try:
        return round(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


class _Trial:
    """What the choice carries from group to group: the check set and card (for the tests), the budget,
    and the fastest accepted candidate so far."""

    def __init__(self, ref: dict[str, np.ndarray] | None, card: md.ModelCard, check_all: bool,
                 deadline: float | None) -> None:
        self.ref, self.card, self.check_all, self.deadline = ref, card, check_all, deadline
        self.best: str | None = None
        self.best_speed = -1.0

    def late(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def screen(self, probs: np.ndarray, drift: np.ndarray) -> dict[str, Any] | None:
        if self.ref is None:
            return None
        return acceptance.screen(probs, drift, self.ref, self.card.policy, self.card.classes)

    def test(self, key: str, row: dict[str, Any], engine: rt.Engine) -> None:
        """The acceptance test of one measured candidate (its engine still built), unless it cannot matter."""
        ref, speed = self.ref, row["images_per_second"]
        if ref is None:
            row["accepted"] = row["precision"] == "fp32" and row["runtime"] == "onnxruntime"
        elif key == "onnxruntime_fp32":  # the reference: its outputs are the check set's, nothing to run
            row.update(acceptance.check(ref["fp32_probabilities"], ref["fp32_drift"], ref["fp32_drift_on_drift"],
                                        ref, self.card.policy, self.card.classes), reference=True)
        elif (row.get("screen") or {}).get("refused") and not self.check_all:
            row["accepted"], row["refused"] = False, row["screen"]["refused"]  # exact: no full test needed
        elif speed <= self.best_speed and not self.check_all:
            row["accepted"], row["checked"] = None, False  # slower than one accepted already: not tested
        elif self.best is not None and self.late():
            row.update(accepted=None, checked=False, refused="not tested: the choice's time budget was spent")
        else:
            probs, drift = _outputs(engine, ref["images"])
            _, drift_on_drift = _outputs(engine, ref["drift_images"])
            row.update(acceptance.check(probs, drift, drift_on_drift, ref, self.card.policy, self.card.classes))
        if row.get("accepted") and speed > self.best_speed:
            self.best, self.best_speed = key, speed


def _speeds(model_path: Path, rows: list[dict[str, Any]], x: np.ndarray, device: str, threads: int,
            passes: int, trial: _Trial) -> dict[str, Any]:
    """Measure and test every candidate, group by group (one backbone or graph at a time, freed after, so at
    most one compiled model per group is held): a bounded first start.

    Within a group the candidates are timed interleaved on ``x``; the outputs of the first timed pass (the
    first check images) are the pre-screen; then each candidate faster than the best accepted so far gets its
    full acceptance test while its engine is built (no second compile). Past the budget, no further group is
    measured once one candidate has been accepted (those are listed as not measured).
    """
    results: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["layout"], row["runtime"], row["precision"]), []).append(row)
    for gkey in sorted(groups, key=_group_order):
        group = groups[gkey]
        if trial.best is not None and trial.late():
            for row in group:
                results[row["key"]] = {**_public(row), "accepted": None, "checked": False, "measured": False,
                                       "refused": "not measured: the choice's time budget was spent"}
            continue
        _measure_group(model_path, group, x, device, threads, passes, trial, results)
        _release()
        for row in group:
            results[row["key"]]["rss_mb_after_group"] = _rss_mb()
    return results


def _measure_group(model_path: Path, group: list[dict[str, Any]], x: np.ndarray, device: str, threads: int,
                   passes: int, trial: _Trial, results: dict[str, dict[str, Any]]) -> None:
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
    outputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in built}
    for p in range(passes):
        for key, engine in built.items():  # interleaved within the group
            start = time.perf_counter()
            for i in range(0, len(x), BATCH):
                probs, _, drift = engine.run(x[i:i + BATCH])
                if p == 0:
                    outputs[key].append((probs, drift))
            speeds[key].append(len(x) / (time.perf_counter() - start))
    for key, engine in built.items():
        row = next(r for r in group if r["key"] == key)
        results[key] = {**_public(row), "device": engine.device, "images_per_second": round(max(speeds[key]), 2),
                        "images_per_second_passes": [round(v, 2) for v in speeds[key]]}
        if outputs[key] and (screened := trial.screen(np.concatenate([o[0] for o in outputs[key]]),
                                                      np.concatenate([o[1] for o in outputs[key]]))):
            results[key]["screen"] = screened
    for key in sorted(built, key=lambda k: -results[k]["images_per_second"]):  # fastest first
        trial.test(key, results[key], built[key])
    built.clear()
    cache.clear()


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("runtime", "precision", "layout", "views")}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def select(model_path: str | Path, *, device: str = "cpu", threads: int | None = None,
           decide: Any = None, passes: int = PASSES, bench_images: int = BENCH_IMAGES,
           only: Any = None, check_all: bool = False,
           choice_seconds: float | None = CHOICE_SECONDS) -> dict[str, Any]:
    """Measure the candidates and test those that could be chosen, group by group; returns the record.

    ``choice_seconds``: the time budget (see :data:`CHOICE_SECONDS`; None or 0: none, as ``export`` and
    the bench run it). A candidate whose outputs on the timed images already show a far flip is refused by
    the pre-screen (:func:`acceptance.screen`) without its full test.

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
    deadline = started + choice_seconds if choice_seconds and not check_all else None
    trial = _Trial(ref, card, check_all, deadline)
    results = _speeds(model_path, rows, x, device, threads, passes, trial)
    measured = time.perf_counter() - started
    order = sorted((k for k, r in results.items() if "images_per_second" in r),
                   key=lambda k: -results[k]["images_per_second"])
    best = trial.best
    if best is None:
        raise rt.RuntimeUnavailable(f"{model_path}: no runtime passed the checks: "
                                    + "; ".join(f"{k}: {r.get('refused')}" for k, r in results.items()))
    chosen = results[best]
    faster = order[:order.index(best)]
    refused = [k for k in faster if results[k].get("accepted") is False]
    untested = [k for k in faster if results[k].get("accepted") is None]
    unmeasured = [k for k, r in results.items() if r.get("measured") is False]
    spent = bool(untested or unmeasured)
    why = (f"{best}: the fastest candidate ({chosen['images_per_second']}/s on {len(x)} check images) that "
           "passed the acceptance test" + (f"; faster but refused: {', '.join(refused)}" if refused else "")
           + (f"; faster but not tested within the {choice_seconds:g} s budget: {', '.join(untested)}"
              if untested else "")
           + (f"; not measured within the budget: {', '.join(unmeasured)}" if unmeasured else ""))
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
        "budget": {"choice_seconds": choice_seconds if deadline is not None else None, "spent": spent,
                   "not_tested": untested, "not_measured": unmeasured,
                   "redo": "the whole choice, without a budget: defectscope export (or delete "
                           f"{cache_path(model_path).name})" if spent else None},
        "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    log.info("%s: %s", model_path.name, summary(record))
    return record


def summary(record: dict[str, Any]) -> str:
    """One line: every candidate's speed (and why it was refused), then the choice, then the candidates left
    untested, each reason said once with the candidates it concerns (several share "slower than the choice")."""
    untested: dict[str, list[str]] = {}

    def state(k: str, r: dict[str, Any]) -> str:
        if r.get("accepted"):
            return ""
        if r.get("checked") is False:
            untested.setdefault(r.get("refused") or "not tested, slower than the choice", []).append(k)
            return ""
        return f" (refused: {r['refused']})"

    parts = [f"{k} {r.get('images_per_second', '-')}/s{state(k, r)}" for k, r in record["candidates"].items()]
    chosen = record["chosen"]
    key = chosen.get("key", f"{chosen['runtime']}_{chosen['precision']}")
    notes = "".join(f"; {', '.join(keys)}: {why}" for why, keys in untested.items())
    return f"{', '.join(parts)} -> {key} ({chosen['device']}){notes}"


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
            threads: int | None = None, decide: Any = None,
            choice_seconds: float | None = CHOICE_SECONDS) -> tuple[dict[str, Any], dict[str, Any] | None]:
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
        record = select(model_path, device=device, threads=threads, only=only, choice_seconds=choice_seconds)
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
