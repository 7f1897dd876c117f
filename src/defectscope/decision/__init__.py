"""Decisions: calibrated probabilities, the escape cap, the review band and cost-minimising decisions.

``policy.decide`` is numpy-only (the deployed predictor has no torch); ``calibrate`` fits a run's policy.
"""

from defectscope.decision.costs import DRIFT
from defectscope.decision.policy import REVIEW, Decisions, Policy, decide

__all__ = ["DRIFT", "REVIEW", "Decisions", "Policy", "decide"]
