"""An ensemble of trained Classifiers as one Classifier: one input, the members' averaged class probabilities.

Every stage downstream (calibrate, evaluate, Drift, export, the predictor) treats a model as a Classifier
with ``forward_features`` and a ``head``; an ensemble keeps that contract:

* its "backbone" (:class:`MemberFeatures`) runs every member's own feature pass (the member's normalisation,
  test-time views and feature transform included) and concatenates the pooled features: these are the
  ensemble's features, which the Drift statistics are fitted on;
* its head (:class:`AveragedHeads`) splits them back, applies each member's head and returns the log of the
  mean of the members' softmax probabilities (shifted per image, see ``forward``), so ``softmax(logits)`` is
  the averaged probability and every consumer of logits (argmax, P(GOOD), the escape cap, temperature) reads
  the ensemble's vote.

The members keep their weights and heads (fine-tuned Linear, frozen RBF or ordinal); the exported ONNX graph
holds them all, so the line runs the ensemble in one session call. Members must share the input (size,
resize mode, one channel) and the classes; image-only models (no metadata inputs). The factory builds it
(:func:`~defectscope.models.factory.ensemble_model`, and from a saved spec).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHITECTURE = "ensemble"


class MemberFeatures(nn.Module):
    """The members' pooled features side by side, ``(B, sum of widths)``, from an input in [0, 1]."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.widths = [m.num_features for m in members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)


class AveragedHeads(nn.Module):
    """``log(mean_i softmax(head_i(f_i)))`` over the members' slices ``f_i`` of the concatenated features."""

    def __init__(self, heads: list[nn.Module], widths: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.widths = list(widths)
        self.in_features = sum(widths)
        self.out_features = heads[0].out_features

    def member_logits(self, f: torch.Tensor) -> list[torch.Tensor]:
        return [h(part) for h, part in zip(self.heads, f.split(self.widths, dim=1), strict=True)]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(f)
        lse = torch.stack([torch.logsumexp(z, dim=1) for z in logits])  # (members, N)
        logp = torch.stack([z - m[:, None] for z, m in zip(logits, lse, strict=True)])
        # log of the mean probability, shifted per image by the members' mean log-sum-exp: softmax (at any
        # temperature) and argmax ignore a per-image shift, and the energy Drift score -logsumexp(logits)
        # becomes the members' mean energy instead of a constant 0.
        return torch.logsumexp(logp, dim=0) - math.log(len(self.heads)) + lse.mean(0)[:, None]
