"""An ordinal (cumulative-link) classifier for ordered labels, fitted with numpy/scipy: one shared score
``f(x) = e @ w`` and K-1 cut points ``b_0 <= ... <= b_{K-2}`` with ``P(rank > k) = sigmoid(f - b_k)``.

Why: ELPV's classes are a defect probability (0 < 1/3 < 2/3 < 1) and severity grades in general are
ordered. A softmax head treats "defective called possibly defective" like "defective called functional";
a cumulative-link head has one score along the order, so its errors stay between neighbours, and the same
score ranks images by how defective they look (a candidate score for the escape cap).

Fitted CORAL-style (Cao et al. 2020): the K-1 binary problems "rank > k" share ``w`` and each has its own
bias; the loss is their summed logistic loss, which is convex, plus ``|w|^2 / 2`` with the loss scaled by
``C`` exactly as scikit-learn's LogisticRegression, so the same C grid means the same thing. With shared
weights the optimal cut points are ordered (CORAL's theorem); the fit enforces it anyway so that the class
probabilities ``P(rank = k) = sigmoid(f - b_{k-1}) - sigmoid(f - b_k)`` are never negative.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize
from scipy.special import expit


def rank_probabilities(f: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) in rank order from shared scores ``f`` (N,) and ordered ``cuts`` (K-1,)."""
    above = expit(np.asarray(f, dtype=np.float64)[:, None] - np.asarray(cuts, dtype=np.float64)[None])  # P(r > k)
    n = len(above)
    upper = np.concatenate([np.ones((n, 1)), above], axis=1)  # P(r > k - 1)
    lower = np.concatenate([above, np.zeros((n, 1))], axis=1)  # P(r > k)
    return np.clip(upper - lower, 0.0, 1.0)


class CoralLogit:
    """Cumulative-link logistic regression on embedded features; labels are ranks 0..K-1.

    ``coef_`` (D,), ``cuts_`` (K-1,) after :meth:`fit`. ``warm_start`` reuses the previous solution as the
    starting point (the C grid is walked in ascending order, as for the softmax head).
    """

    def __init__(self, num_ranks: int, C: float = 1.0, max_iter: int = 3000, warm_start: bool = False):
        if num_ranks < 2:
            raise ValueError("an ordinal head needs at least two ranks")
        self.num_ranks, self.C, self.max_iter, self.warm_start = num_ranks, C, max_iter, warm_start
        self.coef_: np.ndarray | None = None
        self.cuts_: np.ndarray | None = None

    def set_params(self, **params) -> CoralLogit:
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def fit(self, e: np.ndarray, ranks: np.ndarray, sample_weight: np.ndarray | None = None) -> CoralLogit:
        e = np.asarray(e, dtype=np.float64)
        ranks = np.asarray(ranks, dtype=int)
        n, d = e.shape
        k1 = self.num_ranks - 1
        targets = (ranks[:, None] > np.arange(k1)[None]).astype(np.float64)  # (N, K-1): rank > k
        sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        c = float(self.C)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:d], theta[d:]
            z = (e @ w)[:, None] - b[None]
            # softplus(z) - t z, summed over the K-1 problems; logaddexp keeps it finite for large |z|
            loss = float(c * (sw[:, None] * (np.logaddexp(0.0, z) - targets * z)).sum() + 0.5 * w @ w)
            g = sw[:, None] * (expit(z) - targets)  # d loss / d z, before the factor C
            grad_w = c * (e.T @ g.sum(1)) + w
            grad_b = -c * g.sum(0)
            return loss, np.concatenate([grad_w, grad_b])

        if self.warm_start and self.coef_ is not None and len(self.coef_) == d:
            theta0 = np.concatenate([self.coef_, self.cuts_])
        else:
            # cut points at the logits of the empirical "rank > k" rates: the right answer for w = 0
            rate = np.clip((sw[:, None] * targets).sum(0) / sw.sum(), 1e-3, 1 - 1e-3)
            theta0 = np.concatenate([np.zeros(d), -np.log(rate / (1 - rate))])
        res = optimize.minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                                options={"maxiter": self.max_iter, "gtol": 1e-6})
        self.coef_ = res.x[:d].copy()
        self.cuts_ = np.maximum.accumulate(res.x[d:])  # ordered (a no-op at the optimum, see the docstring)
        return self

    def decision_function(self, e: np.ndarray) -> np.ndarray:
        """The shared score ``f``: larger means a higher rank (more defective)."""
        return np.asarray(e, dtype=np.float64) @ self.coef_

    def predict_proba(self, e: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) in rank order."""
        return rank_probabilities(self.decision_function(e), self.cuts_)

    def predict(self, e: np.ndarray) -> np.ndarray:
        return self.predict_proba(e).argmax(1)
