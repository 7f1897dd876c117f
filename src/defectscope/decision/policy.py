"""The decision policy: what a run's calibrated model decides for each image, in plain numpy.

Every consumer (evaluate, the deployed predictor, reports) turns model outputs into decisions with the
one function :func:`decide`, so a threshold means the same thing everywhere. This module must never
import torch: the deployed predictor runs on onnxruntime + numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from defectscope import labels
from defectscope.decision.costs import DRIFT, expected_costs
from defectscope.decision.escape_scores import ESCAPE_SCORES, goodness
from defectscope.errors import DefectscopeError

log = logging.getLogger(__name__)

# 2: the three-way PASS / REJECT / REVIEW rule (``three_way``); version-1 files load unchanged.
# 3: per-class REJECT purity (``three_way["reject_purity"]``); an older reader refuses a file it would misread.
POLICY_VERSION = 3
REVIEW = labels.REVIEW
REVIEW_SCORES = ("top", "margin")
PURITY_SCORES = ("probability", "margin")  # what a REJECT class's purity threshold compares against


class PolicyError(DefectscopeError, ValueError):
    """A policy file that is malformed, from a newer version, or inconsistent with the model."""


def _finite(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` with every NaN or infinite float replaced by None, and the dotted names of those fields."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "value"]
    if isinstance(value, dict):
        out, bad = {}, []
        for k, v in value.items():
            out[k], b = _finite(v, f"{where}.{k}" if where else str(k))
            bad += b
        return out, bad
    if isinstance(value, (list, tuple)):
        pairs = [_finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [p[0] for p in pairs], [b for p in pairs for b in p[1]]
    return value, []


@dataclass
class Policy:
    """Everything :func:`decide` needs, plus the evidence behind each threshold (for reports).

    ``escape_threshold``: pass as ``good_class`` iff the escape score >= it (None: no escape rule). The score
    (``escape_score``, see :mod:`defectscope.decision.escape_scores`) is calibrated P(good) (``p_good``) or
    1 - expected severity over ``class_ranks`` (``severity``; each class's severity in [0, 1]).
    ``review_threshold``: images whose review score (``review_score``: "top" probability or "margin"
    between the top two) is below it are decided ``REVIEW`` (None: no review band).
    ``cost_matrix``: ``{"classes": [...], "costs": [[...]]}``, rows true class, columns decision; the
    decision minimises expected cost (None: most probable class).
    ``three_way``: PASS as ``good_class`` iff the escape score >= ``three_way["pass_threshold"]``, REJECT as the
    best defect decision iff it is < ``three_way["reject_threshold"]``, REVIEW otherwise (a None threshold: that
    side decides nothing); it replaces ``escape_threshold`` (see :mod:`defectscope.decision.three_way`).
    ``three_way["reject_purity"]`` (optional): a REJECT as defect class c stays automatic only when the image's
    purity score for c (``score``: calibrated P(c), or its margin over the next class) is at least
    ``classes[c]["threshold"]``; otherwise it goes to REVIEW (a None threshold: every REJECT as c does). Classes
    it does not name are not gated (see :mod:`defectscope.decision.reject_purity`).
    ``drift_threshold``: an image whose drift score (``drift["score"]``, computed from the model's features
    with the statistics in RUN/drift.safetensors) exceeds it is ``Drift``, before any other rule.
    """

    classes: list[str]
    good_class: str | None = None
    temperature: float = 1.0
    escape_threshold: float | None = None
    escape_guarantee: dict[str, Any] | None = None
    escape_score: str = "p_good"
    class_ranks: list[float] | None = None
    cost_matrix: dict[str, Any] | None = None
    review_threshold: float | None = None
    review_score: str = "top"
    review_target: dict[str, Any] | None = None
    three_way: dict[str, Any] | None = None  # decision.three_way.ThreeWay.to_dict(): thresholds and evidence
    drift_threshold: float | None = None
    drift: dict[str, Any] | None = None  # {"score": name, "target_false_flag_rate", "n_calibration", ...}
    temperature_fit: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        if self.good_class is not None and self.good_class not in self.classes:
            raise PolicyError(f"good class {self.good_class!r} is not one of the classes {self.classes}")
        if self.escape_threshold is not None and self.good_class is None:
            raise PolicyError("an escape threshold needs a good class")
        if self.three_way is not None:
            if self.good_class is None:
                raise PolicyError("a three-way policy needs a good class")
            if self.escape_threshold is not None:
                raise PolicyError("a policy has either an escape threshold or a three-way rule, not both")
            for key in ("pass_threshold", "reject_threshold"):
                value = self.three_way.get(key, "missing")
                if value is not None and not isinstance(value, (int, float)):
                    raise PolicyError(f"three_way.{key} must be a number or null, got {value!r}")
            _check_purity(self.three_way.get("reject_purity"), self.classes, self.good_class)
        if self.escape_score not in ESCAPE_SCORES:
            raise PolicyError(f"escape_score must be one of {ESCAPE_SCORES}, got {self.escape_score!r}")
        if self.class_ranks is not None and len(self.class_ranks) != len(self.classes):
            raise PolicyError(f"class_ranks needs one value per class ({len(self.classes)}), got {self.class_ranks}")
        if self.escape_score == "severity" and self.class_ranks is None:
            raise PolicyError("the severity escape score needs class_ranks")
        if not self.temperature > 0:
            raise PolicyError(f"temperature must be > 0, got {self.temperature}")
        if self.review_score not in REVIEW_SCORES:
            raise PolicyError(f"review_score must be one of {REVIEW_SCORES}, got {self.review_score!r}")
        if self.cost_matrix is not None:
            from defectscope.decision.costs import check_cost_matrix

            check_cost_matrix(self.cost_matrix, self.classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The policy as JSON text; also written to ``path`` when given. Floats round-trip exactly."""
        data, undefined = _finite(self.to_dict())
        if undefined:  # e.g. an overkill rate of no good images: JSON has no NaN, and a number would lie
            log.warning(f"policy: {', '.join(undefined)} undefined on these images, written as null")
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        if path is not None:  # a temporary name, then one rename: never half a file
            tmp = Path(path).with_name(f".{Path(path).name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        version = data.get("version", POLICY_VERSION)
        if version > POLICY_VERSION:
            raise PolicyError(f"policy version {version} is newer than this defectscope understands ({POLICY_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy fields {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Policy:
        """Read a policy from JSON text or from a file path (e.g. ``RUN/policy.json``)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


@dataclass
class Decisions:
    """Per-image output of :func:`decide`.

    ``labels``: class name, ``"REVIEW"`` or ``"Drift"`` (object array); ``probs``: calibrated
    probabilities (N, K); ``review_scores``: the score the review band compares with its threshold.
    """

    labels: np.ndarray
    probs: np.ndarray
    review_scores: np.ndarray
    # Why each label: one of REASONS (object array), so a decision that is not the top class says why.
    reasons: np.ndarray | None = None
    classes: list[str] | None = None  # the columns of probs

    @property
    def confidence(self) -> np.ndarray:
        """The calibrated probability of each decided class; NaN where the decision is REVIEW or Drift (a person
        or the Drift flag decides, not a class probability)."""
        classes = {c: i for i, c in enumerate(self.classes or [])}
        out = np.full(len(self.labels), np.nan)
        for i, label in enumerate(self.labels):
            if label in classes:
                out[i] = self.probs[i, classes[label]]
        return out

    @property
    def auto(self) -> np.ndarray:
        """Mask of images the machine decided (neither REVIEW nor Drift)."""
        return (self.labels != REVIEW) & (self.labels != DRIFT)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(x.size) and x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(axis=1), 1.0, atol=1e-4)


def calibrated_probs(
    scores: np.ndarray, temperature: float, inputs: Literal["auto", "logits", "probs"] = "auto"
) -> np.ndarray:
    """softmax(logits / T). Uncalibrated probabilities work too: log p differs from the logits by a
    per-row constant, which softmax ignores, so softmax(log p / T) is the same thing.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, classes) array, got shape {x.shape}")
    if inputs == "auto":
        inputs = "probs" if _looks_like_probs(x) else "logits"
    if inputs == "probs":
        x = np.log(np.clip(x, 1e-300, None))
    elif inputs != "logits":
        raise ValueError(f"inputs must be 'auto', 'logits' or 'probs', got {inputs!r}")
    return softmax(x, temperature)


def review_scores(probs: np.ndarray, kind: str = "top") -> np.ndarray:
    """Confidence used by the review band: top probability, or the margin between the top two."""
    if kind == "top":
        return probs.max(axis=1)
    if kind == "margin":
        if probs.shape[1] < 2:
            return probs.max(axis=1)
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    raise ValueError(f"review score must be one of {REVIEW_SCORES}, got {kind!r}")


def _check_purity(purity: Any, classes: list[str], good_class: str | None) -> None:
    """Refuse a ``three_way.reject_purity`` the decision rule could not apply (None: purity off)."""
    if purity is None:
        return
    if not isinstance(purity, dict) or not isinstance(purity.get("classes"), dict):
        raise PolicyError("three_way.reject_purity must be an object with 'score' and 'classes'")
    if purity.get("score") not in PURITY_SCORES:
        raise PolicyError(f"three_way.reject_purity.score must be one of {PURITY_SCORES}, got {purity.get('score')!r}")
    for name, entry in purity["classes"].items():
        if name not in classes or name == good_class:
            raise PolicyError(f"three_way.reject_purity names {name!r}, which is not a defect class of {classes}")
        value = (entry or {}).get("threshold", "missing") if isinstance(entry, dict) else "missing"
        if value is not None and not isinstance(value, (int, float)):
            raise PolicyError(f"three_way.reject_purity.classes.{name}.threshold must be a number or null, "
                              f"got {value!r}")


def purity_scores(probs: np.ndarray, classes: list[str], decided: np.ndarray, kind: str) -> np.ndarray:
    """Per image, how sure the model is of the class it ``decided``: calibrated P(decided) (``probability``) or
    P(decided) minus the largest other class probability (``margin``); NaN where the decision is not a class."""
    probs = np.asarray(probs, dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    col = np.array([index.get(d, -1) for d in decided], dtype=int)
    rows = np.arange(len(col))
    out = np.full(len(col), np.nan)
    ok = col >= 0
    out[ok] = probs[rows[ok], col[ok]]
    if kind == "margin":
        others = probs.copy()
        others[rows[ok], col[ok]] = -np.inf
        out[ok] -= others[ok].max(axis=1) if probs.shape[1] > 1 else 0.0
    elif kind != "probability":
        raise ValueError(f"purity score must be one of {PURITY_SCORES}, got {kind!r}")
    return out


def purity_kept(probs: np.ndarray, classes: list[str], decided: np.ndarray, purity: dict[str, Any] | None
                ) -> np.ndarray:
    """Mask of decisions the REJECT-purity rule leaves automatic: every decision of a class it does not gate,
    and one of a gated class only at or above that class's certified threshold (none when it has no threshold).
    The one implementation of the rule: calibration, evaluate and the deployed predictor all call it."""
    decided = np.asarray(decided, dtype=object)
    keep = np.ones(len(decided), dtype=bool)
    if not purity:
        return keep
    q = purity_scores(probs, classes, decided, purity["score"])
    for name, entry in purity["classes"].items():
        mine = decided == name
        t = entry.get("threshold")
        keep[mine] = False if t is None else q[mine] >= t
    return keep


def verdicts(score: np.ndarray, t_pass: float | None, t_reject: float | None) -> np.ndarray:
    """Per image: "PASS", "REJECT" or "REVIEW" from the escape score and the two thresholds."""
    score = np.asarray(score, dtype=np.float64)
    passed = score >= t_pass if t_pass is not None else np.zeros(len(score), dtype=bool)
    rejected = (score < t_reject) & ~passed if t_reject is not None else np.zeros(len(score), dtype=bool)
    return np.where(passed, "PASS", np.where(rejected, "REJECT", "REVIEW")).astype(object)


def decide(
    scores: np.ndarray,
    policy: Policy,
    *,
    drift_score: np.ndarray | None = None,
    inputs: Literal["auto", "logits", "probs"] = "auto",
) -> Decisions:
    """Decide every image: ``Drift`` check -> review band -> three-way rule or escape cap on GOOD -> cost
    argmin / argmax.

    ``scores`` are the model's raw logits or its *uncalibrated* softmax probabilities (N, K) in the
    order of ``policy.classes``; the policy's temperature is applied here. ``inputs="auto"`` takes rows
    that are non-negative and sum to 1 as probabilities.

    With the escape rule, an image is GOOD iff its escape score (calibrated P(GOOD), or 1 - expected
    severity: ``policy.escape_score``) >= ``escape_threshold``; otherwise it
    gets the best non-GOOD decision (lowest expected cost, or most probable). Without it, the lowest
    expected cost (cost matrix) or the most probable class wins. The cost matrix's ``Drift`` column is a
    decision option only when ``drift_score`` is given (the model gives no P(Drift), so its row is unused).
    """
    classes = policy.classes
    probs = calibrated_probs(scores, policy.temperature, inputs)
    n, k = probs.shape
    if k != len(classes):
        raise PolicyError(f"scores have {k} columns but the policy has {len(classes)} classes")
    has_drift = drift_score is not None
    if policy.cost_matrix is not None:
        options, cost = expected_costs(probs, policy.cost_matrix, classes, allow_drift=has_drift)
        badness = cost
    else:
        options, badness = list(classes), -probs
    options_arr = np.array(options, dtype=object)
    first = options_arr[badness.argmin(axis=1)]
    reasons = np.full(n, COST_REASON if policy.cost_matrix is not None else TOP_REASON, dtype=object)
    if policy.escape_threshold is not None or policy.three_way is not None:
        good_option = options.index(policy.good_class)
        score = goodness(probs, policy.escape_score, classes.index(policy.good_class), policy.class_ranks)
        masked = badness.copy()
        masked[:, good_option] = np.inf
        defect = options_arr[masked.argmin(axis=1)]
        if policy.three_way is not None:
            verdict = verdicts(score, policy.three_way["pass_threshold"], policy.three_way["reject_threshold"])
            labels = np.where(verdict == "PASS", policy.good_class, np.where(verdict == "REJECT", defect, REVIEW))
            reasons[:] = np.where(verdict == "PASS", PASS_REASON,
                                  np.where(verdict == "REJECT", REJECT_REASON, BETWEEN_REASON))
            unsure = (verdict == "REJECT") & ~purity_kept(probs, classes, defect, policy.three_way.get("reject_purity"))
            labels[unsure], reasons[unsure] = REVIEW, PURITY_REASON
        else:
            labels = np.where(score >= policy.escape_threshold, policy.good_class, defect)
            reasons[(labels != policy.good_class) & (first == policy.good_class)] = ESCAPE_REASON
    else:
        labels = first
    labels = labels.astype(object)

    rscores = review_scores(probs, policy.review_score)
    if policy.review_threshold is not None:
        band = rscores < policy.review_threshold
        labels[band], reasons[band] = REVIEW, REVIEW_REASON
    if has_drift and policy.drift_threshold is not None:
        drift = np.asarray(drift_score, dtype=np.float64).reshape(-1)
        if drift.shape[0] != n:
            raise ValueError(f"drift_score has {drift.shape[0]} values for {n} images")
        flagged = drift > policy.drift_threshold
        labels[flagged], reasons[flagged] = DRIFT, DRIFT_REASON
    return Decisions(labels=labels, probs=probs, review_scores=rscores, reasons=reasons, classes=list(classes))


# What decided an image, in the words of the `reason` column of predict, the sorter and the report.
TOP_REASON = "most probable class"
COST_REASON = "lowest expected cost"
ESCAPE_REASON = "below the escape threshold"  # GOOD was the top class, but not sure enough to pass
PASS_REASON = "above the PASS threshold"
REJECT_REASON = "below the REJECT threshold"
BETWEEN_REASON = "between the PASS and REJECT thresholds"
PURITY_REASON = "defect class below its purity threshold"  # rejectable, but which defect is not sure enough
REVIEW_REASON = "review band"
DRIFT_REASON = "Drift: unlike the training images"


def relative_drift(score: np.ndarray | float, threshold: float) -> np.ndarray:
    """A Drift score on the scale a person reads: 1.0 is the Drift line, above it the image is flagged.

    ``score / threshold`` for a positive threshold (Mahalanobis, kNN, patch); in general
    ``1 + (score - threshold) / |threshold|``, which is the same there and keeps the order and the line for
    scores that can be negative (energy, MSP, standardised fusions)."""
    s = np.asarray(score, dtype=np.float64)
    t = float(threshold)
    return 1.0 + (s - t) / (abs(t) if t else 1.0)


def decide_rows(probs: np.ndarray, policy: dict[str, Any] | None, classes: list[str],
                drift_score: np.ndarray | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(decisions, reasons, the decision's calibrated probability or NaN) for a model's uncalibrated
    probabilities and the policy as exported: :func:`decide_labels` with the why and how sure."""
    if not policy:
        p = np.asarray(probs, dtype=np.float64)
        return [classes[i] for i in p.argmax(1)], [TOP_REASON] * len(p), p.max(axis=1)
    drift = drift_score if policy.get("drift") else None
    d = decide(probs, Policy.from_dict(policy), inputs="probs", drift_score=drift)
    return [str(x) for x in d.labels], [str(r) for r in d.reasons], d.confidence


def decide_labels(probs: np.ndarray, policy: dict[str, Any] | None, classes: list[str],
                  drift_score: np.ndarray | None = None) -> list[str]:
    """Decisions for a model's uncalibrated probabilities (N, C) and the policy as exported (a dict): the one
    :func:`decide`, or plain argmax when the model carries no policy. ``drift_score`` is used only when the
    policy has a Drift rule."""
    if not policy:
        return [classes[i] for i in np.asarray(probs).argmax(1)]
    drift = drift_score if policy.get("drift") else None
    return [str(label) for label in decide(probs, Policy.from_dict(policy), inputs="probs", drift_score=drift).labels]
