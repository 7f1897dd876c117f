"""Grad-CAM heatmaps for a defectscope :class:`~defectscope.models.factory.Classifier`.

Uses the ``grad-cam`` package (``pytorch_grad_cam``). The model is only read: it is put in eval mode
for the duration (so BatchNorm statistics and dropout are untouched), its weights are never written,
and any ``.grad`` the backward pass leaves on its parameters is restored to what it was before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from defectscope.errors import DefectscopeError


class GradCamError(DefectscopeError, RuntimeError):
    """The architecture offers no layer Grad-CAM can use."""


def target_layer(model: nn.Module) -> tuple[nn.Module, str]:
    """The layer whose activations Grad-CAM weighs, and its dotted name (for the report).

    Rule: the last ``nn.Conv2d`` in ``model.backbone`` in registration order (``named_modules``).
    For a SeedCNN that is its last convolution; for timm EfficientNets ``conv_head``; for timm ResNets
    the last convolution of ``layer4[-1]`` (before the residual addition, which is close enough for a
    heatmap); in an ensemble, the last member's (the map shows where that member looked). The rule
    assumes modules are registered in execution order, which holds for timm's CNNs; transformers have no
    Conv2d after their patch embedding and get that, which makes a poor map.
    """
    backbone = getattr(model, "backbone", model)
    found: tuple[nn.Module, str] | None = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            found = (module, f"backbone.{name}" if backbone is not model else name)
    if found is None:
        raise GradCamError(f"{type(backbone).__name__} has no Conv2d layer for Grad-CAM")
    return found


def _as_batch(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (H, W) uint8 / float images -> (N, 1, H, W) float32 in [0, 1], the model's input."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected (N, H, W) grayscale images, got shape {x.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(x[:, None].copy())


def gradcam_maps(
    model: nn.Module,
    images: np.ndarray,
    targets: Sequence[int],
    *,
    layer: nn.Module | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for grayscale ``images`` (N, H, W) towards class ``targets``.

    ``images`` are what the model sees: uint8 (scaled by 1/255) or floats already in [0, 1], at the
    model's input size. Each map is min-max scaled per image by grad-cam; a map with no positive
    evidence is all zeros. Raises :class:`GradCamError` when no target layer exists; other failures of
    the grad-cam package propagate (the report catches them).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _as_batch(images)
    if len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images")
    if layer is None:
        layer, _ = target_layer(model)
    was_training = model.training
    # A model that averages over flipped/turned views (TTA) would fire the layer hook once per view and
    # misalign the maps: explain the identity view alone (of every member, in an ensemble).
    with_views = [(m, m.views) for m in model.modules() if isinstance(getattr(m, "views", None), tuple)]
    for m, _ in with_views:
        m.views = (0,)
    saved_grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    model.eval()
    out = []
    try:
        # evaluate() may run under no_grad/inference; Grad-CAM needs the backward pass.
        with torch.set_grad_enabled(True), GradCAM(model=model, target_layers=[layer]) as cam:
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size].clone()
                # Frozen backbones have no parameter requiring grad, so the graph would never reach the
                # hooked activations; an input that requires grad keeps it alive.
                chunk.requires_grad_(True)
                wanted = [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]]
                out.append(np.asarray(cam(input_tensor=chunk, targets=wanted), dtype=np.float32))
    finally:
        for p, g in saved_grads:
            p.grad = g
        model.train(was_training)
        for m, views in with_views:
            m.views = views
    maps = np.concatenate(out) if out else np.zeros((0, *x.shape[2:]), dtype=np.float32)
    # grad-cam divides by (max + 1e-7); guard the NaN a degenerate layer output could still produce.
    return np.clip(np.nan_to_num(maps, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
