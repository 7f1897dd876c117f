"""Static int8 variants of an export on this CPU: does any pass the runtime's acceptance test and beat fp32?

For each variant of :class:`defectscope.onnx_export.quantize.StaticSettings` (7-bit weights against the U8S8
saturation of CPUs without VNNI, U8U8 / S8S8, the last convolutions before the pooled features kept in float,
MinMax / Percentile / Entropy calibration, more calibration images), the export's backbone stage is quantized
(``--layout staged``, the views batched as one call, the head in fp32) or its whole graph (``--layout full``)
and run on the export's check set (``model.check.npz``) in ONNX Runtime (and OpenVINO, ``--openvino``):

  accuracy, decisions differing from fp32 (the model's policy), the verdict of
  :func:`defectscope.runtime.acceptance.check` (what ``--runtime auto`` requires), and images/s batched
  (``--batch`` images per call, ``--threads`` threads) interleaved with ONNX Runtime fp32 on the whole graph
  (the line's reference) over ``--passes`` passes: the ratio of medians is the figure to trust on a shared
  machine, ``uptime`` is recorded before and after.

Calibration images are the run's training images (the export's parent run), sampled as export does.

    python bench/int8.py --export /work/runs/demo/run/export
    python bench/int8.py --export EXPORT --variants baseline tail1_rr --openvino --passes 7
    python bench/int8.py --variants nncf nncf_overflow_fix --openvino   # after pip install nncf
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from defectscope.onnx_export.quantize import StaticSettings  # noqa: E402

S = StaticSettings
VARIANTS: dict[str, tuple[StaticSettings, int]] = {  # name -> (settings, calibration images)
    "baseline": (S(), 128),
    "reduce_range": (S(reduce_range=True), 128),
    "u8u8": (S(weights="uint8"), 128),
    "s8s8": (S(activations="int8"), 128),
    "tail1": (S(float_tail=1), 128),
    "tail1_rr": (S(float_tail=1, reduce_range=True), 128),
    "tail2_rr": (S(float_tail=2, reduce_range=True), 128),
    "tail1_rr_percentile": (S(float_tail=1, reduce_range=True, method="percentile"), 128),
    "tail1_rr_entropy": (S(float_tail=1, reduce_range=True, method="entropy"), 128),
    "tail1_rr_512": (S(float_tail=1, reduce_range=True), 512),
}
# NNCF's post-training quantization of the backbone stage (ONNX backend, QDQ file; fast bias correction),
# without and with its overflow fix (7-bit weights everywhere: the U8S8 saturation of CPUs without VNNI).
# Calibrated on every view of the calibration images, as the line sends them. Needs ``pip install nncf``.
NNCF_VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "nncf": ({}, 128),
    "nncf_overflow_fix": ({"overflow_fix": True}, 128),
    "nncf_overflow_fix_512": ({"overflow_fix": True}, 512),
    "nncf_overflow_fix_tail1": ({"overflow_fix": True, "float_tail": 1}, 128),
    "nncf_overflow_fix_tail3": ({"overflow_fix": True, "float_tail": 3}, 128),
    "nncf_overflow_fix_full_bias": ({"overflow_fix": True, "full_bias_correction": True}, 128),
    "nncf_overflow_fix_depthwise_float": ({"overflow_fix": True, "depthwise_float": True}, 128),
    "nncf_overflow_fix_full_bias_depthwise_float": ({"overflow_fix": True, "full_bias_correction": True,
                                                     "depthwise_float": True}, 128),
    "nncf_overflow_fix_depthwise_float_512": ({"overflow_fix": True, "depthwise_float": True}, 512),
    "nncf_overflow_fix_depthwise_float_tail3": ({"overflow_fix": True, "depthwise_float": True, "float_tail": 3},
                                                128),
}
SPEED_TARGET = 1.5


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def calibration_images(run_dir: Path, n: int) -> np.ndarray:
    """``n`` training images of the run as graph inputs, sampled as export samples its calibration set."""
    from defectscope.onnx_export.exporter import _images
    from defectscope.rundir import Run

    run = Run(run_dir)
    return _images(run, "train", n, seed=run.spec.get("seed") or 0)[0]


def workspace(export: Path, tmp: Path) -> Path:
    """A folder of links to the export's files, so the int8 file a variant writes never lands in the export."""
    for f in export.iterdir():
        if f.is_file() and ".int8." not in f.name:
            (tmp / f.name).symlink_to(f.resolve())
    return tmp / "model.onnx"


