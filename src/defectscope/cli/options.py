"""Flags several verbs share, and the parsers of their values (``--set``, ``--budget``, ``--metadata``,
per-class numbers such as ``--reject-purity``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from defectscope.errors import UsageError


def add_manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", help="folder a CSV manifest's file names are relative to (default: the CSV's)")
    p.add_argument("--path-column", help="manifest column with the image file name (auto-detected)")
    p.add_argument("--label-column", help="manifest column with the class label (auto-detected)")
    p.add_argument("--label-conflicts", choices=["refuse", "first", "last", "drop"],
                   help="one file listed with two labels: refuse (default), keep the first or last row, or "
                        "drop the file (config key data.label_conflicts)")


def add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-column", help="manifest column holding a predefined train/val/test split")
    p.add_argument("--group-column", help="keep rows sharing this column's value in one split")
    p.add_argument("--stratify", help="extra metadata columns to stratify the split by, comma-separated")


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"],
                   help="inference runtime; auto: the fastest whose decisions match fp32, measured once per machine")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"],
                   help="auto: the fastest precision that keeps the decisions (default); fp32 to force full precision")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="gpu: CUDA (onnxruntime-gpu) or OpenVINO's GPU; falls back to the CPU when absent")


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys of the manifest and split flags (None where a flag was not given)."""
    return {
        "data.image_root": args.image_root, "data.path_column": args.path_column,
        "data.label_column": args.label_column, "data.split_column": args.split_column,
        "data.group_column": args.group_column, "data.stratify": args.stratify,
        "data.label_conflicts": getattr(args, "label_conflicts", None),
    }


def set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set`` items (``KEY=VALUE``) -> {key: value}, each value read as YAML (``true``, ``[0.6,0.2,0.2]``...)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def minutes(text: str) -> float:
    """'15m', '900s', '1h' or a bare number of minutes -> minutes."""
    value = text.strip().lower()
    scale = {"s": 1 / 60, "m": 1.0, "h": 60.0}.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        result = float(number) * (scale or 1.0)
    except ValueError:
        raise UsageError(f"--budget {text!r}: give minutes like 15m, 900s or 1h") from None
    if result <= 0:
        raise UsageError(f"--budget {text!r} must be positive")
    return result


def name_values(items: Sequence[str]) -> dict[str, str] | None:
    """['type=mono', ...] -> {'type': 'mono'}; None when empty."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--metadata {item!r}: give NAME=VALUE, e.g. --metadata type=mono")
        out[name.strip()] = value.strip()
    return out or None


def per_class_numbers(flag: str, text: str) -> float | dict[str, float]:
    """A per-class setting: ``0.9`` (every class), ``scratch=0.95,particle=0.8`` (those classes), or both
    (``0.9,scratch=0.95``: the bare number for every class not named, returned under the key ``*``). The class
    names are checked by the verb, which knows the model's classes."""
    out: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.rpartition("=") if "=" in item else ("*", "", item)
        name = name.strip()
        if not item or (sep and not name) or name in out:
            raise UsageError(f"{flag} {text!r}: give a number for every class, CLASS=NUMBER pairs separated by "
                             f"commas, or both (e.g. {flag} 0.9,scratch=0.95); each class once")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {value.strip()!r} is not a number"
                             + (f" (for class {name!r})" if sep else "")) from None
    return out["*"] if list(out) == ["*"] else out
