"""The ``photometric`` Drift score: how unlike the training images an image's grey levels are.

A camera that loses contrast or exposure still shows a cell: every feature score (pooled or patch) reads a
darker or flatter image as "a cell", and on ELPV they separate contrast loss and underexposure from normal
images at AUROC ~0.76-0.80 only. Four grey-level statistics of the model's input image do that job:

    mean, log(std), log(mean |dx|), log(mean |dy|)

(brightness, contrast, and the horizontal and vertical edge energy, which also drops with defocus and rises
with noise), scored by their Mahalanobis distance to the training images' statistics (one Gaussian,
Ledoit-Wolf shrinkage). Four numbers per image: free to compute, so it is meant as a member of a max fusion
(``max(mahalanobis,photometric)``) beside a score of the content. The statistics are small enough to live in
``policy.json`` itself; :class:`defectscope.onnx_export.drift_heads.PhotometricDriftHead` computes the same in
the exported graph from its ``image`` input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from defectscope.decision.drift.member import IMAGE, DriftError

if TYPE_CHECKING:
    from defectscope.rundir import Run

PHOTOMETRIC = "photometric"
STATS = ("mean", "log_std", "log_grad_x", "log_grad_y")
EPS = 1e-3  # keeps the logs finite for a constant image


def grey_stats(images: np.ndarray) -> np.ndarray:
    """(N, 4) statistics of uint8 images (N, H, W) (or floats in [0, 1], (N, H, W) or (N, 1, H, W))."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1] < 2 or x.shape[2] < 2:
        raise DriftError(f"photometric statistics need grey images (N, H, W) of at least 2 x 2 pixels, got {x.shape}")
    flat = x.reshape(len(x), -1)
    grad_x = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    grad_y = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2))
    return np.column_stack([flat.mean(1), np.log(flat.std(1) + EPS), np.log(grad_x + EPS), np.log(grad_y + EPS)])


@dataclass
class PhotometricGaussian:
    """One Gaussian over :func:`grey_stats` of normal images; the score is the Mahalanobis distance to it. A
    Drift rule's member (:class:`~defectscope.decision.drift.member.DriftMember`) reading the images."""

    mean: np.ndarray | None = None  # (4,)
    precision: np.ndarray | None = None  # (4, 4)
    n_train: int = 0
    kind: ClassVar[str] = PHOTOMETRIC
    reads: ClassVar[str] = IMAGE

    def fit(self, images: np.ndarray) -> PhotometricGaussian:
        from sklearn.covariance import LedoitWolf

        stats = grey_stats(images)
        if len(stats) < 2:
            raise DriftError(f"the photometric score needs >= 2 normal images to fit, got {len(stats)}")
        lw = LedoitWolf().fit(stats)
        self.mean, self.precision, self.n_train = lw.location_, lw.precision_, len(stats)
        return self

    def score_samples(self, images: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise DriftError("the photometric Drift statistics are not fitted")
        d = grey_stats(images) - self.mean
        return np.sqrt(np.clip(np.einsum("ni,ij,nj->n", d, self.precision, d), 0.0, None))

    score = score_samples  # its name before the member protocol, kept for the benches and tests

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (policy.json's ``drift.photometric``)."""
        return {"stats": list(STATS), "eps": EPS, "mean": np.asarray(self.mean).tolist(),
                "precision": np.asarray(self.precision).tolist(), "n_train": int(self.n_train)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhotometricGaussian:
        if list(d.get("stats", [])) != list(STATS):
            raise DriftError(f"policy.json's photometric statistics are {d.get('stats')}, this version computes "
                             f"{list(STATS)}; calibrate the run again")
        mean, precision = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["precision"], dtype=np.float64)
        if mean.shape != (len(STATS),) or precision.shape != (len(STATS), len(STATS)):
            raise DriftError("policy.json's photometric statistics have the wrong shape; calibrate the run again")
        return cls(mean, precision, int(d.get("n_train", 0)))


    def state(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PhotometricGaussian:
        return cls.from_dict(state)


def fit_photometric(run: Run) -> PhotometricGaussian:
    """The photometric statistics of the run's training images (as the model sees them: resized, grey)."""
    _, images = run.images(run.rows("train"))
    return PhotometricGaussian().fit(images)


__all__ = ["PHOTOMETRIC", "STATS", "PhotometricGaussian", "fit_photometric", "grey_stats"]
