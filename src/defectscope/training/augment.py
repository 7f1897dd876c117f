"""Augmentation on whole batches of cached images, driven by one torch.Generator so runs repeat and resume.

Photometric changes are on by default. Flips and quarter turns are opt-in: die structures have a fixed
orientation and the die-bridge teams found that flips and rotations hurt; solar cells are symmetric.
"""

from __future__ import annotations

import torch

from defectscope.config import AugmentConfig


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """x: float (B, 1, H, W) in [0, 1]; returns a new tensor in [0, 1]."""
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * scale

    # Draw every random number whether or not it is used, so switching one option off does not
    # change the random stream seen by the others.
    flips = torch.rand(b, 3, generator=gen)
    turns = torch.randint(0, 4, (b,), generator=gen)
    brightness, contrast, gamma = uniform(cfg.brightness), uniform(cfg.contrast), uniform(cfg.gamma)
    noise_level = torch.rand(b, 1, 1, 1, generator=gen) * cfg.noise
    noise = torch.randn(x.shape, generator=gen)

    if cfg.hflip:
        x = torch.where((flips[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
    if cfg.vflip:
        x = torch.where((flips[:, 1] < 0.5).view(b, 1, 1, 1), x.flip(-2), x)
    if cfg.rot90 and x.shape[-1] == x.shape[-2]:
        rotated = x.clone()
        for k in (1, 2, 3):
            sel = turns == k
            if sel.any():
                rotated[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        x = rotated
    if cfg.photometric:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + contrast) + mean + brightness
        x = x.clamp(0, 1) ** torch.exp(gamma)
        x = x + noise * noise_level
    return x.clamp(0, 1)
