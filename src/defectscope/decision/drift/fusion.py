"""Combine Drift scores without fooling ourselves: standardise, fuse by max, select by the worst kind.

- :class:`Standardiser`: each score's mean and standard deviation on held-out *normal* images (never the
  training images the statistics were fitted on, whose scores are optimistically low), so scores on
  different scales become comparable z-scores.
- :func:`fuse_max`: the largest z-score over member scores. An image is as drifted as its most alarmed
  score: a pooled score catches global shifts, a patch score local ones, and the max keeps both
  (the normal tail of the max grows only slowly with the number of members).
- :func:`weighted_sum`: a small fitted combination (non-negative weights on the simplex).
- :func:`select_score`: the candidate with the best WORST-kind AUROC, and an honest estimate of how that
  choice does on a kind it has not seen: leave-one-kind-out (LOKO), where both the choice among
  candidates and any fitted weights use the other kinds only, and the result is measured on the one left out.

Data layout (plain dicts of numpy arrays, as :mod:`defectscope.decision.drift.fit` writes them): a *kind*
(``heldout_class``, ``group``, ``corruptions``, ``far``...) is a list of *parts* (e.g. one per held-out
class, each with its own fitted statistics); a part is ``{"val": {score: (n,)}, "normal": {score: (m,)},
"drift": {score: (k,)}}``, ``val`` being the held-out normal images for standardisation. A kind's AUROC is
the mean over its parts (held-out parts use different statistics, so their scores are not pooled).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectscope.decision.drift.member import DriftError

Part = Mapping[str, Mapping[str, np.ndarray]]
Kinds = Mapping[str, Sequence[Part]]


@dataclass
class Standardiser:
    """z = (s - mu) / sigma per score, fitted on held-out normal images."""

    mu: dict[str, float] = field(default_factory=dict)
    sigma: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, normal: Mapping[str, np.ndarray]) -> Standardiser:
        mu, sigma = {}, {}
        for name, s in normal.items():
            s = np.asarray(s, dtype=np.float64).reshape(-1)
            if len(s) < 2 or not np.isfinite(s).all():
                raise DriftError(f"standardising {name!r} needs >= 2 finite held-out normal scores, got {len(s)}")
            mu[name], sd = float(s.mean()), float(s.std(ddof=1))
            # A constant score cannot be standardised; 1 leaves it unscaled rather than dividing by zero.
            sigma[name] = sd if sd > 0 else 1.0
        return cls(mu, sigma)

    def transform(self, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(scores) - set(self.mu)
        if missing:
            raise DriftError(f"no standardisation for scores {sorted(missing)}")
        return {k: (np.asarray(v, dtype=np.float64) - self.mu[k]) / self.sigma[k] for k, v in scores.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (policy.json's ``drift.standardiser``)."""
        return {"mu": dict(self.mu), "sigma": dict(self.sigma)}

    state = to_dict  # the members' name (DriftMember.state) for the same thing

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Standardiser:
        return cls(dict(state["mu"]), dict(state["sigma"]))


