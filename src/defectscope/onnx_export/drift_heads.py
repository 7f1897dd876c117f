"""Drift scores as torch modules for the exported ONNX graph, one graph head per member kind, and their z-scored max.

Each module reproduces a numpy member of :mod:`defectscope.decision.drift` (tests compare them), so the deployed
predictor reads one ``drift`` output and stays torch-free. Every head is a :class:`GraphHead` reading the same
input as its member (``reads``, :mod:`defectscope.decision.drift.member`); :func:`graph_head` builds a member's
head through :data:`GRAPH_HEADS`, the registry by member ``kind``, and :func:`rule_head` a policy's whole rule:

- :class:`DriftHead`: a pooled score of :class:`defectscope.decision.drift.scorer.DriftScorer` (msp, energy,
  mahalanobis, knn, vim) from the pooled features and logits;
- :class:`PatchDriftHead`: :class:`defectscope.decision.drift.patch.PatchGaussian` (per-position Mahalanobis,
  max over positions) from the backbone's intermediate maps;
- :class:`PhotometricDriftHead`: :class:`defectscope.decision.drift.photometric.PhotometricGaussian` (the
  Mahalanobis distance of four grey-level statistics) from the graph's ``image`` input;
- :class:`VimHead`: ViM from the pooled features and logits (:func:`defectscope.decision.drift.scorer.vim_score`);
- :class:`FusedDriftHead`: the largest standardised score, ``max_i (s_i - mu_i) / sigma_i``, with
  ``mu_i, sigma_i`` from held-out normal images (:mod:`defectscope.decision.drift.fusion`);
- :class:`MultiLayerExportHeads`: the run's Classifier giving logits, probabilities, pooled features and the
  Drift score in one backbone pass (the stages' maps come out of the same forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.decision.drift.member import IMAGE, MAPS, POOLED, DriftMember
from defectscope.decision.drift.patch import PATCH, PatchGaussian, multilayer_forward
from defectscope.decision.drift.photometric import EPS, PHOTOMETRIC, PhotometricGaussian
from defectscope.decision.drift.rule import DriftRule
from defectscope.decision.drift.scorer import SCORES, PooledScore


class GraphInputs(NamedTuple):
    """Everything a Drift head may read inside the graph (``maps`` only when the score needs them)."""

    features: torch.Tensor
    logits: torch.Tensor
    maps: Sequence[torch.Tensor] | None = None
    image: torch.Tensor | None = None

    def args(self, reads: str) -> tuple[Any, ...]:
        """What a head reading ``reads`` is called with."""
        return {POOLED: (self.features, self.logits), MAPS: (self.maps,), IMAGE: (self.image,)}[reads]


class GraphHead(nn.Module):
    """A Drift score inside the graph; ``reads`` is its member's input (POOLED, MAPS or IMAGE)."""

    reads: str

    def from_inputs(self, x: GraphInputs) -> torch.Tensor:
        return self(*x.args(self.reads))


def _buffer(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


class DriftHead(GraphHead):
    """A pooled Drift score inside the graph, from the statistics fitted on training features, so the deployed
    file needs nothing beside it. Same formulas as :mod:`defectscope.decision.drift.scorer` (numpy)."""

    reads = POOLED

    def __init__(self, name: str, arrays: dict[str, np.ndarray], params: dict[str, Any]):
        super().__init__()
        self.name = name
        self.temperature = float(params.get("temperature", 1.0))
        self.k = int(params.get("k", 10))
        if name == "mahalanobis":
            means = arrays["mahalanobis.means"]
            means = means[~np.isnan(means).any(axis=1)]  # classes without training features are ignored
            self.register_buffer("means", torch.from_numpy(np.ascontiguousarray(means)).float())
            self.register_buffer("precision", torch.from_numpy(arrays["mahalanobis.precision"]).float())
        elif name == "knn":
            self.register_buffer("bank", torch.from_numpy(np.ascontiguousarray(arrays["knn.bank"])).float())
            self.k = min(max(self.k, 1), len(arrays["knn.bank"]))
        elif name == "vim":
            self.vim = VimHead(arrays)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.name == "msp":
            return -torch.softmax(logits / self.temperature, dim=1).max(dim=1).values
        if self.name == "energy":
            return -self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
        if self.name == "vim":
            return self.vim(features, logits)
        if self.name == "mahalanobis":
            diff = features[:, None, :] - self.means[None]  # (N, K, D)
            return ((diff @ self.precision) * diff).sum(-1).min(dim=1).values
        q = features / (features.norm(dim=1, keepdim=True) + 1e-12)
        kth = (q @ self.bank.T).topk(self.k, dim=1).values[:, -1]
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))


