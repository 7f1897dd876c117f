"""The policy's Drift score: one pooled score, the patch score, or the max of several standardised scores.

A policy names its score in ``policy.drift["score"]``: a member (``mahalanobis``, ``knn``, ``vim``, ``msp``,
``energy`` on the pooled features and logits; ``patch`` on the feature maps, see
:mod:`defectscope.decision.drift.patch`; ``photometric`` on the image's grey levels, see
:mod:`defectscope.decision.drift.photometric`) or a max fusion such as ``max(knn,patch)``: each member
standardised with the mean and standard deviation of its scores on the validation split's images
(``policy.drift["standardiser"]``), the largest z-score kept (:mod:`defectscope.decision.drift.fusion`).

:class:`DriftRule` computes that score in numpy from features, logits, (for ``patch``) maps and (for
``photometric``) the images, with the statistics saved in the run and the policy; the exported graph computes
the same inside ONNX (:mod:`defectscope.onnx_export.drift_heads`), so the deployed predictor reads one number and
stays torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from defectscope.decision.drift.fusion import Standardiser, fuse_max
from defectscope.decision.drift.member import READS, DriftError, DriftInputs, DriftMember
from defectscope.decision.drift.patch import PATCH, PatchGaussian, feature_maps
from defectscope.decision.drift.photometric import PHOTOMETRIC, PhotometricGaussian
from defectscope.decision.drift.scorer import SCORES, DriftScorer, PooledScore

if TYPE_CHECKING:
    from defectscope.rundir import Run

MEMBERS = (*SCORES, PATCH, PHOTOMETRIC)
NOT_POOLED = (PATCH, PHOTOMETRIC)
# The member types with statistics of their own; every other member is a pooled score of the DriftScorer.
_OWN_TYPES: dict[str, type] = {PATCH: PatchGaussian, PHOTOMETRIC: PhotometricGaussian}


def parse_score(name: str) -> tuple[str, ...]:
    """The member scores of a Drift score name: ``"knn"`` -> ``("knn",)``, ``"max(knn, patch)"`` ->
    ``("knn", "patch")``. Raises DriftError for unknown members or a malformed fusion."""
    text = str(name).replace(" ", "")
    if text.startswith("max(") and text.endswith(")"):
        members = tuple(m for m in text[4:-1].split(","))
        if len(members) < 2 or len(set(members)) != len(members) or "" in members:
            raise DriftError(f"a fused Drift score needs >= 2 different members, e.g. max(knn,patch); got {name!r}")
    else:
        members = (text,)
    unknown = [m for m in members if m not in MEMBERS]
    if unknown:
        raise DriftError(f"unknown drift score {', '.join(map(repr, unknown))} in {name!r}; members: "
                         f"{', '.join(MEMBERS)}, alone or fused as max(a,b[,c])")
    return members


def score_name(members: Sequence[str]) -> str:
    """The canonical name of a single or max-fused score."""
    members = tuple(members)
    return members[0] if len(members) == 1 else "max(" + ",".join(members) + ")"


def member_scores(members: Sequence[str], pooled: DriftScorer | None, patch: PatchGaussian | None,
                  features: np.ndarray | None, logits: np.ndarray | None,
                  maps: Sequence[np.ndarray] | None, *, photometric: PhotometricGaussian | None = None,
                  images: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Raw scores of each member (all higher = more unlike training)."""
    return DriftRule(tuple(members), pooled, patch, photometric=photometric).raw(features, logits, maps, images)


def _read_order(kind: str) -> int:
    return READS.index(_OWN_TYPES.get(kind, PooledScore).reads)


