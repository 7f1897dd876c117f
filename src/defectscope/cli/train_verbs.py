"""Verbs that make models: ``train``, ``tune``, ``ensemble``, ``demo``, and ``models`` (what ``--model`` takes)."""

from __future__ import annotations

import argparse

from defectscope.cli.options import (
    add_manifest_options,
    add_set_option,
    add_split_options,
    data_overrides,
    minutes,
    set_overrides,
)


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a classifier and write a run directory")
    t.add_argument("--data", help="class-per-folder tree, CSV manifest, or 'elpv'")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--config", help="YAML config file (sections data, model, augment, train; seed)")
    t.add_argument("--model", help="architecture: any timm name or seed_cnn1/2/3 (see `defectscope models`; "
                                   "default tf_efficientnet_lite0)")
    t.add_argument("--pretrained", help="auto | none | package | hub[:name] | path to a weights file")
    t.add_argument("--image-size", type=int, help="input size in pixels (default 160)")
    t.add_argument("--epochs", type=int, help="most fine-tuning epochs (default 12; early stopping after 3 "
                                              "without a better validation macro-F1, train.patience)")
    t.add_argument("--batch-size", type=int, help="images per step (default 32)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 0.001, cosine schedule)")
    t.add_argument("--seed", type=int, help="seed of the split and of training (default 0)")
    add_split_options(t)
    t.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable or missing files, listing each in RUN/skipped.csv")
    t.add_argument("--min-class-images", type=int, metavar="N",
                   help="refuse a class with fewer images than N, often a mistyped label (default 5; 1 accepts any)")
    t.add_argument("--trust-pickle", action="store_true", default=None,
                   help="allow reading WM-811K's LSWMD.pkl (unpickling runs code from the file)")
    t.add_argument("--preset", help="named settings applied before --config: elpv, wafer "
                                    "(auto for 'elpv' and for wafer-map data)")
    add_set_option(t, "any config key, e.g. --set train.loss=focal --set augment.hflip=true")
    t.add_argument("--recipe", choices=["finetune", "frozen", "auto"],
                   help="finetune (default), frozen (fixed pretrained features + kernel head, seconds to fit), "
                        "auto (frozen, then fine-tune in the budget left, keep the better on validation)")
    t.add_argument("--budget", help="training time budget, e.g. 15m, 900s or 1h; alone it implies --recipe auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    add_manifest_options(t)
    add_distributed_options(t)
    t.set_defaults(handler=run_train)


def add_distributed_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--nproc", type=int, help="train with N processes on this machine (DistributedDataParallel "
                   "under torchrun: one per GPU, or CPU cores shared); for several machines run "
                   "`torchrun ... -m defectscope train ...` (README: More than one machine)")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: times torchrun starts the job again after a process dies; it resumes "
                        "from the last checkpoint (default 0)")


def _launch(args: argparse.Namespace) -> int | None:
    """Under ``--nproc N`` (N > 1, not already under torchrun): run this command under torchrun, its exit code."""
    from defectscope.errors import UsageError

    if args.nproc is None or args.nproc == 1:
        return None
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: give a number of processes of at least 1")
    from defectscope.training import distributed

    if distributed.under_torchrun():
        return None
    argv = distributed.strip_option(args.argv, ["--nproc", "--max-restarts"])
    return distributed.launch(args.nproc, argv, max_restarts=args.max_restarts)


def run_train(args: argparse.Namespace) -> int:
    launched = _launch(args)
    if launched is not None:
        return launched
    from defectscope.training.train import train

    overrides = {
        "model.name": args.model, "model.pretrained": args.pretrained,
        "model.image_size": args.image_size, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.lr": args.lr, "seed": args.seed,
        **data_overrides(args),
        "data.skip_bad": args.skip_bad, "data.min_class_images": args.min_class_images,
        "data.trust_pickle": args.trust_pickle,
    }
    if args.no_progress:
        overrides["train.progress"] = False
    if args.budget is not None:
        overrides["train.time_limit_minutes"] = minutes(args.budget)
    if args.recipe or args.budget is not None:
        overrides["train.recipe"] = args.recipe or "auto"
    overrides.update(set_overrides(args.set))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.resume:
        train(out=args.out, resume=True)
    else:
        train(args.data, args.out, config_file=args.config, preset=args.preset, **overrides)
    return 0