class PatchDriftHead(GraphHead):
    """The image's largest patch Mahalanobis distance, from the stages' maps (finest first)."""

    reads = MAPS

    def __init__(self, gaussian: PatchGaussian):
        super().__init__()
        arrays, params = gaussian.to_arrays()
        self.grid = tuple(params["grid"])
        self.stages = tuple(params["stages"])
        self.register_buffer("mean", _buffer(arrays["patch.mean"]))  # (P, d)
        self.register_buffer("precision", _buffer(arrays["patch.precision"]))  # (P, d, d)
        self.register_buffer("channels", torch.from_numpy(arrays["patch.channels"].astype(np.int64)))

    def maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, H, W) patch distances."""
        # Integer nearest upsampling = numpy's repeat in PatchGaussian; explicit sizes keep ONNX shapes static.
        e = torch.cat([maps[0], *[F.interpolate(m, size=self.grid, mode="nearest") for m in maps[1:]]], dim=1)
        e = e.index_select(1, self.channels).flatten(2).transpose(1, 2) - self.mean  # (N, P, d)
        # (N, P, d) x (P, d, d): batched over positions; one matmul per position, no (N, P, d, d) tensor.
        pe = torch.matmul(e.transpose(0, 1), self.precision).transpose(0, 1)  # (N, P, d)
        m2 = (pe * e).sum(-1)
        return torch.sqrt(torch.clamp(m2, min=0.0)).reshape(-1, *self.grid)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.maps(maps).flatten(1).max(dim=1).values


class PhotometricDriftHead(GraphHead):
    """Mahalanobis distance of the image's mean, log std and log mean |dx|, |dy| (image: (N, 1, H, W) in [0, 1])."""

    reads = IMAGE

    def __init__(self, gaussian: PhotometricGaussian):
        super().__init__()
        self.register_buffer("mean", _buffer(gaussian.mean))
        self.register_buffer("precision", _buffer(gaussian.precision))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image[:, 0]
        mean = x.mean(dim=(1, 2))
        std = torch.sqrt(((x - mean[:, None, None]) ** 2).mean(dim=(1, 2)))
        grad_x = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2))
        grad_y = (x[:, 1:, :] - x[:, :-1, :]).abs().mean(dim=(1, 2))
        stats = torch.stack([mean, torch.log(std + EPS), torch.log(grad_x + EPS), torch.log(grad_y + EPS)], dim=1)
        d = stats - self.mean
        return torch.sqrt(torch.clamp(((d @ self.precision) * d).sum(dim=1), min=0.0))


class VimHead(GraphHead):
    """ViM: alpha * ||(f - u) @ NS|| - logsumexp(logits) (Wang et al. 2022; OpenOOD ``VIMPostprocessor``)."""

    reads = POOLED

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__()
        self.register_buffer("origin", _buffer(arrays["vim.origin"]))
        self.register_buffer("null_space", _buffer(arrays["vim.null_space"]))
        self.register_buffer("alpha", _buffer(np.asarray(arrays["vim.alpha"]).reshape(())))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        residual = ((features - self.origin) @ self.null_space).norm(dim=1)
        return self.alpha * residual - torch.logsumexp(logits, dim=1)


