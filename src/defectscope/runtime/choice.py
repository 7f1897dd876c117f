"""``--runtime auto``: measure every runtime and precision this machine offers on the run's own images and
keep the fastest one whose decisions match fp32.

``defectscope export`` writes, beside ``model.onnx``, a reference set ``model.check.npz`` (numpy arrays, no
pickles): the run's test images at the model's input size with their labels, a set of Drift images
(corrupted test images and far-off images), and the fp32 outputs of ONNX Runtime on both. A candidate
(runtime, precision) is refused when, against fp32 on the test images,

* its accuracy drops by more than 0.5 points, or
* its decisions (the run's policy: GOOD / defect / REVIEW / Drift, or argmax without a policy) differ on
  more than 0.5% of the images, or
* the AUROC of its Drift score (test images vs Drift images) drops by more than 0.5 points.

Of the rest, the fastest (images/s, batched, measured interleaved) is chosen. The choice and every
candidate's numbers are recorded per machine (CPU model, flags, cores, runtime versions, threads): in the
sidecar JSON when measured at export, else in ``model.runtime.json`` beside the model, written the first
time the model starts on a new machine. Only numpy and the runtimes are used: this runs on a line PC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.runtime import card as md
from defectscope.runtime import engines as rt

log = logging.getLogger(__name__)

MAX_ACCURACY_DROP = 0.005
MAX_DECISION_CHANGE = 0.005
MAX_DRIFT_AUROC_DROP = 0.005
BATCH = 32
PASSES = 2  # timed passes per candidate, interleaved; the best is kept (other processes only slow one down)
SELECTION_KEY = "runtime_selection"
FORMAT = 1


def reference_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.check.npz")


def cache_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.runtime.json")


def candidate_key(runtime: str, precision: str) -> str:
    return f"{runtime}_{precision}"


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
        "runtimes": versions,
    }


def machine_key(info: dict[str, Any], threads: int, device: str) -> str:
    text = json.dumps({**info, "threads": threads, "device": device}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- choose

def auroc(normal: np.ndarray, drift: np.ndarray) -> float | None:
    """AUROC with Drift positive (ties count half), numpy only."""
    if len(normal) == 0 or len(drift) == 0:
        return None
    big = np.finfo(np.float64).max
    s = np.nan_to_num(np.concatenate([normal, drift]).astype(np.float64), nan=big, posinf=big, neginf=-big)
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_drift = ranks[len(normal):].sum()
    n1 = len(drift)
    return float((r_drift - n1 * (n1 + 1) / 2) / (n1 * len(normal)))


def evaluate_candidate(probs: np.ndarray, drift: np.ndarray, drift_on_drift: np.ndarray,
                       ref: dict[str, np.ndarray], decide: Any) -> dict[str, Any]:
    """Accuracy, decision agreement and Drift AUROC of one candidate's outputs against the fp32 reference."""
    labels, p32 = ref["labels"], ref["fp32_probabilities"]
    n = len(labels)
    out: dict[str, Any] = {"images": int(n), "drift_images": int(len(ref["drift_images"]))}
    if n == 0:
        return out
    acc32 = float((p32.argmax(1) == labels).mean())
    acc = float((probs.argmax(1) == labels).mean())
    d32 = decide(p32, ref["fp32_drift"])
    d = decide(probs, drift)
    changed = float(np.mean([a != b for a, b in zip(d32, d, strict=True)]))
    # A model without a Drift rule outputs zeros: a constant score has no AUROC to keep.
    scored = np.ptp(np.concatenate([ref["fp32_drift"], ref["fp32_drift_on_drift"]])) > 0
    au32 = auroc(ref["fp32_drift"], ref["fp32_drift_on_drift"]) if scored else None
    au = auroc(drift, drift_on_drift) if scored else None
    out.update({
        "accuracy_fp32": acc32, "accuracy": acc, "accuracy_change": acc - acc32,
        "decisions_changed": changed, "decision_agreement": 1.0 - changed,
        "max_abs_diff_probabilities": float(np.abs(probs - p32).max()),
        "drift_auroc_fp32": au32, "drift_auroc": au,
        "drift_auroc_change": None if au is None or au32 is None else au - au32,
    })
    reasons = []
    if acc32 - acc > MAX_ACCURACY_DROP:
        reasons.append(f"accuracy {acc:.4f} vs {acc32:.4f} fp32")
    if changed > MAX_DECISION_CHANGE:
        reasons.append(f"{changed:.2%} of decisions differ from fp32")
    if au is not None and au32 is not None and au32 - au > MAX_DRIFT_AUROC_DROP:
        reasons.append(f"Drift AUROC {au:.4f} vs {au32:.4f} fp32")
    out["accepted"] = not reasons
    if reasons:
        out["refused"] = "; ".join(reasons)
    return out