@dataclass
class DriftRule:
    """Everything that turns features, logits and maps into the policy's one Drift score: the member names and
    the statistics they are computed with (one :class:`DriftScorer` for every pooled member)."""

    members: tuple[str, ...]
    pooled: DriftScorer | None = None
    patch: PatchGaussian | None = None
    standardiser: Standardiser | None = None
    photometric: PhotometricGaussian | None = None

    @property
    def name(self) -> str:
        return score_name(self.members)

    @property
    def fused(self) -> bool:
        return len(self.members) > 1

    @property
    def stages(self) -> tuple[int, ...] | None:
        """The backbone stages whose maps the score needs (None: it reads pooled features only)."""
        return tuple(self.patch.stages) if self.patch is not None and PATCH in self.members else None

    def member(self, kind: str) -> DriftMember:
        """The member ``kind`` with the rule's statistics; DriftError when they are missing."""
        if kind in _OWN_TYPES:
            found = {PATCH: self.patch, PHOTOMETRIC: self.photometric}[kind]
            if found is None:
                raise DriftError(f"the {kind} score needs the {kind} drift statistics")
            return found
        if self.pooled is None:
            pooled = [m for m in self.members if m not in _OWN_TYPES]
            raise DriftError(f"the {', '.join(pooled)} score needs the pooled drift statistics")
        return PooledScore(kind, self.pooled)

    def bound_members(self) -> list[DriftMember]:
        """The members in the rule's order (the order of a fused score's standardisation)."""
        return [self.member(kind) for kind in self.members]

    def raw(self, features, logits, maps=None, images=None) -> dict[str, np.ndarray]:
        """Each member's raw score, every member reading its own input (:class:`DriftInputs`)."""
        inputs = DriftInputs(features, logits, maps, images)
        out: dict[str, np.ndarray] = {}
        # Pooled members first, then the maps' and the image's: the order policy.json's standardiser has
        # always listed them in (sorted is stable, so pooled members keep the rule's order).
        for kind in sorted(self.members, key=_read_order):
            member = self.member(kind)
            out[kind] = member.score_samples(inputs.read(member))
        return out

    def combine(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """The policy's score from the members' raw scores."""
        if not self.fused:
            return np.asarray(raw[self.members[0]], dtype=np.float64)
        if self.standardiser is None:
            raise DriftError(f"the fused score {self.name} needs a standardiser")
        return fuse_max(self.standardiser.transform({m: raw[m] for m in self.members}), self.members)

    def score(self, features, logits, maps=None, images=None) -> np.ndarray:
        return self.combine(self.raw(features, logits, maps, images))

    def policy_entries(self) -> dict[str, Any]:
        """What policy.json records beside the threshold to recompute (and export) this score."""
        out: dict[str, Any] = {"score": self.name, "members": list(self.members),
                               "rule": "max" if self.fused else "single"}
        if self.standardiser is not None and self.fused:
            out["standardiser"] = self.standardiser.to_dict()
        if self.patch is not None and PATCH in self.members:
            out["patch"] = {k: v for k, v in self.patch.params().items() if k != "version"}
        if self.photometric is not None and PHOTOMETRIC in self.members:
            out["photometric"] = self.photometric.to_dict()
        return out

    @classmethod
    def from_policy(cls, run: Run, drift: Mapping[str, Any]) -> DriftRule:
        """The score a policy's ``drift`` entry names, with the statistics saved in ``run``."""
        members = parse_score(drift["score"])
        pooled = DriftScorer.load(run) if any(m not in NOT_POOLED for m in members) else None
        patch = PatchGaussian.load(run) if PATCH in members else None
        photometric = None
        if PHOTOMETRIC in members:
            if not drift.get("photometric"):
                raise DriftError(f"the policy's Drift score {drift['score']} has no photometric statistics")
            photometric = PhotometricGaussian.from_state(drift["photometric"])
        std = None
        if len(members) > 1:
            s = drift.get("standardiser")
            if not s:
                raise DriftError(f"the policy's fused Drift score {drift['score']} has no standardiser")
            std = Standardiser.from_state(s)
        return cls(members, pooled, patch, std, photometric)


def policy_forward(model, images: np.ndarray, stages: Sequence[int] | None, *, metadata: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """(features, logits, maps or None) of uint8 images in one pass; maps only when ``stages`` is given.
    ``metadata``: the encoded metadata inputs of a model that takes them (they change the logits only)."""
    from defectscope.models.inference import features_and_logits

    if stages:
        features, logits, maps = feature_maps(model, images, stages)
        if metadata is not None:  # feature_maps' logits are the image's alone
            logits = features_and_logits(model, images, metadata=metadata)[1]
        return features, logits, maps
    return (*features_and_logits(model, images, metadata=metadata), None)
