"""The label vocabulary every stage shares: the decisions that are not a class, and the one rule for which
class means "the part passes".

``REVIEW`` (a person decides), ``DRIFT`` (unlike the training images) and ``UNREADABLE`` (the file could not be
decoded) are decisions beside the model's classes; the sorter files them into folders of these names and the
station counts them as not decided automatically.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

REVIEW = "REVIEW"
DRIFT = "Drift"
UNREADABLE = "_unreadable"
NOT_AUTOMATIC = frozenset({REVIEW, DRIFT, UNREADABLE})
# What the line does with a part: the three-way verdicts (a class decision is PASS for the good class, REJECT
# for a defect class); Drift and unreadable images keep their own names.
PASS, REJECT = "PASS", "REJECT"
# Class names that mean a passing part, compared case-insensitively.
GOOD_NAMES = ("good", "ok", "pass")


def good_class_of(classes: Sequence[str], policy: Mapping[str, Any] | None = None) -> str | None:
    """The passing class: the policy's ``good_class`` when it has one, else the single class named like GOOD
    (good, ok or pass in any case), else None (none, or more than one: the engineer must name it)."""
    if policy and policy.get("good_class") in classes:
        return str(policy["good_class"])
    hits = [c for c in classes if c.casefold() in GOOD_NAMES]
    return hits[0] if len(hits) == 1 else None


def close_matches(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the nearest of ``choices`` to ``name``, or an empty string."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if not found:
        lowered = {c.casefold(): c for c in choices}
        found = [lowered[name.casefold()]] if name.casefold() in lowered else []
    return f" (did you mean {found[0]!r}?)" if found else ""


def verdict_of(decision: str, good_class: str | None) -> str | None:
    """PASS, REJECT, REVIEW, Drift or _unreadable for a decision (a class name or one of the non-class
    decisions); None when the model has no good class, so pass and reject mean nothing."""
    if decision in NOT_AUTOMATIC:
        return decision
    if good_class is None:
        return None
    return PASS if decision == good_class else REJECT
