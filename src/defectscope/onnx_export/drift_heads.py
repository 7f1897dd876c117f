"""Drift scores as torch modules for the exported ONNX graph: the patch score, ViM, and their z-scored max.

Each module reproduces a numpy score of :mod:`defectscope.decision` (tests compare them), so the deployed
predictor reads one ``drift`` output and stays torch-free:

- :class:`PatchDriftHead`: :class:`defectscope.decision.drift.patch.PatchGaussian` (per-position Mahalanobis,
  max over positions) from the backbone's intermediate maps;
- :class:`PhotometricDriftHead`: :class:`defectscope.decision.drift.photometric.PhotometricGaussian` (the
  Mahalanobis distance of four grey-level statistics) from the graph's ``image`` input;
- :class:`VimHead`: ViM from the pooled features and logits (:func:`defectscope.decision.drift.vim_score`);
- :class:`FusedDriftHead`: the largest standardised score, ``max_i (s_i - mu_i) / sigma_i``, with
  ``mu_i, sigma_i`` from held-out normal images (:mod:`defectscope.decision.drift.fusion`);
- :class:`MultiLayerExportHeads`: the run's Classifier giving logits, probabilities, pooled features and the
  Drift score in one backbone pass (the stages' maps come out of the same forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.decision.drift.patch import PatchGaussian, multilayer_forward
from defectscope.decision.drift.photometric import EPS, PhotometricGaussian


def _buffer(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


class PatchDriftHead(nn.Module):
    """The image's largest patch Mahalanobis distance, from the stages' maps (finest first)."""

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


class PhotometricDriftHead(nn.Module):
    """Mahalanobis distance of the image's mean, log std and log mean |dx|, |dy| (image: (N, 1, H, W) in [0, 1])."""

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


class VimHead(nn.Module):
    """ViM: alpha * ||(f - u) @ NS|| - logsumexp(logits) (Wang et al. 2022; OpenOOD ``VIMPostprocessor``)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__()
        self.register_buffer("origin", _buffer(arrays["vim.origin"]))
        self.register_buffer("null_space", _buffer(arrays["vim.null_space"]))
        self.register_buffer("alpha", _buffer(np.asarray(arrays["vim.alpha"]).reshape(())))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        residual = ((features - self.origin) @ self.null_space).norm(dim=1)
        return self.alpha * residual - torch.logsumexp(logits, dim=1)


class FusedDriftHead(nn.Module):
    """max_i (s_i - mu_i) / sigma_i over the member scores. Members are ``("pooled", module)`` called with
    (features, logits), ``("patch", PatchDriftHead)`` called with the maps or ``("image",
    PhotometricDriftHead)`` called with the input image."""

    def __init__(self, members: Sequence[tuple[str, nn.Module]], mu: Sequence[float], sigma: Sequence[float]):
        super().__init__()
        if not len(members) == len(mu) == len(sigma) or not members:
            raise ValueError("a fused Drift head needs one mu and sigma per member score, and >= 1 member")
        self.kinds = [k for k, _ in members]
        self.members = nn.ModuleList([m for _, m in members])
        self.register_buffer("mu", torch.tensor(list(mu), dtype=torch.float32))
        self.register_buffer("sigma", torch.tensor(list(sigma), dtype=torch.float32))

    def forward(self, features: torch.Tensor, logits: torch.Tensor, maps: Sequence[torch.Tensor] | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        scores = [m(maps) if k == "patch" else m(image) if k == "image" else m(features, logits)
                  for k, m in zip(self.kinds, self.members, strict=True)]
        z = (torch.stack(scores, dim=1) - self.mu) / self.sigma
        return z.max(dim=1).values


class MultiLayerExportHeads(nn.Module):
    """Like :class:`defectscope.onnx_export.exporter.ExportHeads` (same four outputs: logits, probabilities,
    features, drift) for a Drift head that needs the backbone's intermediate maps."""

    def __init__(self, model: nn.Module, drift: nn.Module, stages: Sequence[int]):
        super().__init__()
        self.model, self.drift, self.stages = model, drift, [int(s) for s in stages]

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        features, maps = multilayer_forward(self.model, image, self.stages)
        logits = self.model.logits_from_features(features, metadata)
        drift = drift_output(self.drift, features, logits, maps, image)
        return logits, torch.softmax(logits, dim=1), features, drift


def drift_output(head: nn.Module, features: torch.Tensor, logits: torch.Tensor,
                 maps: Sequence[torch.Tensor] | None, image: torch.Tensor) -> torch.Tensor:
    """The Drift head's score, given each kind of head what it reads."""
    if isinstance(head, PatchDriftHead):
        return head(maps)
    if isinstance(head, PhotometricDriftHead):
        return head(image)
    if isinstance(head, FusedDriftHead):
        return head(features, logits, maps, image)
    return head(features, logits)


def describe(head: nn.Module) -> dict[str, Any]:
    """Buffer sizes of a Drift head, for the export report (the ONNX file grows by about this much)."""
    n = sum(b.numel() for b in head.buffers())
    return {"head": type(head).__name__, "parameters": int(n), "bytes_fp32": int(4 * n)}