def nncf_quantize(src: Path, dst: Path, images: np.ndarray, views: list[int], *,
                  overflow_fix: bool = False, float_tail: int = 0,
                  full_bias_correction: bool = False, depthwise_float: bool = False) -> dict[str, Any]:
    """The backbone stage ``src`` quantized by NNCF into the QDQ file ``dst``, calibrated on every view;
    ``float_tail``: the last convolutions before the pooled features left in float (an ignored scope)."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from defectscope.onnx_export.quantize import _name_nodes_and_find_head
    from defectscope.runtime import staged

    named = dst.with_name(dst.stem + ".named.onnx")
    kept = _name_nodes_and_find_head(src, named, float_tail)
    if depthwise_float:  # depthwise convolutions (group > 1) in float: the usual int8 loss of MobileNet-like nets
        graph = onnx.load(str(named)).graph
        kept += [n.name for n in graph.node if n.op_type == "Conv" and n.name not in kept
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    x = np.ascontiguousarray(np.concatenate([staged.view(images, k) for k in views]), dtype=np.float32)
    batches = [x[i:i + 16] for i in range(0, len(x), 16)]
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if overflow_fix else
                                              OverflowFix.FIRST_LAYER)
    quantized = nncf.quantize(onnx.load(str(named)), nncf.Dataset(batches, lambda b: {"image": b}),
                              subset_size=len(x), advanced_parameters=advanced,
                              fast_bias_correction=not full_bias_correction,
                              ignored_scope=nncf.IgnoredScope(names=kept) if kept else None)
    onnx.save(quantized, str(dst))
    named.unlink()
    return {"nncf": nncf.__version__, "calibration_views": len(x), "kept_in_float": len(kept)}


def timed(engine: Any, x: np.ndarray) -> float:
    start = time.perf_counter()
    engine.run(x)
    return len(x) / (time.perf_counter() - start)


def interleaved(engines: dict[str, Any], x: np.ndarray, passes: int) -> dict[str, dict[str, Any]]:
    """images/s of each engine on ``x``, one call each per pass in turn (warm-up call first)."""
    for e in engines.values():
        e.run(x)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(passes):
        for k, e in engines.items():
            rates[k].append(timed(e, x))
    return {k: {"median": statistics.median(v), "passes": [round(r, 2) for r in v]} for k, v in rates.items()}


def evaluate(model: Path, row: dict[str, Any], ref: dict[str, np.ndarray], card: Any, threads: int) -> tuple:
    from defectscope.runtime import acceptance, choice

    engine = choice.engine_for(model, row, threads=threads)
    probs, drift = choice._outputs(engine, ref["images"])
    _, drift_on_drift = choice._outputs(engine, ref["drift_images"])
    test = acceptance.check(probs, drift, drift_on_drift, ref, card.policy, card.classes)
    summary = {k: test.get(k) for k in ("accepted", "refused", "accuracy", "accuracy_fp32", "accuracy_change",
                                        "drift_auroc", "drift_auroc_fp32", "automation", "automation_fp32",
                                        "caps", "max_abs_diff_probabilities")}
    summary["decisions_differing"] = test["differing"]["count"]
    summary["far_flips"] = test["differing"]["far"]
    summary["argmax_differing_from_fp32"] = int((probs.argmax(1) != ref["fp32_probabilities"].argmax(1)).sum())
    return engine, summary


def run_variant(name: str, model: Path, args, ref, card, calib: dict[int, np.ndarray], fp32: Any,
                x: np.ndarray) -> dict[str, Any]:
    from defectscope.onnx_export.quantize import quantize_model
    from defectscope.runtime import engines, staged

    settings, n_cal = VARIANTS[name] if name in VARIANTS else NNCF_VARIANTS[name]
    if n_cal not in calib:
        calib[n_cal] = calibration_images(args.run, n_cal)
    staged_layout = args.layout == "staged" or name in NNCF_VARIANTS
    src = staged.backbone_path(model) if staged_layout else model
    dst = staged.backbone_path(model, "int8") if staged_layout else engines.variant_path(model, "int8")
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    if name in NNCF_VARIANTS:
        report = nncf_quantize(src, dst, calib[n_cal], list(card.spec.get("views") or [0]), **settings)
        out: dict[str, Any] = {"settings": {"nncf": True, **settings}, "calibration_images": n_cal,
                               "kept_in_float": report["kept_in_float"]}
    else:
        report = quantize_model(src, dst, "static", calib[n_cal], settings=settings)
        out = {"settings": settings.as_dict(), "calibration_images": n_cal, "kept_in_float": report["kept_in_float"]}
    out.update({"quantize_seconds": round(time.perf_counter() - start, 1), "runtimes": {}})
    views = len(card.spec.get("views") or [0])
    rows = {"onnxruntime": {"runtime": "onnxruntime", "precision": "int8"}}
    if args.openvino:
        rows["openvino"] = {"runtime": "openvino", "precision": "int8"}
    for runtime, row in rows.items():
        if staged_layout:
            row = {**row, "layout": "staged", "views": views}
        try:
            engine, summary = evaluate(model, row, ref, card, args.threads)
        except Exception as exc:  # a runtime that cannot read the file is a result, not a crash
            out["runtimes"][runtime] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        speed = interleaved({"fp32": fp32, "int8": engine}, x, args.passes)
        summary.update({"images_per_s": round(speed["int8"]["median"], 2),
                        "fp32_images_per_s": round(speed["fp32"]["median"], 2),
                        "ratio_vs_ort_fp32": round(speed["int8"]["median"] / speed["fp32"]["median"], 3),
                        "passes": speed})
        summary["wins"] = bool(summary["accepted"]) and summary["ratio_vs_ort_fp32"] >= SPEED_TARGET
        out["runtimes"][runtime] = summary
        del engine
        print(f"{name} {runtime}: acc {summary['accuracy']:.4f} (fp32 {summary['accuracy_fp32']:.4f}) "
              f"differing {summary['decisions_differing']} accepted {summary['accepted']} "
              f"ratio {summary['ratio_vs_ort_fp32']}  [{summary.get('refused') or ''}]", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("/work/runs/demo/run/export"))
    ap.add_argument("--run", type=Path, help="the run the export came from (default: the export's parent)")
    ap.add_argument("--layout", choices=("staged", "full"), default="staged")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS) + list(NNCF_VARIANTS),
                    default=list(VARIANTS))
    ap.add_argument("--openvino", action="store_true", help="also run each QDQ file in OpenVINO")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "int8.json")
    args = ap.parse_args(argv)
    args.run = args.run or args.export.parent

    from defectscope.runtime import choice, engines

    results: dict[str, Any] = {"export": str(args.export), "layout": args.layout, "batch": args.batch,
                               "threads": args.threads, "passes": args.passes, "speed_target": SPEED_TARGET,
                               "machine": choice.machine(), "uptime_before": uptime(),
                               "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        model = workspace(args.export, Path(tmp))
        ref, card = choice.load_reference(model), engines.read_card(model)
        fp32 = choice.engine_for(model, {"runtime": "onnxruntime", "precision": "fp32"}, threads=args.threads)
        x = choice._inputs(ref["images"][:args.batch])
        calib: dict[int, np.ndarray] = {}
        for name in args.variants:
            results["variants"][name] = run_variant(name, model, args, ref, card, calib, fp32, x)
            results["uptime_after"] = uptime()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")  # partial results survive
    winners = [f"{n} {r}" for n, v in results["variants"].items() for r, s in v["runtimes"].items()
               if s.get("wins")]
    print("winners:", winners or "none", "| os.cpu_count", os.cpu_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
