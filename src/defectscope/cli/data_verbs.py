"""Verbs about datasets: ``audit`` and the ``wafer`` tools (convert WM-811K, write synthetic maps)."""

from __future__ import annotations

import argparse
import sys

from defectscope.cli.options import add_manifest_options


def add_audit(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("audit", help="audit a dataset: counts, sizes, duplicates, leakage, metadata, suspect labels")
    a.add_argument("data", help="class-per-folder tree, CSV manifest, LSWMD.pkl or 'elpv'")
    a.add_argument("--out", required=True, help="folder for audit.json, audit.html and the CSV lists")
    a.add_argument("--split-column", help="manifest column holding a predefined train/val/test split")
    a.add_argument("--trust-pickle", action="store_true", help="allow reading WM-811K's LSWMD.pkl")
    a.add_argument("--features", default="auto", choices=["auto", "pretrained", "pixels"],
                   help="feature space for the suspect-label check (auto: pretrained if installed)")
    a.add_argument("--k", type=int, default=5, help="neighbours for the suspect-label check")
    a.add_argument("--near-phash", type=int, default=4, help="pHash bits (of 64) for a near duplicate")
    a.add_argument("--near-dhash", type=int, default=8, help="dHash bits (of 64) for a near duplicate")
    add_manifest_options(a)
    a.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from defectscope.audit.core import AuditSettings, audit

    options = {k: getattr(args, k) for k in ("image_root", "path_column", "label_column", "split_column",
                                         "label_conflicts") if getattr(args, k) is not None}
    settings = AuditSettings(features=args.features, k=args.k, near_phash=args.near_phash,
                             near_dhash=args.near_dhash)
    result = audit(args.data, args.out, settings=settings, trust_pickle=args.trust_pickle, **options)
    print("\n".join(result["summary"]))
    print(f"report: {args.out}/audit.html", file=sys.stderr)
    return 0


def add_wafer(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("wafer", help="wafer-map tools: convert WM-811K, write synthetic maps")
    w_sub = w.add_subparsers(dest="wafer_command", required=True)
    wc = w_sub.add_parser("convert", help="LSWMD.pkl -> one .npz per map + manifest.csv (read without trust)")
    wc.add_argument("pickle", help="WM-811K LSWMD.pkl")
    wc.add_argument("--out", required=True, help="folder to write maps/, manifest.csv, unlabelled.csv")
    wc.add_argument("--trust-pickle", action="store_true", help="required: unpickling runs code from the file")
    wc.set_defaults(handler=run_wafer_convert)
    ws = w_sub.add_parser("synth", help="SYNTHETIC maps of the 8 WM-811K patterns + none, with manifest.csv")
    ws.add_argument("--out", required=True)
    ws.add_argument("--per-class", type=int, default=100)
    ws.add_argument("--seed", type=int, default=0)
    ws.set_defaults(handler=run_wafer_synth)


def run_wafer_convert(args: argparse.Namespace) -> int:
    from defectscope.data.wm811k import convert_lswmd

    conv = convert_lswmd(args.pickle, args.out, trust_pickle=args.trust_pickle)
    print(f"{conv.labelled} labelled maps -> {conv.manifest}; {conv.unlabelled} unlabelled -> "
          f"{conv.out}/unlabelled.csv; {len(conv.skipped)} skipped -> {conv.out}/skipped.csv")
    return 0


def run_wafer_synth(args: argparse.Namespace) -> int:
    from defectscope.data.wafer_synth import generate_dataset

    manifest = generate_dataset(args.out, per_class=args.per_class, seed=args.seed)
    print(f"SYNTHETIC wafer maps written; manifest: {manifest}")
    return 0
