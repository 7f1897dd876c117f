"""The ``defectscope`` command: each verb calls one public function of the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", help="folder a CSV manifest's file names are relative to (default: the CSV's)")
    p.add_argument("--path-column", help="manifest column with the image file name (auto-detected)")
    p.add_argument("--label-column", help="manifest column with the class label (auto-detected)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope",
        description="Automatic defect classification for inspection images: train, evaluate, calibrate, demo.",
    )
    parser.add_argument("--version", action="version", version=f"defectscope {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier and write a run directory")
    t.add_argument("--data", help="class-per-folder tree, CSV manifest, or 'elpv'")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--config", help="YAML config file (sections data, model, augment, train; seed)")
    t.add_argument("--model", help="architecture: any timm name or seed_cnn1/2/3 (see `defectscope models`)")
    t.add_argument("--pretrained", help="auto | none | package | hub[:name] | path to a weights file")
    t.add_argument("--image-size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--split-column", help="manifest column holding a predefined train/val/test split")
    t.add_argument("--group-column", help="keep rows sharing this column's value in one split")
    t.add_argument("--stratify", help="extra metadata columns to stratify the split by, comma-separated")
    t.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable or missing files, listing each in RUN/skipped.csv")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set train.loss=focal --set augment.hflip=true")
    t.add_argument("--recipe", choices=["finetune", "frozen", "auto"],
                   help="finetune (default), frozen (fixed pretrained features + kernel head, seconds to fit), "
                        "auto (frozen, then fine-tune in the budget left, keep the better on validation)")
    t.add_argument("--budget", help="training time budget, e.g. 15m, 900s or 1h; alone it implies --recipe auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    _add_manifest_options(t)

    e = sub.add_parser("evaluate", help="score a run on its test split or on other labelled images")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="evaluate on this dataset instead of the run's test split")
    e.add_argument("--split", default="test", help="which split of the run's table (default: test)")
    e.add_argument("--out", help="output folder (default: RUN/evaluation)")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable or missing files")
    e.add_argument("--no-report", action="store_true", help="metrics only, no report.html")
    _add_manifest_options(e)

    c = sub.add_parser("calibrate", help="set the decision policy (escape cap, costs, review band) -> RUN/policy.json")
    c.add_argument("run", help="run directory")
    c.add_argument("--good-class", help="the class that means a part passes (default: a class named GOOD)")
    c.add_argument("--max-escape", type=float, help="cap on defective parts passed as good, e.g. 0.01")
    c.add_argument("--confidence", type=float, default=0.95, help="confidence of the escape guarantee (0.95)")
    c.add_argument("--cost-matrix", help="valeo_pwa or a YAML file {classes: [...], costs: [[...]]}")
    c.add_argument("--review-rate", type=float, help="send this share of least-confident images to REVIEW")
    c.add_argument("--target-purity", type=float, help="or: review until auto-decided accuracy reaches this")
    c.add_argument("--review-score", default="top", choices=["top", "margin"],
                   help="confidence measure for the review band")
    c.add_argument("--drift-rate", type=float, default=0.01,
                   help="share of normal images the Drift flag may catch (default 0.01)")
    c.add_argument("--drift-score", choices=["msp", "energy", "mahalanobis", "knn"],
                   help="Drift score (default: the best in RUN/drift_eval.json, else mahalanobis)")
    c.add_argument("--drift-examples", help="folder of real Drift images (with a cost matrix that has Drift)")
    c.add_argument("--no-drift", action="store_true", help="no Drift flag in the policy")

    x = sub.add_parser("export", help="write a self-describing ONNX model (+ JSON sidecar) and check it")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", "-o", required=True, help="output .onnx file, e.g. RUN/export/model.onnx")
    x.add_argument("--quantize", choices=["dynamic", "static"], help="also measure an int8 model")
    x.add_argument("--opset", type=int, default=17)

    pr = sub.add_parser("predict", help="classify images with an exported model (no PyTorch needed)")
    pr.add_argument("model", help="exported .onnx file")
    pr.add_argument("images", nargs="+", help="image files and/or folders")
    pr.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    pr.add_argument("--format", default="jsonl", choices=["csv", "json", "jsonl"])
    pr.add_argument("--out", help="write here instead of the terminal")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--threads", type=int, help="inference threads (default: the cores not decoding)")

    so = sub.add_parser("sort", help="file every image of an inbox into OUT/<decision>/ and log each decision")
    so.add_argument("model", help="exported .onnx file")
    so.add_argument("--inbox", required=True, help="folder where new images arrive")
    so.add_argument("--out", required=True, help="folder that receives OUT/<decision>/ sub-folders")
    how = so.add_mutually_exclusive_group()
    how.add_argument("--move", dest="mode", action="store_const", const="move", help="move files (default)")
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy, leave the inbox as is")
    so.add_argument("--watch", action="store_true", help="keep running and file new images as they arrive")
    so.add_argument("--log", help="results database (default OUT/results.db, SQLite)")
    so.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged before it is taken")
    so.add_argument("--poll", type=float, default=1.0, help="seconds between inbox scans in --watch mode")

    lg = sub.add_parser("log", help="the sorter's results log")
    lg_sub = lg.add_subparsers(dest="log_command", required=True)
    le = lg_sub.add_parser("export", help="write the results log as CSV")
    le.add_argument("db", help="results database (e.g. OUT/results.db)")
    le.add_argument("--out", required=True, help="CSV file to write")

    de = sub.add_parser("drift-eval", help="measure how well Drift scores flag images unlike training")
    de.add_argument("run", help="run directory")
    de.add_argument("--kinds", default="corruptions,far",
                    help="comma-separated: corruptions, far, heldout_class, group (the last two retrain)")
    de.add_argument("--extra-drift", help="a folder of real Drift examples, evaluated as its own kind")
    de.add_argument("--group-column", help="with kind 'group': metadata column, e.g. type")
    de.add_argument("--train-value", help="with kind 'group': the value to train on, e.g. mono")
    de.add_argument("--heldout-epochs", type=int, default=3, help="epochs for the retrained held-out models")
    de.add_argument("--out", help="output JSON (default RUN/drift_eval.json)")

    d = sub.add_parser("demo", help="the main job: train, evaluate on the real ELPV solar-cell images")
    d.add_argument("--out", default="defectscope_demo", help="folder for the demo's run (default: defectscope_demo)")
    d.add_argument("--epochs", type=int, help="override the demo recipe's epochs")

    m = sub.add_parser("models", help="list architectures the factory accepts")
    m.add_argument("pattern", nargs="?", help="glob filter, e.g. '*resnet*'")
    return parser


_USER_ERRORS = {"ExportError", "PretrainedError"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from defectscope import logs  # a submodule, not the package API

    logs.configure_cli_logging()
    # Bars only on a terminal: a CI log or a redirected run gets the logged lines, not bar redraws.
    logs.use_bars(sys.stderr.isatty() and not getattr(args, "no_progress", False))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Errors a user can act on (bad data, config, paths, a failed export check) get one clear line;
        # anything else is a bug and keeps its traceback.
        if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)) or type(exc).__name__ in _USER_ERRORS:
            print(f"defectscope: error: {exc}", file=sys.stderr)
            return 2
        raise


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from defectscope.training.train import train

        overrides = {
            "model.name": args.model, "model.pretrained": args.pretrained,
            "model.image_size": args.image_size, "train.epochs": args.epochs,
            "train.batch_size": args.batch_size, "train.lr": args.lr, "seed": args.seed,
            "data.image_root": args.image_root, "data.path_column": args.path_column,
            "data.label_column": args.label_column, "data.split_column": args.split_column,
            "data.group_column": args.group_column, "data.stratify": args.stratify,
            "data.skip_bad": args.skip_bad,
        }
        if args.no_progress:
            overrides["train.progress"] = False
        if args.budget is not None:
            overrides["train.time_limit_minutes"] = _minutes(args.budget)
        if args.recipe or args.budget is not None:
            overrides["train.recipe"] = args.recipe or "auto"
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key.strip()] = _parse_value(value)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if args.resume:
            train(out=args.out, resume=True)
        else:
            train(args.data, args.out, config_file=args.config, **overrides)
        return 0
    if args.command == "evaluate":
        from defectscope.evaluation.evaluate import evaluate

        options = {k: getattr(args, k) for k in ("image_root", "path_column", "label_column")
                   if getattr(args, k) is not None and args.data}
        evaluate(args.run, args.data, split=args.split, out=args.out, skip_bad=args.skip_bad,
                 report=not args.no_report, **options)
        return 0
    if args.command == "calibrate":
        from defectscope.decision.calibrate import calibrate

        calibrate(args.run, good_class=args.good_class, max_escape=args.max_escape, confidence=args.confidence,
                  cost_matrix=args.cost_matrix, review_rate=args.review_rate, target_purity=args.target_purity,
                  review_score=args.review_score, drift_rate=None if args.no_drift else args.drift_rate,
                  drift_score=args.drift_score, drift_examples=args.drift_examples)
        return 0
    if args.command == "export":
        from defectscope.deploy.export import export

        export(args.run, args.out, quantize=args.quantize, opset=args.opset)
        return 0
    if args.command == "predict":
        from defectscope.deploy.batch import predict
        from defectscope.deploy.predictor import UNREADABLE

        counts = predict(args.model, args.images, recursive=args.recursive, fmt=args.format, out=args.out,
                               batch_size=args.batch_size, threads=args.threads)
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{sum(counts.values())} images: {summary}", file=sys.stderr)
        return 1 if counts.get(UNREADABLE) else 0
    if args.command == "sort":
        from defectscope.deploy.sorter import sort

        summary = sort(args.model, args.inbox, args.out, mode=args.mode or "move", log_path=args.log,
                             watch=args.watch, settle_seconds=args.settle, poll_interval=args.poll)
        return 1 if summary.get("errors") else 0
    if args.command == "log":
        from defectscope.deploy.resultlog import export_log

        n = export_log(args.db, args.out)
        print(f"{n} rows written to {args.out}")
        return 0
    if args.command == "drift-eval":
        from defectscope.evaluation.drift_eval import drift_eval

        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        drift_eval(args.run, kinds=kinds, extra_drift=args.extra_drift, out=args.out,
                   group_column=args.group_column, train_value=args.train_value,
                   heldout_epochs=args.heldout_epochs)
        return 0
    if args.command == "demo":
        from defectscope.demo import demo

        demo(args.out, epochs=args.epochs)
        return 0
    if args.command == "models":
        from defectscope.models.factory import list_models

        print("\n".join(list_models(args.pattern)))
        return 0
    raise AssertionError(args.command)


def _minutes(text: str) -> float:
    """'15m', '900s', '1h' or a bare number of minutes -> minutes."""
    value = text.strip().lower()
    scale = {"s": 1 / 60, "m": 1.0, "h": 60.0}.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        minutes = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"--budget {text!r}: give minutes like 15m, 900s or 1h") from None
    if minutes <= 0:
        raise ValueError(f"--budget {text!r} must be positive")
    return minutes


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _version() -> str:
    from defectscope._version import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
