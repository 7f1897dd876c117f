"""defectscope: automatic defect classification for inspection images.

The public API mirrors the ``defectscope`` command's verbs; each name is imported on first use, so
``import defectscope`` and ``defectscope --help`` stay instant and a line PC without PyTorch can still use
``Predictor``, ``predict`` and ``sort``::

    import defectscope

    run = defectscope.train("my_images/", "runs/first", epochs=5)
    defectscope.evaluate(run)
    defectscope.calibrate(run, good_class="GOOD", max_escape=0.01)
    defectscope.export(run, "runs/first/export/model.onnx")
    defectscope.Predictor("runs/first/export/model.onnx").predict("new.png").decision
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from defectscope._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from defectscope.data.table import load_table
    from defectscope.decision.calibrate import calibrate
    from defectscope.decision.cascade import cascade
    from defectscope.deploy.batch import predict
    from defectscope.deploy.cascade_export import export_cascade
    from defectscope.deploy.export import export
    from defectscope.deploy.predictor import Predictor
    from defectscope.deploy.sorter import sort
    from defectscope.deploy.store import export_log
    from defectscope.evaluation.drift_eval import drift_eval
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.rundir import Run
    from defectscope.training.ensemble import ensemble
    from defectscope.training.train import train
    from defectscope.training.tune import tune

# Public name -> the module that defines it (the CLI verb of the same name calls it).
_LAZY = {
    "load_table": "defectscope.data.table",
    "Run": "defectscope.rundir",
    "train": "defectscope.training.train",
    "tune": "defectscope.training.tune",
    "ensemble": "defectscope.training.ensemble",
    "calibrate": "defectscope.decision.calibrate",
    "cascade": "defectscope.decision.cascade",
    "evaluate": "defectscope.evaluation.evaluate",
    "drift_eval": "defectscope.evaluation.drift_eval",
    "export": "defectscope.deploy.export",
    "export_cascade": "defectscope.deploy.cascade_export",
    "Predictor": "defectscope.deploy.predictor",
    "predict": "defectscope.deploy.batch",
    "sort": "defectscope.deploy.sorter",
    "export_log": "defectscope.deploy.store",
}

__all__ = [
    "Predictor", "Run", "__version__", "calibrate", "cascade", "drift_eval", "ensemble", "evaluate", "export",
    "export_cascade", "export_log", "load_table", "predict", "sort", "train", "tune",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defectscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
