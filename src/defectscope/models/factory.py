"""One model factory: any timm architecture by name, or one of the die-bridge seed CNNs.

Every model is a :class:`Classifier`: input normalisation, a backbone that yields a pooled feature
vector, and a linear head. Drift scores and Grad-CAM use the same features for every architecture,
and the exported graph carries the normalisation, so a deployed model needs no side knowledge.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from defectscope.errors import DefectscopeError
from defectscope.models import feature_memo
from defectscope.models.ensemble import ARCHITECTURE as ENSEMBLE
from defectscope.models.ensemble import AveragedHeads, MemberFeatures
from defectscope.models.heads import IDENTITY_VIEW, FeatureNorm, KernelHead, OrdinalHead, dihedral
from defectscope.models.seed_cnn import SEED_CNNS, SeedCNN, create_seed_cnn

# Grayscale statistics: the mean of ImageNet's RGB means and stds, which is what an RGB stem summed to
# one channel was trained to see.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


class ModelError(DefectscopeError, ValueError):
    """An unknown architecture or a pretrained source that does not fit it."""


class Classifier(nn.Module):
    """Input in [0, 1], shape (B, C, H, W) -> class logits.

    ``views`` (see :func:`~defectscope.models.heads.symmetry_views`) averages the pooled backbone features
    over flips / quarter turns of the input: test-time augmentation that is part of the model, so it is in
    the exported graph too. ``post`` transforms the pooled features before the head (the frozen-feature
    recipe's :class:`~defectscope.models.heads.FeatureNorm`); ``head`` may be a Linear layer or a
    :class:`~defectscope.models.heads.KernelHead`.

    ``metadata_dim`` > 0 (see :meth:`set_metadata_dim`): the model also takes a metadata vector (B, M), the
    encoded metadata inputs (:mod:`defectscope.data.metadata_inputs`), concatenated to the pooled features
    (after ``post``) before the head. ``forward_features`` stays the image's features alone (Drift, banks).
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, drop_rate: float = 0.0,
                 mean: float = GRAY_MEAN, std: float = GRAY_STD):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 1, 1, 1))
        self.dropout = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.post: nn.Module = nn.Identity()
        self.views: tuple[int, ...] = IDENTITY_VIEW
        self.metadata_dim = 0

    def set_metadata_dim(self, dim: int, scale: float | None = None) -> None:
        """Take ``dim`` metadata values beside the image: a fresh linear head over features + metadata.

        ``scale`` multiplies the metadata vector before the head (a buffer, saved with the weights). Default
        num_features: under Adam every weight moves about ``lr`` per step, so one metadata weight beside
        hundreds of feature weights could otherwise shift a logit by only ~lr x steps (under 1 in a typical
        fine-tune) and the model learns to ignore it (seen on the test fixture: scale 1 and sqrt(D) left the
        metadata-defined classes half confused, D separated them). The metadata weights start at zero so the
        large scale does not add random logits at the start. The frozen recipe sets 1: there the features
        are standardised and the head is fitted in closed form.
        """
        self.metadata_dim = int(dim)
        out = self.head.out_features
        self.head = nn.Linear(self.num_features + self.metadata_dim, out)
        with torch.no_grad():
            self.head.weight[:, self.num_features:] = 0.0
        value = float(self.num_features) if scale is None else float(scale)
        self.register_buffer("metadata_scale", torch.tensor(value))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (B, num_features): what Drift scores and feature banks use. At inference
        on the CPU an image already seen by the same weights is not computed again (:mod:`feature_memo`)."""
        if feature_memo.enabled(self, x):
            return self.post(feature_memo.pooled(self, x))
        return self.post(self.pooled_over_views((x - self.mean) / self.std))

    def pooled_over_views(self, xn: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's pooled features of the normalised input ``xn``, averaged over the model's views;
        ``identity``: the identity view's pooled features when the caller already has them (one pass fewer)."""
        views = tuple(self.views)
        if views == (0,):
            return identity if identity is not None else self.backbone(xn)
        return torch.stack([identity if k == 0 and identity is not None else self.backbone(dihedral(xn, k))
                            for k in views]).mean(0)

    def make_frozen(self, head: nn.Module) -> None:
        """Turn into the frozen-feature model: FeatureNorm after pooling, ``head`` (Linear or KernelHead)."""
        self.post = FeatureNorm(self.num_features)
        self.head = head
        self.dropout = nn.Dropout(0.0)

    def head_input(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """What the head sees: the features, with the metadata vector beside them when the model takes one."""
        if not self.metadata_dim:
            return features
        if metadata is None:
            raise ValueError(f"this model takes {self.metadata_dim} metadata values beside the image; none given")
        if not torch.jit.is_tracing() and metadata.shape != (features.shape[0], self.metadata_dim):
            raise ValueError(f"metadata of shape {tuple(metadata.shape)}; expected ({features.shape[0]}, "
                             f"{self.metadata_dim})")
        return torch.cat([features, metadata.to(features.dtype) * self.metadata_scale], dim=1)

    def logits_from_features(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        # Dropout on the image features only: dropping a one-hot metadata value would just be noise.
        return self.head(self.head_input(self.dropout(features), metadata))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits_from_features(self.forward_features(x), metadata)

    def param_groups(self) -> list[list[str]]:
        """Backbone parameter names grouped from input to output (stem, blocks...), then the head."""
        if isinstance(self.backbone, SeedCNN):
            groups = self.backbone.param_groups()
        else:
            from timm.models import group_parameters

            matcher = self.backbone.group_matcher(coarse=True)
            groups = [list(names) for _, names in sorted(group_parameters(self.backbone, matcher).items())]
        groups = [[f"backbone.{n}" for n in names] for names in groups]
        return [*groups, [f"head.{n}" for n, _ in self.head.named_parameters()]]


def list_models(pattern: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, optionally filtered by a glob such as ``'*resnet*'``."""
    import timm

    names = sorted(SEED_CNNS) + timm.list_models()
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 1,
    image_size: int = 224,
    pretrained: str | None = None,
    drop_rate: float = 0.0,
) -> Classifier:
    """Build a classifier; ``pretrained`` is ``None``, ``'auto'``, ``'package'``, ``'hub[:name]'`` or a file.

    Unknown names raise :class:`ModelError` listing close matches and where to see them all.
    """
    if name in SEED_CNNS:
        if pretrained not in (None, "none", "", "auto"):
            raise ModelError(f"{name} has no pretrained weights; use pretrained: none")
        backbone = create_seed_cnn(name, in_chans, image_size)
        model = Classifier(backbone, backbone.num_features, num_classes, drop_rate)
        model.pretrained_report = {"source": None}
        return model

    import timm

    if not timm.is_model(name):
        close = [n for n in list_models() if name.lower()[:5] in n][:10]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model {name!r}.{hint} Seed CNNs: {', '.join(SEED_CNNS)}; "
            "any timm architecture works (see `defectscope models`)."
        )
    backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    report: dict[str, Any] = {"source": None}
    mean, std = GRAY_MEAN, GRAY_STD
    if pretrained not in (None, "none", ""):
        from defectscope.models.pretrained import (
            PACKAGE_MEAN,
            PACKAGE_STD,
            PretrainedError,
            apply_pretrained,
            resolve_source,
        )

        try:
            source = resolve_source(name, pretrained)
            if source is not None:
                report = apply_pretrained(backbone, name, source, in_chans=in_chans)
        except PretrainedError as exc:
            raise ModelError(str(exc)) from None
        # Pretrained weights keep the input statistics they were trained with (one channel: their average).
        if report.get("source") == "package":
            mean, std = PACKAGE_MEAN, PACKAGE_STD
        elif report.get("source"):
            cfg = getattr(backbone, "pretrained_cfg", {}) or {}
            mean = float(sum(cfg.get("mean", (GRAY_MEAN,))) / len(cfg.get("mean", (GRAY_MEAN,))))
            std = float(sum(cfg.get("std", (GRAY_STD,))) / len(cfg.get("std", (GRAY_STD,))))
    # With num_classes=0 timm returns pre-logits, which for some families (MobileNetV3) pass a conv head
    # wider than num_features.
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    model = Classifier(backbone, width, num_classes, drop_rate, mean=mean, std=std)
    model.pretrained_report = report
    return model


def ensemble_model(members: list[Classifier]) -> Classifier:
    """One Classifier averaging ``members``' class probabilities (see :mod:`defectscope.models.ensemble`). The
    members are taken over: their heads move into the ensemble's head, so every weight has one owner. Raises
    :class:`ModelError` for fewer than two members, differing class counts or a member with metadata inputs."""
    if len(members) < 2:
        raise ModelError(f"an ensemble needs at least two members; got {len(members)}")
    outputs = {m.head.out_features for m in members}
    if len(outputs) != 1:
        raise ModelError(f"ensemble members predict different numbers of classes: {sorted(outputs)}")
    if any(m.metadata_dim for m in members):
        raise ModelError("ensembles of models with metadata inputs are not supported; ensemble image-only runs")
    heads = []
    for m in members:
        heads.append(m.head)
        m.head, m.dropout = nn.Identity(), nn.Identity()
    backbone = MemberFeatures(members)
    # mean 0, std 1: each member normalises its own input (members may come from different pretrained sources).
    model = Classifier(backbone, sum(backbone.widths), outputs.pop(), mean=0.0, std=1.0)
    model.head = AveragedHeads(heads, backbone.widths)
    return model


def model_spec(model: Classifier, model_name: str, classes: list[str], image_size: int, **extra: Any) -> dict[str, Any]:
    """The JSON description saved beside the weights: everything needed to rebuild and feed the model."""
    return {
        "architecture": model_name,
        "classes": list(classes),
        "num_classes": len(classes),
        "in_chans": 1,
        "image_size": image_size,
        "input": "grayscale uint8 resized to image_size, scaled to [0, 1]; normalisation is inside the model",
        "mean": round(float(model.mean), 6),
        "std": round(float(model.std), 6),
        **extra,
    }


def metadata_width(spec: dict[str, Any]) -> int:
    """Length of the metadata vector a spec's model takes (0: image only); see ``metadata_inputs`` in the spec."""
    return sum(len(f["categories"]) if f["kind"] == "categorical" else 1 for f in spec.get("metadata_inputs") or [])


def model_from_spec(spec: dict[str, Any]) -> Classifier:
    """Rebuild the architecture from a saved spec (weights are loaded by the caller)."""
    if spec["architecture"] == ENSEMBLE:
        return ensemble_model([model_from_spec(s) for s in spec["members"]])
    model = create_model(
        spec["architecture"],
        spec["num_classes"],
        in_chans=spec.get("in_chans", 1),
        image_size=spec["image_size"],
        pretrained=None,
    )
    model.views = tuple(spec.get("views", IDENTITY_VIEW))
    m = metadata_width(spec)
    if m:
        model.set_metadata_dim(m)
    frozen = spec.get("frozen_head")
    if frozen:
        outputs = 1 if frozen.get("ordinal") else spec["num_classes"]  # ordinal: one shared score
        if frozen["kind"] == "rbf":
            head: nn.Module = KernelHead(model.num_features, int(frozen["landmarks"]), outputs, passthrough=m)
        else:
            head = nn.Linear(model.num_features + m, outputs)
        if frozen.get("ordinal"):
            head = OrdinalHead(head, frozen["ranks"])
        model.make_frozen(head)
    return model
