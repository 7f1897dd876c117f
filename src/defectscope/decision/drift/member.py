"""What every member of a Drift score is: one small protocol, after scikit-learn's outlier estimators.

A member is one score a policy's Drift rule can use alone or inside a max fusion: a pooled score of
:class:`~defectscope.decision.drift.scorer.DriftScorer` (through
:class:`~defectscope.decision.drift.scorer.PooledScore`),
:class:`~defectscope.decision.drift.patch.PatchGaussian` or
:class:`~defectscope.decision.drift.photometric.PhotometricGaussian`. Each says which input it reads, so the
rule (:mod:`defectscope.decision.drift.rule`) and the exported graph
(:mod:`defectscope.onnx_export.drift_heads`, whose graph heads are registered by member ``kind``) loop over
members without knowing their classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from defectscope.errors import DefectscopeError

# What a member's score is computed from. The strings are also the tags a FusedDriftHead's members carry.
POOLED = "pooled"  # the pooled penultimate features and the logits: X = (features, logits)
MAPS = "patch"  # the chosen backbone stages' feature maps, finest first: X = [(N, C, H, W), ...]
IMAGE = "image"  # the model's input images: X = (N, H, W) uint8
READS = (POOLED, MAPS, IMAGE)


class DriftError(DefectscopeError, ValueError):
    """Drift statistics that are missing, malformed, or do not fit the features given."""


class DriftMember(Protocol):
    """One Drift score with the statistics it was fitted on.

    ``kind``: its name in a Drift score (``knn``, ``patch``, ``photometric``...), which also keys its graph
    head for export; ``reads``: one of :data:`READS`. ``fit`` learns from normal images' inputs and returns
    the member; ``score_samples`` gives ``(N,)`` float64 scores, higher = more unlike training (the opposite
    sign of scikit-learn's, whose ``score_samples`` is higher for inliers); ``state`` is a plain dict (numpy
    arrays and JSON-able values) that ``from_state`` reads back.
    """

    kind: str
    reads: str

    def fit(self, X: Any, *args: Any, **kwargs: Any) -> DriftMember: ...

    def score_samples(self, X: Any) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DriftMember: ...


class DriftInputs(NamedTuple):
    """Everything a member may read for a batch of images; each takes its own (:meth:`read`)."""

    features: np.ndarray | None = None
    logits: np.ndarray | None = None
    maps: Sequence[np.ndarray] | None = None
    images: np.ndarray | None = None

    def read(self, member: DriftMember) -> Any:
        """The ``X`` of ``member.score_samples``. Pooled features and logits are checked by the pooled
        scorer itself (msp and energy need no features)."""
        x = {POOLED: (self.features, self.logits), MAPS: self.maps, IMAGE: self.images}[member.reads]
        if x is None:
            raise DriftError(f"the {member.kind} score needs {_NEEDS[member.reads]}")
        return x


_NEEDS = {MAPS: "the feature maps of the images", IMAGE: "the images"}

__all__ = ["IMAGE", "MAPS", "POOLED", "READS", "DriftError", "DriftInputs", "DriftMember"]
