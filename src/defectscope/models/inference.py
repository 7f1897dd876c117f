"""Forward passes of a trained :class:`~defectscope.models.factory.Classifier` over cached uint8 images.

Training (validation), calibration, evaluation and export all feed images the same way, through these
functions: ``uint8 / 255`` as float32, one channel, optionally channels-last on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images (N, H, W) -> float (N, 1, H, W) in [0, 1] on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _metadata_batch(metadata: np.ndarray | None, i: int, n: int, device: torch.device) -> torch.Tensor | None:
    return None if metadata is None else torch.as_tensor(np.asarray(metadata[i:i + n]), dtype=torch.float32).to(device)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 64,
    device: torch.device | None = None, channels_last: bool = False, metadata: np.ndarray | None = None,
) -> torch.Tensor:
    """Logits for uint8 images (N, H, W), in eval mode, on the model's device; ``metadata``: the encoded
    metadata inputs (N, M) of a model that takes them (see :mod:`defectscope.data.metadata_inputs`)."""
    device = device or next(model.parameters()).device
    images = torch.as_tensor(images)
    model.eval()
    extra = (lambda i: (_metadata_batch(metadata, i, batch_size, device),)) if metadata is not None else (lambda i: ())
    out = [
        model(to_input(images[i:i + batch_size], device, channels_last), *extra(i)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, model.head.out_features)


def features_and_logits(model: nn.Module, images: np.ndarray, *, batch_size: int = 64,
                        metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (N, D) float32, logits (N, K) float64) of uint8 images (N, H, W), one pass.
    The features are the image's alone; ``metadata`` (N, M) joins them for the logits of a model that takes it."""
    device = next(model.parameters()).device
    x_all = torch.as_tensor(np.asarray(images))
    model.eval()
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            f = model.forward_features(to_input(x_all[i:i + batch_size], device, False)).float()
            feats.append(f.cpu().numpy())
            m = _metadata_batch(metadata, i, batch_size, device)
            head_in = model.head_input(f, m) if hasattr(model, "head_input") else f
            logits.append(model.head(head_in).double().cpu().numpy())
    d, k = getattr(model, "num_features", model.head.in_features), model.head.out_features
    if not feats:
        return np.empty((0, d), np.float32), np.empty((0, k), np.float64)
    return np.concatenate(feats), np.concatenate(logits)
