"""Grad-CAM inside the exported graph: the line's heatmap without autograd and without torch.

Grad-CAM (Selvaraju et al. 2017) weights the last feature map ``A`` (C, h, w) by the mean gradient of the
decided class's logit over each channel, ``cam = relu(sum_c mean_hw(dy/dA_c) A_c)``. When the pooled features
are the spatial mean of ``A`` (global average pooling, as in EfficientNet and ResNet), ``dy/dA_c`` is the same
at every position, ``(dy/dp_c) / (h w)``, so the weights are the gradient of the logit with respect to the
pooled features, and that gradient has a closed form for every head we build:

- ``Linear``: ``W[k]``;
- :class:`~defectscope.models.heads.KernelHead`: ``-2 gamma sum_j V[k, j] e_j (z - l_j)``, ``e_j`` the kernel
  values against the landmarks;
- :class:`~defectscope.models.heads.OrdinalHead`: the gradient of its shared severity score;
- through the frozen recipe's :class:`~defectscope.models.heads.FeatureNorm`: ``1 / (2 sqrt(|p|) scale)``.

With test-time views the pooled features average the views; the map shown is the identity view's, whose
gradient is the same up to a factor the normalisation removes. :class:`CamHead` computes it from tensors the
forward pass already has, in plain ops, so ONNX Runtime and OpenVINO return a ``heatmap`` output beside the
probabilities: (N, h, w) in [0, 1], each image scaled by its own maximum. Backbones whose pooled features are
not the mean of their last map (seed CNNs with dense layers, MobileNetV3's conv head) get no heatmap.
"""

from __future__ import annotations

import torch
from torch import nn

from defectscope.models.heads import FeatureNorm, KernelHead, OrdinalHead

SQRT_FLOOR = 1e-6  # |p| below this: the square root's slope is capped instead of infinite


def supports_cam(model: nn.Module) -> bool:
    """Whether ``model`` (a Classifier) pools its last map by a plain spatial mean, checked numerically."""
    backbone = model.backbone
    if not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
        return False
    if not isinstance(model.head, nn.Linear | KernelHead | OrdinalHead):
        return False
    if isinstance(model.head, OrdinalHead) and not isinstance(model.head.score, nn.Linear | KernelHead):
        return False
    size = 64
    x = torch.rand(2, 1, size, size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = backbone.forward_features(x)
            p = backbone.forward_head(a, pre_logits=True)
    except Exception:  # an unusual backbone: no heatmap rather than a failed export
        return False
    finally:
        model.train(was_training)
    return a.ndim == 4 and p.shape == a.shape[:2] and torch.allclose(p, a.mean((2, 3)), atol=1e-5)


def forward_with_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled features before ``post`` (N, D), the same after ``post``, the identity view's last map
    (N, D, h, w)) of a Classifier on ``x`` in [0, 1]. The pooled features equal ``model.forward_features``."""
    backbone = model.backbone
    xn = (x - model.mean) / model.std
    final = backbone.forward_features(xn)
    pooled = backbone.forward_head(final, pre_logits=True)
    pooled = model.pooled_over_views(xn, pooled)
    return pooled, model.post(pooled), final


def _head_gradient(head: nn.Module, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit[target] / d z for each row of ``z`` (N, D): the image-feature part of the head's input."""
    if isinstance(head, OrdinalHead):
        return _head_gradient(head.score, z, torch.zeros_like(target))  # the severity score's gradient
    if isinstance(head, nn.Linear):
        return head.weight[target][:, : z.shape[1]]
    if isinstance(head, KernelHead):
        d2 = (z * z).sum(1, keepdim=True) - 2.0 * z @ head.landmarks.T + (head.landmarks * head.landmarks).sum(1)
        e = torch.exp(-head.gamma * torch.clamp(d2, min=0.0))
        a = head.linear.weight[target][:, : e.shape[1]] * e  # V[k, j] e_j, (N, M)
        return -2.0 * head.gamma * (a.sum(1, keepdim=True) * z - a @ head.landmarks)
    raise TypeError(f"no closed-form gradient for a {type(head).__name__} head")


class CamHead(nn.Module):
    """The heatmap of the decided class (argmax of ``logits``) from the forward pass's own tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor, z: torch.Tensor, final: torch.Tensor, logits: torch.Tensor
                ) -> torch.Tensor:
        target = logits.argmax(1)
        g = _head_gradient(self.model.head, z, target)
        post = self.model.post
        if isinstance(post, FeatureNorm):
            g = g / (2.0 * torch.sqrt(torch.clamp(torch.abs(pooled), min=SQRT_FLOOR)) * post.scale)
        cam = torch.relu((g[:, :, None, None] * final).sum(1))
        return cam / (cam.flatten(1).amax(1)[:, None, None] + 1e-12)
