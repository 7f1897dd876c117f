"""Drift (out-of-distribution) scores in plain numpy: higher = more unlike the training images.

The deployed predictor computes the chosen score from the model's penultimate features and logits with
this module alone, so it must never import torch. The formulas follow OpenOOD v1.5
(``openood/postprocessors``) and pytorch-ood (``pytorch_ood.detector``); their sign is flipped where
needed so that every score here grows with "Drift".

Scores:

- ``msp``: -max softmax probability (Hendrycks & Gimpel 2017; OpenOOD ``MSPPostprocessor``).
- ``energy``: -T * logsumexp(logits / T) (Liu et al. 2020; pytorch-ood ``EnergyBased``, which returns the
  same sign: higher energy = more OOD).
- ``mahalanobis``: min over classes of (f - mu_c)^T Sigma^-1 (f - mu_c), class means and one tied
  covariance fitted on training features (Lee et al. 2018, without input preprocessing; OpenOOD ``MDS``).
- ``knn``: distance from the L2-normalised feature to its k-th nearest normalised training feature
  (Sun et al. 2022; OpenOOD ``KNNPostprocessor``, k = 50 on CIFAR; default here 10 for small datasets).
- ``vim``: Virtual-logit Matching (Wang et al. 2022; OpenOOD ``VIMPostprocessor``): the norm of the
  feature's residual outside the principal subspace of the training features (centred at the origin
  ``u = -pinv(W) b`` of the linear head), scaled by ``alpha`` = mean max-logit / mean residual on training
  images, minus the energy ``logsumexp(logits)``. Needs the head's weight and bias when fitting.

Saved as ``RUN/drift.safetensors`` (numpy arrays, nothing pickled) plus ``RUN/drift.json`` (parameters).
One :class:`DriftScorer` holds the statistics of all of them; :class:`PooledScore` is one of its scores as a
member of a policy's Drift rule (:class:`~defectscope.decision.drift.member.DriftMember`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from defectscope.decision.drift.member import POOLED, DriftError

if TYPE_CHECKING:  # only for the annotations: the predictor imports this module without pandas or yaml
    from defectscope.rundir import Run

# 2: Ledoit-Wolf shrinkage by default (``shrinkage`` "ledoit-wolf", the fitted value in ``shrinkage_fitted``);
# version-1 files (a fixed shrinkage) load and score as they were: the precision is stored, not refitted.
DRIFT_VERSION = 2
SCORES = ("msp", "energy", "mahalanobis", "knn", "vim")


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def msp_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-max_k softmax(logits / T)_k, in [-1, -1/K]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return -np.exp(z.max(axis=1) - _logsumexp(z))


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy E(x) = -T * logsumexp(logits / T); unbounded, low on confident training-like images."""
    z = np.asarray(logits, dtype=np.float64)
    return -temperature * _logsumexp(z / temperature)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    # The epsilon keeps an all-zero feature (possible after ReLU) finite instead of NaN.
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)


