"""Reading a cost matrix the engineer gives to ``calibrate``: a preset name or a YAML file.

Apart from :mod:`defectscope.decision.costs` because it needs PyYAML, which the line does not install: the
line reads the matrix from policy.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.decision.costs import PRESETS, CostMatrixError, check_cost_matrix, valeo_pwa


def load_cost_matrix(
    spec: str | Path | dict[str, Any], classes: Sequence[str], good_class: str | None = None
) -> dict[str, Any]:
    """A checked cost matrix from a dict, a preset name (``valeo_pwa``) or a YAML file."""
    if isinstance(spec, dict):
        cm = dict(spec)
    elif str(spec) in PRESETS:
        if good_class is None:
            raise CostMatrixError(f"the {spec} preset needs a good class")
        cm = valeo_pwa(classes, good_class)
    else:
        import yaml

        path = Path(spec)
        if not path.is_file():
            raise CostMatrixError(f"{spec}: no such cost-matrix file (presets: {', '.join(PRESETS)})")
        cm = yaml.safe_load(path.read_text())
        if not isinstance(cm, dict):
            raise CostMatrixError(f"{spec}: expected a mapping with 'classes' and 'costs'")
    cm["classes"] = [str(c) for c in cm.get("classes", [])]
    cm["costs"] = np.asarray(cm.get("costs", []), dtype=np.float64).tolist()
    check_cost_matrix(cm, classes)
    return cm
