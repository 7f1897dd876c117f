"""Verbs that measure a run: ``evaluate`` (its test split or other labelled images) and ``drift-eval``."""

from __future__ import annotations

import argparse

from defectscope.cli.options import add_manifest_options


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="score a run on its test split or on other labelled images")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="evaluate on this dataset instead of the run's test split")
    e.add_argument("--split", default="test", help="which split of the run's table (default: test)")
    e.add_argument("--out", help="output folder (default: RUN/evaluation)")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable or missing files")
    e.add_argument("--no-report", action="store_true", help="metrics only, no report.html")
    e.add_argument("--trust-pickle", action="store_true", help="allow reading WM-811K's LSWMD.pkl as --data")
    add_manifest_options(e)
    e.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from defectscope.evaluation.evaluate import evaluate

    # The manifest flags describe --data; the run's own table needs none.
    options = {k: getattr(args, k) for k in ("image_root", "path_column", "label_column", "label_conflicts")
               if getattr(args, k) is not None and args.data}
    if args.trust_pickle:
        options["trust_pickle"] = True
    evaluate(args.run, args.data, split=args.split, out=args.out, skip_bad=args.skip_bad,
             report=not args.no_report, **options)
    return 0


def add_drift_eval(sub: argparse._SubParsersAction) -> None:
    de = sub.add_parser("drift-eval", help="measure how well Drift scores flag images unlike training")
    de.add_argument("run", help="run directory")
    de.add_argument("--kinds", default="corruptions,far",
                    help="comma-separated: corruptions, far, heldout_class, group (the last two retrain)")
    de.add_argument("--extra-drift", help="a folder of real Drift examples, evaluated as its own kind")
    de.add_argument("--group-column", help="with kind 'group': metadata column, e.g. type")
    de.add_argument("--train-value", help="with kind 'group': the value to train on, e.g. mono")
    de.add_argument("--heldout-epochs", type=int, default=3, help="epochs for the retrained held-out models")
    de.add_argument("--out", help="output JSON (default RUN/drift_eval.json)")
    de.add_argument("--no-patch", action="store_true",
                    help="leave out the patch score (per-position Gaussians of the feature maps)")
    de.add_argument("--max-members", type=int, default=2,
                    help="fused candidates: the max of up to this many standardised scores (1: none)")
    de.set_defaults(handler=run_drift_eval)


def run_drift_eval(args: argparse.Namespace) -> int:
    from defectscope.evaluation.drift_eval import drift_eval

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    drift_eval(args.run, kinds=kinds, extra_drift=args.extra_drift, out=args.out,
               group_column=args.group_column, train_value=args.train_value,
               heldout_epochs=args.heldout_epochs, patch=not args.no_patch, max_members=args.max_members)
    return 0