LEDOIT_WOLF = "ledoit-wolf"


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """The Ledoit-Wolf (2004) shrinkage of the covariance of ``centred`` (N, D) rows towards ``mu * I``.

    The intensity that minimises the expected Frobenius error of ``(1 - s) S + s mu I``, ``mu = trace(S) / D``,
    estimated from the data (the formula of scikit-learn's ``ledoit_wolf_shrinkage``, without its blocks).
    With fewer images than features it is large, which is what keeps the precision well conditioned.
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if n == 0:
        return 1.0
    x2 = x ** 2
    trace_per_dim = x2.sum(axis=0) / n
    mu = trace_per_dim.sum() / d
    delta = ((x.T @ x) ** 2).sum() / n ** 2 - 2 * mu * trace_per_dim.sum() + d * mu ** 2  # ||S - mu I||_F^2
    beta = ((x2.T @ x2).sum() / n - ((x.T @ x) ** 2).sum() / n ** 2) / n  # sum_i ||x_i x_i^T - S||_F^2 / n^2
    beta = min(beta, delta)
    return 0.0 if delta <= 0 else float(beta / delta)


def fit_mahalanobis(
    features: np.ndarray, labels: np.ndarray, *, shrinkage: float | str = LEDOIT_WOLF
) -> tuple[np.ndarray, np.ndarray, float]:
    """(class means (K, D), tied precision (D, D), shrinkage used), float64.

    The covariance is the pooled within-class maximum-likelihood estimate (divided by N, as sklearn's
    ``EmpiricalCovariance`` in OpenOOD's MDS), shrunk towards a scaled identity:
    ``(1 - s) * Sigma + s * trace(Sigma) / D * I``. ``shrinkage="ledoit-wolf"`` (default) estimates ``s`` from
    the data (:func:`ledoit_wolf_shrinkage`): with 1,280 features and a few hundred images the fixed 1e-3 of
    version 1 left the matrix near singular, so normal images scored from 1e4 to 1e12 and the threshold printed
    as 2.75e+13. ``shrinkage=0`` gives the textbook estimate (pseudo-inverse). Labels are class indices 0..K-1;
    a class without training features gets a NaN mean and is ignored when scoring.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if f.ndim != 2 or len(f) != len(y):
        raise DriftError(f"features must be (N, D) with one label each, got {f.shape} and {y.shape}")
    k = int(y.max()) + 1 if len(y) else 0
    d = f.shape[1]
    means = np.full((k, d), np.nan)
    centred = np.empty_like(f)
    for c in range(k):
        rows = y == c
        if rows.any():
            means[c] = f[rows].mean(axis=0)
            centred[rows] = f[rows] - means[c]
    cov = centred.T @ centred / max(len(f), 1)
    s = ledoit_wolf_shrinkage(centred) if shrinkage == LEDOIT_WOLF else float(shrinkage)
    if s:
        cov = (1.0 - s) * cov + s * np.trace(cov) / d * np.eye(d)
    precision = np.linalg.pinv(cov, hermitian=True)
    return means, precision, s


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min_c (f - mu_c)^T P (f - mu_c) over classes with a mean (squared distance, not its root)."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[1:] != means.shape[1:]:
        raise DriftError(f"features have {f.shape[1:]} dimensions, the fitted means {means.shape[1:]}")
    best = np.full(len(f), np.inf)
    for mu in means:
        if np.isnan(mu).any():
            continue
        diff = f - mu
        best = np.minimum(best, np.einsum("nd,de,ne->n", diff, precision, diff))
    return best


def knn_score(features: np.ndarray, bank: np.ndarray, k: int = 10, *, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each L2-normalised feature to its k-th nearest row of ``bank``.

    ``bank`` must already be L2-normalised. On unit vectors ||a - b|| = sqrt(2 - 2 a.b), so one matmul
    per chunk gives every distance; ``k`` is clipped to the bank's size.
    """
    q = l2_normalise(features)
    if q.shape[1:] != bank.shape[1:]:
        raise DriftError(f"features have {q.shape[1:]} dimensions, the kNN bank {bank.shape[1:]}")
    if len(bank) == 0:
        raise DriftError("the kNN bank is empty")
    kk = min(max(int(k), 1), len(bank))
    out = np.empty(len(q), dtype=np.float64)
    for i in range(0, len(q), chunk):
        sim = q[i:i + chunk] @ bank.T
        # The k-th largest similarity is the k-th nearest neighbour.
        kth = -np.partition(-sim, kk - 1, axis=1)[:, kk - 1]
        out[i:i + chunk] = np.sqrt(np.clip(2.0 - 2.0 * kth.astype(np.float64), 0.0, None))
    return out


def fit_vim(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, dim: int | None = None
            ) -> dict[str, np.ndarray]:
    """ViM statistics: ``vim.origin`` (D,), ``vim.null_space`` (D, D - dim), ``vim.alpha`` (scalar array).

    ``dim``: the principal subspace's dimension; default half the feature dimension, capped at N - 1
    (OpenOOD uses 256 of 512 for CIFAR ResNet-18; the paper 1000 of 2048 for ImageNet ResNet-50).
    """
    f = np.asarray(features, dtype=np.float64)
    w, b = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if f.ndim != 2 or w.ndim != 2 or w.shape[1] != f.shape[1] or b.shape != (w.shape[0],):
        raise DriftError(f"ViM needs features (N, D), head weight (K, D) and bias (K,); got {f.shape}, "
                         f"{w.shape}, {b.shape}")
    n, d = f.shape
    dim = min(d // 2 if dim is None else int(dim), d - 1, max(n - 1, 1))
    origin = -np.linalg.pinv(w) @ b
    centred = f - origin
    evals, evecs = np.linalg.eigh(centred.T @ centred / n)
    null_space = evecs[:, np.argsort(evals)[::-1][dim:]]
    residual = np.linalg.norm(centred @ null_space, axis=1)
    max_logit = (f @ w.T + b).max(axis=1)
    # A zero residual (training features inside the subspace) would make alpha infinite; 1 keeps it finite.
    alpha = max_logit.mean() / residual.mean() if residual.mean() > 0 else 1.0
    # Sorted keys: the order safetensors reads them back in.
    return {"vim.alpha": np.asarray(alpha, dtype=np.float64).reshape(1),
            "vim.null_space": np.ascontiguousarray(null_space, np.float32), "vim.origin": origin.astype(np.float32)}


def vim_score(features: np.ndarray, logits: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """alpha * ||(f - u) @ NS|| - logsumexp(logits): higher = more unlike training."""
    f = np.asarray(features, dtype=np.float64)
    origin, null_space = stats["vim.origin"].astype(np.float64), stats["vim.null_space"].astype(np.float64)
    if f.shape[1:] != origin.shape:
        raise DriftError(f"features have {f.shape[1:]} dimensions, the ViM origin {origin.shape}")
    residual = np.linalg.norm((f - origin) @ null_space, axis=1)
    return float(stats["vim.alpha"].reshape(-1)[0]) * residual - _logsumexp(np.asarray(logits, dtype=np.float64))


class DriftScorer:
    """Fitted statistics of the training features, and every Drift score computed from them.

    ``fit`` keeps the class means and tied precision (Mahalanobis) and a seeded random subset of at most
    ``max_bank`` normalised training features (kNN). ``score`` returns ``{name: (N,) float64}`` for the
    scores in ``SCORES`` (all higher = more unlike training).
    """

    def __init__(self, *, k: int = 10, temperature: float = 1.0, shrinkage: float | str = LEDOIT_WOLF,
                 max_bank: int = 5000, seed: int = 0):
        if not 1 <= k <= 50:
            raise DriftError(f"k must be in 1..50, got {k}")
        if shrinkage != LEDOIT_WOLF and not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1):
            raise DriftError(f"shrinkage must be {LEDOIT_WOLF!r} or a number in [0, 1], got {shrinkage!r}")
        self.k, self.temperature = int(k), float(temperature)
        self.shrinkage: float | str = shrinkage if shrinkage == LEDOIT_WOLF else float(shrinkage)
        self.shrinkage_fitted: float | None = None  # the intensity used by the last fit
        self.max_bank, self.seed = int(max_bank), int(seed)
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.bank: np.ndarray | None = None
        self.vim: dict[str, np.ndarray] | None = None  # fitted only when the head is given
        self.n_train = 0

    @property
    def fitted(self) -> bool:
        return self.means is not None

    def fit(self, features: np.ndarray, logits: np.ndarray | None, labels: np.ndarray,
            head: tuple[np.ndarray, np.ndarray] | None = None) -> DriftScorer:
        """Fit on training ``features`` (N, D) with class indices ``labels``; logits are not needed for
        any fitted statistic (MSP and energy have none) and are accepted for symmetry with ``score``.
        ``head``: the classifier's linear (weight (K, D), bias (K,)), for ViM; without it ViM is not fitted."""
        f = np.asarray(features, dtype=np.float32)
        if len(f) == 0:
            raise DriftError("no training features to fit the drift scores on")
        self.means, self.precision, self.shrinkage_fitted = fit_mahalanobis(f, labels, shrinkage=self.shrinkage)
        idx = np.arange(len(f))
        if len(f) > self.max_bank:
            idx = np.sort(np.random.default_rng(self.seed).choice(len(f), self.max_bank, replace=False))
        self.bank = l2_normalise(f[idx])
        self.vim = fit_vim(f, *head) if head is not None else None
        self.n_train = len(f)
        return self

    @property
    def available(self) -> tuple[str, ...]:
        """The scores these statistics can compute (ViM only when fitted with the head)."""
        return tuple(s for s in SCORES if s != "vim" or self.vim is not None)

    def score(self, features: np.ndarray | None, logits: np.ndarray | None,
              names: tuple[str, ...] | list[str] | None = None) -> dict[str, np.ndarray]:
        """The requested scores (default: all that the statistics allow; features-based ones need ``fit``)."""
        wanted = tuple(names) if names is not None else self.available
        unknown = set(wanted) - set(SCORES)
        if unknown:
            raise DriftError(f"unknown drift scores {sorted(unknown)}; valid: {', '.join(SCORES)}")
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            if name in ("msp", "energy"):
                if logits is None:
                    raise DriftError(f"the {name} score needs logits")
                fn = msp_score if name == "msp" else energy_score
                out[name] = fn(logits, self.temperature)
                continue
            if features is None:
                raise DriftError(f"the {name} score needs features")
            if not self.fitted:
                raise DriftError(f"the {name} score needs a fitted DriftScorer (call fit or load)")
            if name == "mahalanobis":
                out[name] = mahalanobis_score(features, self.means, self.precision)
            elif name == "vim":
                if self.vim is None or logits is None:
                    raise DriftError("the vim score needs logits and statistics fitted with the classifier's head")
                out[name] = vim_score(features, logits, self.vim)
            else:
                out[name] = knn_score(features, self.bank, self.k)
        return out

    def params(self) -> dict[str, Any]:
        return {
            "version": DRIFT_VERSION, "scores": list(SCORES), "k": self.k, "temperature": self.temperature,
            "shrinkage": self.shrinkage, "shrinkage_fitted": self.shrinkage_fitted,
            "max_bank": self.max_bank, "seed": self.seed, "n_train": self.n_train,
            "available": list(self.available) if self.fitted else [],
            "feature_dim": None if self.means is None else int(self.means.shape[1]),
        }

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays for ``safetensors.numpy.save_file``, JSON-able parameters)."""
        if not self.fitted:
            raise DriftError("nothing to save: the DriftScorer is not fitted")
        arrays = {
            "mahalanobis.means": np.ascontiguousarray(self.means),
            "mahalanobis.precision": np.ascontiguousarray(self.precision),
            "knn.bank": np.ascontiguousarray(self.bank),
            **(self.vim or {}),
        }
        return arrays, self.params()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> DriftScorer:
        if params.get("version", DRIFT_VERSION) > DRIFT_VERSION:
            raise DriftError(f"drift statistics version {params['version']} is newer than this defectscope reads")
        missing = {"mahalanobis.means", "mahalanobis.precision", "knn.bank"} - set(arrays)
        if missing:
            raise DriftError(f"drift statistics lack {sorted(missing)}")
        s = cls(k=params["k"], temperature=params["temperature"], shrinkage=params["shrinkage"],
                max_bank=params["max_bank"], seed=params["seed"])
        legacy = params["shrinkage"] if params.get("version", 1) < 2 else None  # version 1: a fixed shrinkage
        s.shrinkage_fitted = params.get("shrinkage_fitted", legacy)
        s.means, s.precision, s.bank = arrays["mahalanobis.means"], arrays["mahalanobis.precision"], arrays["knn.bank"]
        vim = {k: v for k, v in arrays.items() if k.startswith("vim.")}
        s.vim = vim if len(vim) == 3 else None
        s.n_train = int(params.get("n_train", 0))
        return s

    def state(self) -> dict[str, Any]:
        """``{"arrays": ..., "params": ...}``: what ``drift.safetensors`` and ``drift.json`` hold."""
        arrays, params = self.to_arrays()
        return {"arrays": arrays, "params": params}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DriftScorer:
        return cls.from_arrays(state["arrays"], state["params"])

    def save(self, run: Run) -> Path:
        """Write ``RUN/drift.safetensors`` and ``RUN/drift.json``; returns the path of the first."""
        arrays, params = self.to_arrays()
        return run.save_drift_statistics(arrays, params)

    @classmethod
    def load(cls, run: Run) -> DriftScorer:
        stats = run.drift_statistics()
        if stats is None:
            raise DriftError(f"{run.path}: no drift statistics (drift.safetensors + drift.json); run calibrate first")
        return cls.from_arrays(*stats)


@dataclass(frozen=True)
class PooledScore:
    """One pooled score (``kind`` in :data:`SCORES`, checked when scoring) of a :class:`DriftScorer`, as a Drift
    rule's member.

    The pooled members of one rule share one scorer (one set of statistics in ``drift.safetensors``);
    ``X`` is ``(features, logits)``.
    """

    kind: str
    scorer: DriftScorer
    reads: ClassVar[str] = POOLED

    def fit(self, X: tuple[np.ndarray, np.ndarray | None], labels: np.ndarray,
            head: tuple[np.ndarray, np.ndarray] | None = None) -> PooledScore:
        """Fit the shared scorer (see :meth:`DriftScorer.fit`): every member sharing it is refitted."""
        self.scorer.fit(*X, labels, head=head)
        return self

    def score_samples(self, X: tuple[np.ndarray | None, np.ndarray | None]) -> np.ndarray:
        features, logits = X
        return self.scorer.score(features, logits, [self.kind])[self.kind]

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.scorer.state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PooledScore:
        return cls(state["kind"], DriftScorer.from_state(state))