def select(model_path: str | Path, *, device: str = "cpu", threads: int | None = None,
           decide: Any = None, passes: int = PASSES) -> dict[str, Any]:
    """Measure every candidate (runtime, precision) on the reference set and choose; returns the record.

    ``decide(probs, drift) -> list of decisions`` is the model's policy (the Predictor passes its own).
    Without a reference set (a model exported by an older defectscope) only fp32 candidates are measured,
    on random inputs: reduced precision is never chosen unchecked.
    """
    model_path = Path(model_path)
    threads = threads or os.cpu_count() or 1
    ref = load_reference(model_path)
    pairs = rt.candidates(model_path, device)
    if ref is None:
        log.warning("%s: no reference set %s beside it; only fp32 is considered", model_path,
                    reference_path(model_path).name)
        pairs = [p for p in pairs if p[1] == "fp32"]
    if not pairs:
        raise rt.RuntimeUnavailable("neither onnxruntime nor openvino is installed")
    engines: dict[str, rt.Engine] = {}
    results: dict[str, dict[str, Any]] = {}
    for runtime, precision in pairs:
        key = candidate_key(runtime, precision)
        try:
            engines[key] = rt.create_engine(model_path, runtime, precision, device=device, threads=threads)
        except (rt.RuntimeUnavailable, RuntimeError) as exc:
            results[key] = {"accepted": False, "refused": f"unavailable: {exc}"}
    if ref is not None and len(ref["images"]):
        x = _inputs(ref["images"])
    else:
        size = int(rt.read_metadata(model_path)[md.KEY_SPEC]["image_size"])
        x = np.random.default_rng(0).random((2 * BATCH, 1, size, size), dtype=np.float32)
    speeds: dict[str, list[float]] = {k: [] for k in engines}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for engine in engines.values():
        engine.run(x[:BATCH])  # warm-up: first-call allocations and kernel selection are not speed
    for _ in range(passes):
        for key, engine in engines.items():  # interleaved: a busy moment slows one pass, not one candidate
            start = time.perf_counter()
            probs, drift = [], []
            for i in range(0, len(x), BATCH):
                p, _, d = engine.run(x[i:i + BATCH])
                probs.append(p)
                drift.append(d)
            speeds[key].append(len(x) / (time.perf_counter() - start))
            outputs[key] = (np.concatenate(probs), np.concatenate(drift))
    for key, engine in engines.items():
        row: dict[str, Any] = {"runtime": engine.runtime, "precision": engine.precision, "device": engine.device,
                               "images_per_second": round(max(speeds[key]), 2),
                               "images_per_second_passes": [round(s, 2) for s in speeds[key]]}
        if ref is not None and decide is not None:
            _, drift_on_drift = _outputs(engine, ref["drift_images"])
            row.update(evaluate_candidate(*outputs[key], drift_on_drift, ref, decide))
        else:
            row["accepted"] = engine.precision == "fp32"
        results[key] = row
    accepted = {k: r for k, r in results.items() if r.get("accepted")}
    if not accepted:
        raise rt.RuntimeUnavailable(f"{model_path}: no runtime passed the checks: "
                                    + "; ".join(f"{k}: {r.get('refused')}" for k, r in results.items()))
    best = max(accepted, key=lambda k: accepted[k]["images_per_second"])
    info = machine()
    record = {
        "format": FORMAT,
        "chosen": {"runtime": results[best]["runtime"], "precision": results[best]["precision"],
                   "device": results[best]["device"], "images_per_second": results[best]["images_per_second"]},
        "machine": info, "machine_key": machine_key(info, threads, device), "threads": threads, "device": device,
        "batch_size": BATCH, "rules": {"max_accuracy_drop": MAX_ACCURACY_DROP,
                                       "max_decisions_changed": MAX_DECISION_CHANGE,
                                       "max_drift_auroc_drop": MAX_DRIFT_AUROC_DROP},
        "candidates": results,
        "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    log.info("%s: %s", model_path.name, summary(record))
    return record


def summary(record: dict[str, Any]) -> str:
    """One line: every candidate's speed (and why it was refused), then the choice."""
    parts = [f"{k} {r.get('images_per_second', '-')}/s" + ("" if r.get("accepted") else f" (refused: {r['refused']})")
             for k, r in record["candidates"].items()]
    chosen = record["chosen"]
    return f"{', '.join(parts)} -> {chosen['runtime']} {chosen['precision']} ({chosen['device']})"


# ------------------------------------------------------------------------------------------- records

def recorded(model_path: str | Path, threads: int, device: str) -> dict[str, Any] | None:
    """The selection recorded for this machine (sidecar first, then the cache file), or None."""
    key = machine_key(machine(), threads, device)
    sidecar = md.sidecar_path(model_path)
    for path, pick in ((sidecar, lambda d: d.get(SELECTION_KEY)),
                       (cache_path(model_path), lambda d: d.get("machines", {}).get(key))):
        try:
            record = pick(json.loads(Path(path).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(record, dict) and record.get("machine_key") == key and record.get("format") == FORMAT:
            return record
    return None


def remember(model_path: str | Path, record: dict[str, Any]) -> Path | None:
    """Add ``record`` to the cache file beside the model (best effort: a read-only folder only logs)."""
    path = cache_path(model_path)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data.setdefault("machines", {})[record["machine_key"]] = record
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot record the runtime choice in %s (%s); it will be measured again next start", path, exc)
        return None
    return path


def resolve(model_path: str | Path, runtime: str, precision: str, *, device: str = "cpu",
            threads: int | None = None, decide: Any = None) -> tuple[str, str, dict[str, Any] | None]:
    """(runtime, precision, selection record or None) for the requested values, ``auto`` resolved.

    ``runtime='openvino', precision='auto'`` picks the best accepted precision of OpenVINO, and so on.
    """
    if runtime != "auto" and precision != "auto":
        return runtime, precision, None
    threads = threads or os.cpu_count() or 1
    record = recorded(model_path, threads, device)
    if record is None:
        record = select(model_path, device=device, threads=threads, decide=decide)
        remember(model_path, record)
    ok = {k: r for k, r in record["candidates"].items() if r.get("accepted")
          and runtime in ("auto", r["runtime"]) and precision in ("auto", r["precision"])}
    if not ok:
        raise rt.RuntimeUnavailable(f"{model_path}: no accepted candidate for runtime {runtime}, precision "
                                    f"{precision} on this machine (see {cache_path(model_path).name})")
    best = ok[max(ok, key=lambda k: ok[k]["images_per_second"])]
    return best["runtime"], best["precision"], record
