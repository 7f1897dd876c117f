"""Which convolutions of the backbone stage lose most in int8 (NNCF, run in OpenVINO), and what keeping the
most sensitive ones in float buys and costs.

Each convolution alone is kept in float and the stage's probability error against fp32 (mean L1 over the
classes, the model's views, the fp32 head) is measured on the run's **val** split (256 images), not on the
check set the acceptance test uses; then the top-k (1, 2, 3, 5, 8) by that ranking are kept in float together
and judged by the acceptance test on the check set, with images/s interleaved with ONNX Runtime fp32 on the
whole graph (batch 32, 2 threads). Needs ``pip install nncf``.

    python bench/int8_sensitivity.py --export EXPORT   -> bench/results/int8_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import int8 as bench_int8  # noqa: E402

TOP_K = (1, 2, 3, 5, 8)
VAL_IMAGES = 256


def quantize(src: Path, dst: Path, images: np.ndarray, views: list[int], float_convs: list[str]) -> None:
    """NNCF's defaults (as export), with the head, the Drift score and ``float_convs`` left in float."""
    import nncf
    import onnx

    from defectscope.onnx_export.backbone_int8 import _view_batches
    from defectscope.onnx_export.quantize import _name_nodes_and_find_head

    named = dst.with_name(dst.stem + ".named.onnx")
    kept = _name_nodes_and_find_head(src, named, 0) + list(float_convs)
    batches = _view_batches(images, views)
    quantized = nncf.quantize(onnx.load(str(named)), nncf.Dataset(batches, lambda b: {"image": b}),
                              subset_size=sum(len(b) for b in batches), ignored_scope=nncf.IgnoredScope(names=kept))
    onnx.save(quantized, str(dst))
    named.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("/work/runs/demo/run/export"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "int8_sensitivity.json")
    args = ap.parse_args(argv)

    import nncf
    import onnx

    from defectscope.onnx_export.exporter import _images
    from defectscope.onnx_export.quantize import _name_nodes_and_find_head
    from defectscope.rundir import Run
    from defectscope.runtime import acceptance, choice, engines, staged

    out: dict[str, Any] = {"machine": choice.machine(), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "uptime_before": bench_int8.uptime(),
                           "nncf": nncf.__version__, "val_images": VAL_IMAGES}
    with tempfile.TemporaryDirectory(prefix="int8-sensitivity-") as tmp:
        model = bench_int8.workspace(args.export, Path(tmp))
        ref, card = choice.load_reference(model), engines.read_card(model)
        model_views = list(card.spec.get("views") or [0])
        views = staged.line_views(model_views, len(model_views))
        calib = bench_int8.calibration_images(args.export.parent, 128)
        x_val, y_val = _images(Run(args.export.parent), "val", VAL_IMAGES, seed=1)
        head = staged.OrtStage(staged.head_path(model), 2)
        p32 = staged.StagedEngine(staged.OvStage(staged.backbone_path(model), "f32", 2), head, views).run(x_val)[0]
        named = Path(tmp) / "named.onnx"
        _name_nodes_and_find_head(staged.backbone_path(model), named, 0)
        convs = [n.name for n in onnx.load(str(named)).graph.node if n.op_type == "Conv"]
        dst = staged.backbone_path(model, "int8")

        def val_error(float_convs: list[str]) -> tuple[float, float, Any]:
            dst.unlink(missing_ok=True)
            quantize(staged.backbone_path(model), dst, calib, model_views, float_convs)
            engine = staged.StagedEngine(staged.OvStage(dst, "f32", 2), head, views)
            p = engine.run(x_val)[0]
            return float(np.abs(p - p32).sum(1).mean()), float((p.argmax(1) == y_val).mean()), engine

        base, base_acc, _ = val_error([])
        out.update({"val_error_all_int8": base, "val_accuracy_all_int8": base_acc,
                    "val_accuracy_fp32": float((p32.argmax(1) == y_val).mean()), "val_error_one_float": {}})
        for conv in convs:
            out["val_error_one_float"][conv] = round(val_error([conv])[0], 5)
            print(conv, out["val_error_one_float"][conv], flush=True)
        order = sorted(convs, key=lambda c: out["val_error_one_float"][c])
        out["ranking"] = order[:max(TOP_K)]
        fp32 = choice.engine_for(model, {"runtime": "onnxruntime", "precision": "fp32"}, threads=2)
        x = choice._inputs(ref["images"][:32])
        out["top_k_in_float"] = {}
        for k in TOP_K:
            err, acc, engine = val_error(order[:k])
            probs, drift = choice._outputs(engine, ref["images"])
            _, drift_on_drift = choice._outputs(engine, ref["drift_images"])
            test = acceptance.check(probs, drift, drift_on_drift, ref, card.policy, card.classes)
            speed = bench_int8.interleaved({"fp32": fp32, "int8": engine}, x, 5)
            out["top_k_in_float"][k] = {
                "val_error": err, "val_accuracy": acc, "accuracy": test["accuracy"],
                "accuracy_fp32": test["accuracy_fp32"], "automation": test["automation"],
                "automation_fp32": test["automation_fp32"], "caps": test.get("caps"), "accepted": test["accepted"],
                "refused": test.get("refused"), "images_per_s": round(speed["int8"]["median"], 2),
                "ratio_vs_ort_fp32": round(speed["int8"]["median"] / speed["fp32"]["median"], 3)}
            print("top", k, out["top_k_in_float"][k], flush=True)
            out["uptime_after"] = bench_int8.uptime()
            args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