def add_tune(sub: argparse._SubParsersAction) -> None:
    tu = sub.add_parser("tune", help="search recipes and hyperparameters (Optuna) within a time budget; the best "
                                     "trial becomes OUT/best")
    tu.add_argument("--data", required=True, help="class-per-folder tree, CSV manifest, or 'elpv'")
    tu.add_argument("--out", required=True, help="study folder: study.db, trials/, best/, tune.json")
    tu.add_argument("--budget", required=True, help="wall time of the whole study, e.g. 60m, 3600s or 1h; "
                                                    "re-running the command resumes with what is left")
    tu.add_argument("--trials", type=int, help="stop after this many finished trials (counting earlier runs)")
    tu.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db, one process); "
                                      "postgresql://user@host/db: any number of workers on one study")
    tu.add_argument("--study-name", "--study", dest="study_name",
                    help="name of the study in the storage (default defectscope-tune)")
    tu.add_argument("--heartbeat", type=int, default=60, help="seconds between a shared study's trial heartbeats; "
                                                              "a trial silent for 3 is failed and retried")
    tu.add_argument("--space", help="YAML search space: {config.key: [choices] or {low, high, log}, views: [...]}")
    tu.add_argument("--pruner", default="hyperband", choices=["hyperband", "halving", "none"])
    tu.add_argument("--seed", type=int, default=0, help="sampler seed and every trial's seed (one split for all)")
    tu.add_argument("--config", help="YAML base config the trials start from")
    tu.add_argument("--preset", help="named settings applied before --config: elpv, wafer")
    tu.add_argument("--epochs", type=int, help="most epochs of a fine-tuning trial (Hyperband's largest resource)")
    add_split_options(tu)
    add_set_option(tu, "any config key of the base config, e.g. --set data.fractions=[0.6,0.2,0.2]")
    tu.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    add_manifest_options(tu)
    tu.set_defaults(handler=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from defectscope.training.tune import tune

    overrides = {"train.epochs": args.epochs, **data_overrides(args),
                 "train.progress": False if args.no_progress else None}
    overrides.update(set_overrides(args.set))
    space = None
    if args.space:
        from defectscope.config import load_yaml

        space = load_yaml(args.space)
    run = tune(args.data, args.out, budget_minutes=minutes(args.budget), n_trials=args.trials,
               storage=args.storage, study_name=args.study_name, seed=args.seed, space=space,
               config_file=args.config, preset=args.preset, pruner=args.pruner,
               heartbeat_seconds=args.heartbeat,
               **{k: v for k, v in overrides.items() if v is not None})
    print(f"best trial: {run.path}  (all trials: {args.out}/tune.json)")
    return 0


def add_ensemble(sub: argparse._SubParsersAction) -> None:
    en = sub.add_parser("ensemble", help="combine finished runs on one split into one run that averages their "
                                         "class probabilities (exported as one ONNX graph)")
    en.add_argument("runs", nargs="+", help="two or more run directories with the same classes, input and split "
                                            "(e.g. frozen runs of different backbones, or fine-tunes with "
                                            "--set train.init_seed=1, 2, ...)")
    en.add_argument("--out", required=True, help="run directory to create")
    en.set_defaults(handler=run_ensemble)


def run_ensemble(args: argparse.Namespace) -> int:
    from defectscope.training.ensemble import ensemble

    out = ensemble(args.runs, args.out)
    print(f"ensemble of {len(args.runs)} runs written to {out}")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the main job: train, evaluate on the real ELPV solar-cell images")
    d.add_argument("--out", default="defectscope_demo", help="folder for the demo's run (default: defectscope_demo)")
    d.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    d.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from defectscope.demo import demo

    demo(args.out, epochs=args.epochs)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list architectures the factory accepts")
    m.add_argument("pattern", nargs="?", help="glob filter, e.g. '*resnet*'")
    m.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    from defectscope.models.factory import list_models

    print("\n".join(list_models(args.pattern)))
    return 0
