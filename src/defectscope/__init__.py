"""defectscope: automatic defect classification for inspection images.

The pipeline's stages are packages: ``data`` -> ``train`` -> ``evaluate``. Heavy modules (torch, timm)
load only when a function that needs them is called, so ``defectscope --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load_table", "train"]

if TYPE_CHECKING:  # pragma: no cover
    from defectscope.data.table import load_table
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.training.run import train

_LAZY = {
    "train": "defectscope.training.run",
    "evaluate": "defectscope.evaluation.evaluate",
    "load_table": "defectscope.data.table",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defectscope' has no attribute {name!r}")
