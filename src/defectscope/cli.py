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
        description="Automatic defect classification for inspection images: train, evaluate, demo.",
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
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    _add_manifest_options(t)

    e = sub.add_parser("evaluate", help="score a run on its test split or on other labelled images")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="evaluate on this dataset instead of the run's test split")
    e.add_argument("--split", default="test", help="which split of the run's table (default: test)")
    e.add_argument("--out", help="output folder (default: RUN/evaluation)")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable or missing files")
    _add_manifest_options(e)

    d = sub.add_parser("demo", help="the main job: train, evaluate on the real ELPV solar-cell images")
    d.add_argument("--out", default="defectscope_demo", help="folder for the demo's run (default: defectscope_demo)")
    d.add_argument("--epochs", type=int, help="override the demo recipe's epochs")

    m = sub.add_parser("models", help="list architectures the factory accepts")
    m.add_argument("pattern", nargs="?", help="glob filter, e.g. '*resnet*'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Errors a user can act on (bad data, config, paths) get one clear line, not a traceback.
        print(f"defectscope: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from defectscope.training.run import train

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
        evaluate(args.run, args.data, split=args.split, out=args.out, skip_bad=args.skip_bad, **options)
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


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _version() -> str:
    from defectscope import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
