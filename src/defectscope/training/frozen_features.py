"""The frozen-feature recipe: pretrained backbone fixed, pooled features averaged over the data's symmetries,
an RBF-kernel (or linear) head fitted with scikit-learn. Seconds to fit once the features are computed.

Why: on ELPV (2,624 cells, 2 CPU cores) EfficientNet-Lite0 ImageNet features at 224 px, averaged over the
8 flips/quarter turns, with an RBF head reach 0.79-0.80 test accuracy, above the default 11-minute
fine-tune (0.76), in the time of one pass over the images (research/elpv/FINDINGS.md).

The head is fitted on the training split only; its C is chosen by 3-fold stratified cross-validation inside it
(macro-F1), so the validation split stays unseen and comparable with a fine-tuned run's validation score,
and the test split stays clean for calibration and evaluation.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.config import RunConfig
from defectscope.metrics import classification_metrics
from defectscope.models.factory import Classifier
from defectscope.models.heads import KernelHead, OrdinalHead, symmetry_views
from defectscope.models.inference import to_input
from defectscope.progress import progress
from defectscope.training.distributed import current

log = logging.getLogger(__name__)

MAX_LANDMARKS = 4000  # bounds the kernel head's size (landmarks x features floats) and fit time
MISSING_CLASS_BIAS = -30.0  # logit of a class with no training images: never predicted


@torch.no_grad()
def pooled_features(model: Classifier, images: np.ndarray, *, batch_size: int = 32, desc: str = "frozen features",
                    show: bool = True) -> np.ndarray:
    """``model.forward_features`` of uint8 images (N, H, W) as float64 (N, D), in eval mode.

    Progress goes to :func:`defectscope.progress.progress` (the demo spends minutes here): a bar on the CLI's
    terminal, a logged line every so often in a piped log, nothing for a library caller."""
    model.eval()
    x = torch.as_tensor(np.asarray(images))
    out = []
    counter = progress(desc=desc, total=len(x), unit="images", enabled=show)
    try:
        for i in range(0, len(x), batch_size):
            batch = to_input(x[i:i + batch_size], torch.device("cpu"), True)
            out.append(model.forward_features(batch).double().numpy())
            counter.update(len(out[-1]))
    finally:
        counter.close()
    return np.concatenate(out) if out else np.empty((0, model.num_features))


def _sharded_features(model: Classifier, images: np.ndarray, val_images: np.ndarray, batch_size: int,
                      show: bool = True):
    """(training features, validation features or None); under torchrun each rank extracts its share and
    rank 0 gets them all (the other ranks get (None, None))."""
    dist = current()
    show = show and dist.main
    feats = dist.gather_rows(pooled_features(model, images[dist.rows(len(images))], batch_size=batch_size,
                                             desc="frozen features (training images)", show=show), len(images))
    val_feats = None
    if len(val_images):
        val_feats = dist.gather_rows(pooled_features(model, val_images[dist.rows(len(val_images))],
                                                     batch_size=batch_size, desc="frozen features (validation "
                                                     "images)", show=show), len(val_images))
    return (feats, val_feats) if dist.main else (None, None)


def _sample_weights(labels: np.ndarray, num_classes: int, cfg: RunConfig) -> np.ndarray | None:
    if not cfg.train.class_weights:
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = (counts.sum() / (present.sum() * counts[present])) ** cfg.train.class_weight_power
    return w[labels]


def _cv_folds(labels: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; as many as the smallest class allows (max 3: each fold refits the kernel map and
    every C, and 3 folds already pick C reliably). Fewer than 2: no CV possible."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min()) if len(labels) else 0
    n = min(3, smallest)
    if n < 2:
        return []
    return list(StratifiedKFold(n, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


class _HeadFitter:
    """One head kind on standardised features: features -> (kernel map) -> logistic regression, either
    multinomial (softmax over classes) or, with ``num_ranks``, cumulative-link over ordered ranks."""

    def __init__(self, kind: str, seed: int, num_ranks: int | None = None):
        self.kind, self.seed, self.num_ranks = kind, seed, num_ranks

    def embed_fit(self, z: np.ndarray) -> Any:
        if self.kind == "linear":
            return None
        from sklearn.kernel_approximation import Nystroem

        m = min(len(z), MAX_LANDMARKS)
        return Nystroem(gamma=1.0 / z.shape[1], n_components=m, random_state=self.seed).fit(z)

    @staticmethod
    def embed(emb: Any, z: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        e = z if emb is None else emb.transform(z)
        return e if metadata is None else np.hstack([e, metadata])

    def fit(self, e: np.ndarray, y: np.ndarray, c: float, w: np.ndarray | None, start: Any = None) -> Any:
        """Logistic regression; ``start`` (the fit at the previous, smaller C) warm-starts the solver."""
        if self.num_ranks is not None:
            from defectscope.training.ordinal import CoralLogit

            head = start.set_params(C=c, warm_start=True) if start is not None else CoralLogit(self.num_ranks, C=c)
            return head.fit(e, y, sample_weight=w)
        from sklearn.linear_model import LogisticRegression

        if start is None:
            return LogisticRegression(C=c, max_iter=3000).fit(e, y, sample_weight=w)
        return start.set_params(C=c, warm_start=True).fit(e, y, sample_weight=w)


def fit_head(z: np.ndarray, labels: np.ndarray, kind: str, grid: list[float], seed: int,
             weights: np.ndarray | None = None, num_ranks: int | None = None,
             metadata: np.ndarray | None = None) -> dict[str, Any]:
    """Choose C by stratified CV (macro-F1) and fit one head on standardised features ``z``.

    ``labels`` are class indices, or ranks 0..num_ranks-1 for a cumulative-link head (``num_ranks``).
    ``metadata`` (N, M): encoded metadata inputs, appended after the kernel map (they enter linearly).
    Returns ``{"fitter", "embedding" (Nystroem or None), "model" (the fitted regression), "C", "cv_macro_f1",
    "seconds": {"cv", "fit"}}``; numpy only, so benchmarks can fit heads on cached features.
    """
    fitter = _HeadFitter(kind, seed, num_ranks)
    started = time.perf_counter()
    grid = sorted(grid)
    scores: dict[float, float] = {}
    folds = _cv_folds(labels, seed)
    if folds and len(grid) > 1:
        from sklearn.metrics import f1_score

        predictions = {c: np.empty(len(labels), dtype=int) for c in grid}
        for fit_idx, held_idx in folds:
            emb = fitter.embed_fit(z[fit_idx])
            e_fit = fitter.embed(emb, z[fit_idx], None if metadata is None else metadata[fit_idx])
            e_held = fitter.embed(emb, z[held_idx], None if metadata is None else metadata[held_idx])
            w = weights[fit_idx] if weights is not None else None
            previous = None
            for c in grid:  # ascending C: each fit starts from the last, more regularised one
                previous = fitter.fit(e_fit, labels[fit_idx], c, w, previous)
                predictions[c][held_idx] = previous.predict(e_held)
        scores = {c: float(f1_score(labels, p, average="macro")) for c, p in predictions.items()}
        best_c = max(grid, key=lambda c: (scores[c], -abs(np.log(c))))  # ties: the C nearest 1
    else:
        best_c = grid[len(grid) // 2]
        if len(grid) > 1:
            log.warning(f"too few images per class for cross-validation; frozen head uses C={best_c:g}")
    t_cv = time.perf_counter() - started

    started = time.perf_counter()
    emb = fitter.embed_fit(z)
    model = fitter.fit(fitter.embed(emb, z, metadata), labels, best_c, weights)
    return {"fitter": fitter, "embedding": emb, "model": model, "C": best_c, "cv_macro_f1": scores,
            "seconds": {"cv": round(t_cv, 1), "fit": round(time.perf_counter() - started, 1)}}


# Below this share of the median spread a feature counts as constant on the training images.
DEAD_SPREAD = 0.01


def power_norm(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) of :class:`~defectscope.models.heads.FeatureNorm` fitted on training features."""
    p = np.sign(feats) * np.sqrt(np.abs(feats))
    std = p.std(0)
    # A channel (nearly) constant on the training images, often dead at a small input size, must not be divided
    # by its tiny spread: a new image that lights it up would land 1e5 standard deviations away, outside every
    # RBF landmark (one class for everything) and with a Mahalanobis Drift score of 1e13. Such a channel gets
    # the typical spread of the others, so it counts like any feature.
    typical = float(np.median(std[std > 0])) if (std > 0).any() else 1.0
    return p.mean(0), np.where(std < DEAD_SPREAD * typical, typical, std)


