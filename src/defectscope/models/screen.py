"""The screen stage of a two-stage cascade as one torch module, shared by its calibration and its export.

The screen sees the classifier's input (the image as the deployment decodes it, at the classifier's size)
resized inside the module to its own size, so the function whose threshold is calibrated is exactly the
function the exported graph computes; a different resize path would void the escape guarantee.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ScreenScore(nn.Module):
    """(N, 1, H, W) in [0, 1] at any size -> the screen's P(good) (N,), softmax of its logits (temperature 1).

    Bilinear resizing without antialiasing (what ONNX Resize exports at opset 17); a screen trained on
    PIL-resized images sees slightly different pixels, which costs accuracy, never the guarantee.
    """

    def __init__(self, screen: nn.Module, image_size: int, good_index: int):
        super().__init__()
        self.screen = screen
        self.image_size = int(image_size)
        self.good_index = int(good_index)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Always resized (an identity at equal sizes): a shape test would be frozen into the exported graph.
        image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.softmax(self.screen(image), dim=1)[:, self.good_index]


@torch.no_grad()
def screen_scores(module: ScreenScore, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """P(good) float64 (N,) of uint8 images (N, H, W), fed as ``uint8 / 255`` like every forward pass."""
    module.eval()
    out = [module(torch.as_tensor(images[i:i + batch_size]).float().div_(255).unsqueeze(1)).double().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty(0)
