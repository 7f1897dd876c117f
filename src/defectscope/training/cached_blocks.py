"""Cached outputs of a fine-tuning phase's frozen early blocks (``train.cache_frozen``).

A phase that trains only the head or the last blocks (``unfreeze: head`` or ``last:N``) passes every image
through the same frozen stem and early blocks each epoch, and on a CPU that forward pass is most of the
epoch's cost. With the cache, the phase computes those blocks' output map once per training image and per
symmetry view at its start, and every epoch runs only the later blocks: an epoch costs a fraction.

What it changes, and why it is opt-in:
- geometric augmentation stays exact: the maps are cached for every view of the data's symmetry group (the
  flips and quarter turns switched on in ``augment``) and each step draws one view per image, uniformly,
  which is the distribution ``augment_batch`` draws flips and turns from;
- photometric augmentation (brightness, contrast, gamma, noise) cannot be applied to a cached map, so a
  cached phase trains without it;
- the cache holds ``images x views`` maps in memory (float32); a phase whose cache would exceed
  ``MAX_CACHE_BYTES`` trains without it.

Only EfficientNet-family timm backbones (the offline EfficientNet-Lite weights among them) are split this way:
their stem and ``blocks`` stages are a plain sequence. Other backbones train uncached, with a warning.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from defectscope.models.heads import dihedral, symmetry_views
from defectscope.models.inference import to_input
from defectscope.training.distributed import current

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 6 * 2**30


def _efficientnet(backbone: nn.Module) -> bool:
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(backbone, EfficientNet)


def frozen_blocks(model: nn.Module) -> int:
    """How many leading ``blocks`` stages of the model's backbone are frozen, stem included (0: nothing to
    cache, the stem trains, or the backbone is not an EfficientNet)."""
    bb = model.backbone
    if not _efficientnet(bb):
        return 0
    if any(p.requires_grad for m in (bb.conv_stem, bb.bn1) for p in m.parameters()):
        return 0
    n = 0
    for stage in bb.blocks:
        if any(p.requires_grad for p in stage.parameters()):
            break
        n += 1
    return n


class FrozenPrefixCache:
    """The frozen stem + ``n_blocks`` stages' output maps of the training images, one set per symmetry view."""

    def __init__(self, maps: torch.Tensor, views: tuple[int, ...], n_blocks: int, seconds: float = 0.0):
        self.maps = maps  # (V, N, C, h, w) float32, CPU
        self.views = views
        self.n_blocks = n_blocks
        self.seconds = seconds  # what building it took

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, images: torch.Tensor, augment, *, device: torch.device,
              batch_size: int = 64, channels_last: bool = False) -> FrozenPrefixCache | None:
        """The cache for ``model``'s current frozen prefix over uint8 ``images`` (N, H, W), or None when there
        is no frozen prefix to cache or it would not fit in ``MAX_CACHE_BYTES``."""
        started = time.perf_counter()
        n_blocks = frozen_blocks(model)
        if n_blocks == 0:
            if not _efficientnet(model.backbone):
                log.warning(f"train.cache_frozen: {type(model.backbone).__name__} backbones are not split into "
                            "cacheable blocks (EfficientNet only); this phase trains uncached")
            return None
        views = symmetry_views(augment.hflip, augment.vflip, augment.rot90 and images.shape[-1] == images.shape[-2])
        bb = model.backbone
        prefix = nn.Sequential(bb.conv_stem, bb.bn1, *list(bb.blocks)[:n_blocks])
        was_training = model.training
        model.eval()
        try:
            probe = prefix(to_input(images[:1], device, channels_last)).shape[1:]
            nbytes = len(views) * len(images) * int(np.prod(probe)) * 4
            if nbytes > MAX_CACHE_BYTES:
                log.warning(f"train.cache_frozen: the cache would take {nbytes / 2**30:.1f} GiB "
                            f"(> {MAX_CACHE_BYTES / 2**30:.0f}); this phase trains uncached")
                return None
            dist = current()  # under torchrun each rank computes its share of the images; all get every map
            part = images[dist.rows(len(images))]
            maps = torch.empty((len(views), len(part), *probe), dtype=torch.float32)
            for i in range(0, len(part), batch_size):
                xn = (to_input(part[i:i + batch_size], device, channels_last) - model.mean) / model.std
                for v, k in enumerate(views):
                    maps[v, i:i + batch_size] = prefix(dihedral(xn, k)).float().cpu()
            if dist.active:
                maps = dist.gather_rows(maps.transpose(0, 1), len(images)).transpose(0, 1)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - started
        log.info(f"train.cache_frozen: stem + {n_blocks} of {len(bb.blocks)} stages cached for {len(images)} "
                 f"images x {len(views)} views ({nbytes / 2**20:.0f} MiB, {seconds:.1f}s)"
                 + ("; photometric augmentation is off in this phase" if augment.photometric else ""))
        return cls(maps, views, n_blocks, seconds)

    def take(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The cached maps of training images ``idx``, each in one view drawn uniformly from the group."""
        if len(self.views) == 1:
            return self.maps[0, idx]
        v = torch.randint(0, len(self.views), (len(idx),), generator=gen)
        return self.maps[v, idx]

    def forward(self, model: nn.Module, maps: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits from cached maps: the remaining stages, the head convolution, pooling, the head."""
        bb = model.backbone
        h = maps
        for stage in list(bb.blocks)[self.n_blocks:]:
            h = stage(h)
        pooled = bb.forward_head(bb.bn2(bb.conv_head(h)), pre_logits=True)
        return model.logits_from_features(model.post(pooled), metadata)
