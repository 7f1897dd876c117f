"""``export``: a run -> a self-describing ONNX model the line runs without PyTorch."""

from __future__ import annotations

import argparse


def add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="write a self-describing ONNX model (+ JSON sidecar) and check it")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", "-o", help="output .onnx file (default: RUN/export/model.onnx)")
    x.add_argument("--quantize", choices=["dynamic", "static"], help="also measure an int8 model")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--no-int8", action="store_true", help="do not write the int8 model beside the fp32 one")
    x.add_argument("--no-select", action="store_true",
                   help="do not measure the runtimes here (a line PC then measures at its first start)")
    x.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from defectscope.onnx_export.exporter import export

    out = args.out or Path(args.run) / "export" / "model.onnx"
    export(args.run, out, quantize=args.quantize, opset=args.opset, int8=not args.no_int8,
           select=not args.no_select)
    return 0