def class_ranks(classes: list[str], order: list[str]) -> np.ndarray:
    """Rank of each class (in ``classes`` order) along ``order`` (least to most severe)."""
    if sorted(order) != sorted(classes):
        raise ValueError(f"the class order {order} must list exactly the classes {classes}")
    return np.array([order.index(c) for c in classes])


def fit_frozen(model: Classifier, cfg: RunConfig, images: np.ndarray, labels: np.ndarray,
               val_images: np.ndarray, val_labels: np.ndarray, classes: list[str], *,
               metadata: np.ndarray | None = None, val_metadata: np.ndarray | None = None) -> dict[str, Any]:
    """Fit the frozen-feature head in place on ``model`` (a pretrained Classifier); return what was chosen.

    ``metadata``/``val_metadata``: encoded metadata inputs (N, M) for a model with ``metadata_dim`` M. They are
    appended after the features' normalisation: beside the standardised features for a linear head, beside
    the kernel values (entering the logistic regression linearly) for the RBF head.

    Returns ``{"views", "C", "cv_macro_f1" (per C), "val": metrics or None, "seconds": {...}}``.
    """
    if len(np.unique(labels)) < 2:
        raise ValueError("the frozen-feature recipe needs training images of at least two classes")
    k = len(classes)
    m_dim = model.metadata_dim
    if m_dim:
        model.metadata_scale.fill_(1.0)  # beside standardised features; the fitted head sets their weight
    if m_dim and (metadata is None or len(metadata) != len(images)):
        raise ValueError(f"the model takes {m_dim} metadata values per image; give them for every training image")
    for p in model.parameters():
        p.requires_grad_(False)
    model.views = symmetry_views(cfg.augment.hflip, cfg.augment.vflip, cfg.augment.rot90)
    started = time.perf_counter()
    feats, val_feats = _sharded_features(model, images, val_images, cfg.train.batch_size, cfg.train.progress)
    if feats is None:  # under torchrun: rank 0 alone fits the head, once, on every rank's features
        return None
    t_features = time.perf_counter() - started
    log.info(f"frozen features: {len(images) + (len(val_images) if val_feats is not None else 0)} images x "
             f"{len(model.views)} views, {feats.shape[1]} features ({t_features:.1f}s)")

    shift, scale = power_norm(feats)
    z = (np.sign(feats) * np.sqrt(np.abs(feats)) - shift) / scale
    weights = _sample_weights(labels, k, cfg)
    ranks = class_ranks(classes, cfg.data.class_order) if cfg.train.ordinal else None
    fitted = fit_head(z, labels if ranks is None else ranks[labels], cfg.train.frozen_head, cfg.train.frozen_c,
                      cfg.training_seed, weights, num_ranks=None if ranks is None else k,
                      metadata=metadata if m_dim else None)
    emb, lr, best_c, scores = fitted["embedding"], fitted["model"], fitted["C"], fitted["cv_macro_f1"]
    t_cv, t_fit = fitted["seconds"]["cv"], fitted["seconds"]["fit"]
    if ranks is not None:
        head = _ordinal_head(feats.shape[1], emb, lr, ranks, m_dim)
        model.make_frozen(head)
    else:
        _install_softmax_head(model, feats.shape[1], emb, lr, k, m_dim)
    model.post.shift.copy_(torch.from_numpy(shift).float())
    model.post.scale.copy_(torch.from_numpy(scale).float())

    val = None
    if val_feats is not None:
        with torch.no_grad():
            val_m = None if val_metadata is None else torch.from_numpy(np.asarray(val_metadata)).float()
            val_logits = model.head(model.head_input(model.post(torch.from_numpy(val_feats).float()), val_m)).numpy()
        val = classification_metrics(val_labels, val_logits.argmax(1), classes)
    cv = ", ".join(f"C={c:g} {s:.3f}" for c, s in scores.items()) or "not run"
    log.info(f"frozen {cfg.train.frozen_head} head: C={best_c:g} chosen by 3-fold cross-validation (macro-F1 "
             f"{cv}); " + (f"validation macro-F1 {val['macro_f1']:.4f}" if val else "no validation images"))
    return {"views": list(model.views), "C": best_c, "cv_macro_f1": scores, "val": val,
            "landmarks": 0 if emb is None else len(emb.components_),
            "ranks": None if ranks is None else [int(r) for r in ranks],
            "seconds": {"features": round(t_features, 1), "cv": round(t_cv, 1), "fit": round(t_fit, 1)}}


