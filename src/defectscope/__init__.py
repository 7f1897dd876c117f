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
    from defectscope.evaluation.drift_eval import drift_eval
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.onnx_export.cascade_graph import export_cascade
    from defectscope.onnx_export.exporter import export
    from defectscope.rundir import Run
    from defectscope.runtime.predict import predict
    from defectscope.runtime.predictor import Predictor
    from defectscope.station.sorter import sort
    from defectscope.station.store import export_log
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
    "export": "defectscope.onnx_export.exporter",
    "export_cascade": "defectscope.onnx_export.cascade_graph",
    "Predictor": "defectscope.runtime.predictor",
    "predict": "defectscope.runtime.predict",
    "sort": "defectscope.station.sorter",
    "export_log": "defectscope.station.store",
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
