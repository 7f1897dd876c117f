"""The die-bridge project's own small CNNs, rebuilt so its recipe can be rerun beside ours.

Keras defaults are kept: 3x3 'valid' convolutions, 2x2 max-pooling, Flatten into Dense layers, ReLU.
The softmax lives in the loss and the exported model, as for every other architecture here.
"""

from __future__ import annotations

import torch
from torch import nn

# name -> (conv channels, dense widths)
SEED_CNNS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "seed_cnn1": ((64,), (64,)),
    "seed_cnn2": ((32, 64), (128,)),
    "seed_cnn3": ((32, 64, 128), (128, 64)),
}


class SeedCNN(nn.Module):
    """Backbone only: ``forward`` returns the last dense layer's activations (the penultimate features)."""

    def __init__(self, convs: tuple[int, ...], dense: tuple[int, ...], in_chans: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_chans, image_size
        for width in convs:
            layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, side = width, (side - 2) // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(convs)} conv+pool stages")
        self.features = nn.Sequential(*layers)
        mlp: list[nn.Module] = [nn.Flatten()]
        width_in = channels * side * side
        for width in dense:
            mlp += [nn.Linear(width_in, width), nn.ReLU(inplace=True)]
            width_in = width
        self.mlp = nn.Sequential(*mlp)
        self.num_features = width_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x))

    def param_groups(self) -> list[list[str]]:
        """Parameter names from input to output, one group per layer, for phased fine-tuning."""
        groups = []
        for prefix, module in (("features", self.features), ("mlp", self.mlp)):
            for i, layer in enumerate(module):
                names = [f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()]
                if names:
                    groups.append(names)
        return groups


def create_seed_cnn(name: str, in_chans: int, image_size: int) -> SeedCNN:
    convs, dense = SEED_CNNS[name]
    return SeedCNN(convs, dense, in_chans, image_size)