class FusedDriftHead(GraphHead):
    """max_i (s_i - mu_i) / sigma_i over the member scores. Members are ``(reads, head)`` pairs, ``reads`` the
    input the head is called with: ``"pooled"`` (features, logits), ``"patch"`` (the maps) or ``"image"``."""

    def __init__(self, members: Sequence[tuple[str, GraphHead]], mu: Sequence[float], sigma: Sequence[float]):
        super().__init__()
        if not len(members) == len(mu) == len(sigma) or not members:
            raise ValueError("a fused Drift head needs one mu and sigma per member score, and >= 1 member")
        wrong = [f"{type(m).__name__} reads {getattr(m, 'reads', None)!r}, not {k!r}" for k, m in members
                 if getattr(m, "reads", None) != k]
        if wrong:
            raise ValueError(f"fused Drift head members given the wrong input: {'; '.join(wrong)}")
        self.kinds = [k for k, _ in members]
        self.members = nn.ModuleList([m for _, m in members])
        self.register_buffer("mu", torch.tensor(list(mu), dtype=torch.float32))
        self.register_buffer("sigma", torch.tensor(list(sigma), dtype=torch.float32))

    def from_inputs(self, x: GraphInputs) -> torch.Tensor:
        return self(*x)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, maps: Sequence[torch.Tensor] | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        x = GraphInputs(features, logits, maps, image)
        scores = [m.from_inputs(x) for m in self.members]
        z = (torch.stack(scores, dim=1) - self.mu) / self.sigma
        return z.max(dim=1).values


class MultiLayerExportHeads(nn.Module):
    """Like :class:`defectscope.onnx_export.exporter.ExportHeads` (same four outputs: logits, probabilities,
    features, drift) for a Drift head that needs the backbone's intermediate maps."""

    def __init__(self, model: nn.Module, drift: GraphHead, stages: Sequence[int]):
        super().__init__()
        self.model, self.drift, self.stages = model, drift, [int(s) for s in stages]

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        features, maps = multilayer_forward(self.model, image, self.stages)
        logits = self.model.logits_from_features(features, metadata)
        drift = drift_output(self.drift, features, logits, maps, image)
        return logits, torch.softmax(logits, dim=1), features, drift


def drift_output(head: GraphHead, features: torch.Tensor, logits: torch.Tensor,
                 maps: Sequence[torch.Tensor] | None, image: torch.Tensor) -> torch.Tensor:
    """The Drift head's score, given the head what it reads."""
    return head.from_inputs(GraphInputs(features, logits, maps, image))


# ---------------------------------------------------------------- member kind -> graph head

GRAPH_HEADS: dict[str, Callable[[DriftMember], GraphHead]] = {}


def register_graph_head(*kinds: str) -> Callable[[Callable[[Any], GraphHead]], Callable[[Any], GraphHead]]:
    """Register the builder of the graph head of the members of ``kinds`` (a member kind is exported iff it
    has one)."""
    def register(build: Callable[[Any], GraphHead]) -> Callable[[Any], GraphHead]:
        GRAPH_HEADS.update(dict.fromkeys(kinds, build))
        return build

    return register


@register_graph_head(*SCORES)
def _pooled_head(member: PooledScore) -> GraphHead:
    return DriftHead(member.kind, *member.scorer.to_arrays())


@register_graph_head(PATCH)
def _patch_head(member: PatchGaussian) -> GraphHead:
    return PatchDriftHead(member)


@register_graph_head(PHOTOMETRIC)
def _photometric_head(member: PhotometricGaussian) -> GraphHead:
    return PhotometricDriftHead(member)


def graph_head(member: DriftMember) -> GraphHead:
    """The graph head computing ``member``'s score, built by the builder registered for its kind."""
    build = GRAPH_HEADS.get(member.kind)
    if build is None:
        raise ValueError(f"the {member.kind} drift score has no graph head to export; registered: "
                         f"{', '.join(GRAPH_HEADS)}")
    return build(member)


def rule_head(rule: DriftRule) -> GraphHead:
    """A policy's Drift rule as one graph head: its member's head, or for a fused score a
    :class:`FusedDriftHead` over the members' heads with the rule's standardisation."""
    heads = [graph_head(m) for m in rule.bound_members()]
    if not rule.fused:
        return heads[0]
    std = rule.standardiser
    return FusedDriftHead([(h.reads, h) for h in heads], [std.mu[m] for m in rule.members],
                          [std.sigma[m] for m in rule.members])


def describe(head: nn.Module) -> dict[str, Any]:
    """Buffer sizes of a Drift head, for the export report (the ONNX file grows by about this much)."""
    n = sum(b.numel() for b in head.buffers())
    return {"head": type(head).__name__, "parameters": int(n), "bytes_fp32": int(4 * n)}