def fuse_max(z: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
    """The largest z-score over ``members``."""
    if not members:
        raise DriftError("max fusion needs at least one member score")
    return np.max(np.stack([np.asarray(z[m], dtype=np.float64) for m in members]), axis=0)


def weighted_sum(z: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    return np.sum(np.stack([w * np.asarray(z[m], dtype=np.float64) for m, w in weights.items()]), axis=0)


def auroc(normal: np.ndarray, drift: np.ndarray) -> float:
    """P(drift score > normal score) + 0.5 P(tie), by ranks (the Mann-Whitney U statistic)."""
    from scipy.stats import rankdata

    n, d = np.asarray(normal, dtype=np.float64).reshape(-1), np.asarray(drift, dtype=np.float64).reshape(-1)
    if not len(n) or not len(d):
        raise DriftError("AUROC needs normal and drift scores")
    r = rankdata(np.concatenate([n, d]))
    return float((r[len(n):].sum() - len(d) * (len(d) + 1) / 2) / (len(n) * len(d)))


# ---------------------------------------------------------------- candidates

@dataclass
class Candidate:
    """A way to turn a part's raw scores into one Drift score. ``fit`` (optional) learns parameters from
    kinds; ``fitted_on`` records which kinds the current parameters came from."""

    name: str
    members: tuple[str, ...]
    rule: str = "max"  # "single", "max" or "weighted"
    weights: dict[str, float] | None = None
    fitted_on: tuple[str, ...] = ()

    def apply(self, part: Part, which: str) -> np.ndarray:
        """The candidate's score of ``part[which]`` (``normal`` or ``drift``), standardised on ``part['val']``."""
        if self.rule == "single":
            return np.asarray(part[which][self.members[0]], dtype=np.float64)
        std = Standardiser.fit({m: part["val"][m] for m in self.members})
        z = std.transform({m: part[which][m] for m in self.members})
        if self.rule == "max":
            return fuse_max(z, self.members)
        if self.weights is None:
            raise DriftError(f"candidate {self.name!r} has no fitted weights")
        return weighted_sum(z, self.weights)

    def kind_auroc(self, parts: Sequence[Part]) -> float:
        return float(np.mean([auroc(self.apply(p, "normal"), self.apply(p, "drift")) for p in parts]))


def candidates(scores: Sequence[str], *, max_members: int = 3, weighted: bool = True) -> list[Candidate]:
    """Every single score, the max-fusion of every subset of 2..max_members scores, and (``weighted``) one
    weighted sum over all scores whose weights are fitted per selection."""
    out = [Candidate(s, (s,), "single") for s in scores]
    for k in range(2, max_members + 1):
        out += [Candidate("max(" + ",".join(c) + ")", tuple(c), "max") for c in itertools.combinations(scores, k)]
    if weighted and len(scores) > 1:
        out.append(Candidate("weighted(" + ",".join(scores) + ")", tuple(scores), "weighted"))
    return out


def fit_weights(cand: Candidate, kinds: Kinds, *, step: float = 0.25) -> Candidate:
    """Non-negative weights summing to 1 on a grid of ``step``, maximising the worst-kind AUROC over
    ``kinds``; returns a copy that remembers which kinds it was fitted on."""
    m = len(cand.members)
    ticks = int(round(1 / step))
    best, best_w = -np.inf, None
    for combo in itertools.product(range(ticks + 1), repeat=m):
        if sum(combo) != ticks:
            continue
        w = {name: c / ticks for name, c in zip(cand.members, combo, strict=False) if c}
        trial = Candidate(cand.name, tuple(w), "weighted", w)
        worst = min(trial.kind_auroc(parts) for parts in kinds.values())
        if worst > best:
            best, best_w = worst, w
    return Candidate(cand.name, cand.members, "weighted", best_w, tuple(kinds))


def _prepare(cand: Candidate, kinds: Kinds) -> Candidate:
    return fit_weights(cand, kinds) if cand.rule == "weighted" else cand


def worst_kind(cand: Candidate, kinds: Kinds) -> tuple[float, dict[str, float]]:
    per = {k: cand.kind_auroc(parts) for k, parts in kinds.items()}
    return min(per.values()), per


def select_score(kinds: Kinds, cands: Sequence[Candidate],
                 prepare: Callable[[Candidate, Kinds], Candidate] = _prepare) -> dict[str, Any]:
    """Choose the candidate with the best worst-kind AUROC over all ``kinds`` (weights fitted on all of
    them), and estimate honestly how the selection procedure does on an unseen kind.

    LOKO: for each kind k, the candidates are prepared (weights fitted) and ranked on the other kinds only;
    the winner's AUROC on k is recorded. ``loko_worst`` (the smallest of those) is the number to report;
    the chosen candidate's in-sample worst-kind AUROC is optimistic. Needs >= 2 kinds.
    """
    if len(kinds) < 2:
        raise DriftError(f"selecting a Drift score by its worst kind needs >= 2 kinds, got {list(kinds)}")
    loko: dict[str, Any] = {}
    for held in kinds:
        others = {k: v for k, v in kinds.items() if k != held}
        scored = []
        for c in cands:
            p = prepare(c, others)
            scored.append((worst_kind(p, others)[0], p))
        best_worst, winner = max(scored, key=lambda t: t[0])
        if held in winner.fitted_on:
            raise DriftError(f"internal error: {winner.name} was fitted on the kind {held!r} it is judged on")
        loko[held] = {"chosen": winner.name, "weights": winner.weights, "worst_on_others": best_worst,
                      "auroc": winner.kind_auroc(kinds[held])}
    final = [(worst_kind(p, kinds), p) for p in (prepare(c, kinds) for c in cands)]
    (worst, per_kind), chosen = max(final, key=lambda t: t[0][0])
    table = {p.name: {"per_kind": pk, "worst": w, "weights": p.weights} for (w, pk), p in final}
    return {
        "chosen": chosen.name, "members": list(chosen.members), "rule": chosen.rule, "weights": chosen.weights,
        "per_kind": per_kind, "worst_in_sample": worst,
        "loko": loko, "loko_worst": min(v["auroc"] for v in loko.values()),
        "candidates": table,
    }