def _score_layer(dim: int, emb: Any, coef: np.ndarray, bias: np.ndarray, passthrough: int = 0) -> nn.Module:
    """``coef`` (outputs, embedded dims) on the embedded features as a layer: Linear, or the RBF kernel map
    with the Nystroem whitening folded into the weights (one matrix product). The last ``passthrough``
    columns (metadata inputs) bypass the kernel and keep their coefficients."""
    if emb is None:
        layer = nn.Linear(dim + passthrough, len(coef))
        layer.weight.data = torch.from_numpy(coef).float()
        linear = layer
    else:
        n_land = len(emb.components_)
        layer = KernelHead(dim, n_land, len(coef), gamma=emb.gamma, passthrough=passthrough)
        layer.landmarks.copy_(torch.from_numpy(emb.components_).float())
        folded = np.hstack([coef[:, :n_land] @ emb.normalization_, coef[:, n_land:]])
        layer.linear.weight.data = torch.from_numpy(folded).float()
        linear = layer.linear
    linear.bias.data = torch.from_numpy(np.asarray(bias, dtype=np.float64)).float()
    return layer


def _install_softmax_head(model: Classifier, dim: int, emb: Any, lr: Any, k: int, passthrough: int = 0) -> None:
    coef = np.zeros((k, lr.coef_.shape[1]))
    bias = np.full(k, MISSING_CLASS_BIAS)
    present = lr.classes_.astype(int)
    if lr.coef_.shape[0] == 1:  # sklearn's binary form: one logit for the second class
        coef[present[0]], coef[present[1]] = -lr.coef_[0] / 2, lr.coef_[0] / 2
        bias[present[0]], bias[present[1]] = -lr.intercept_[0] / 2, lr.intercept_[0] / 2
    else:
        coef[present], bias[present] = lr.coef_, lr.intercept_
    model.make_frozen(_score_layer(dim, emb, coef, bias, passthrough))


def _ordinal_head(dim: int, emb: Any, coral: Any, ranks: np.ndarray, passthrough: int = 0) -> OrdinalHead:
    head = OrdinalHead(_score_layer(dim, emb, coral.coef_[None], np.zeros(1), passthrough), [int(r) for r in ranks])
    head.cuts.copy_(torch.from_numpy(coral.cuts_).float())
    return head
