"""Patch-level Drift score: a Gaussian per patch position on multi-layer feature maps (PaDiM-style).

A pooled feature vector averages a local defect or a corrupted corner away; a per-position model keeps
it. Following PaDiM (Defard et al. 2021, ICPR; reference code ``xiahaifeng1995/PaDiM-Anomaly-Detection-
Localization-master``): the feature maps of a few CNN stages are brought to the grid of the finest one
(nearest-neighbour upsampling), concatenated, reduced to a seeded random subset of ``d`` channels, and at
every grid position a Gaussian (mean, covariance + ``eps`` I) is fitted on the training images. A patch's
score is its Mahalanobis distance (the square root, as PaDiM); the image's score is the largest over
positions. Images on a line are registered (a cell, a die, a part in a fixture), which is what makes a
per-position model meaningful; unregistered data should use a memory bank instead (not implemented).

Split in two so the deployed side never needs torch:

- :class:`PatchGaussian` fits and scores in numpy from feature maps (lists of ``(N, C_l, H_l, W_l)``
  arrays), and saves/loads its statistics as ``RUN/patch_drift.safetensors`` + ``RUN/patch_drift.json``.
- :func:`feature_maps` (torch, imported inside the function) runs a timm backbone once and returns the
  pooled features, logits and the chosen stages' maps; :class:`defectscope.onnx_export.drift_heads.PatchDriftHead`
  is the same score as a torch module inside the exported ONNX graph.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from defectscope.decision.drift.member import MAPS, DriftError
from defectscope.rundir import PATCH_DRIFT_PARAMS as PATCH_PARAMS
from defectscope.rundir import PATCH_DRIFT_WEIGHTS as PATCH_WEIGHTS
from defectscope.rundir import Run

log = logging.getLogger(__name__)
PATCH = "patch"  # the member's name in a Drift score
PATCH_VERSION = 1
DEFAULT_STAGES = (2, 3)  # timm feature indices: stride 8 and 16 on EfficientNet/ResNet-like backbones


def upsample_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, h, w) -> (N, C, H, W) by integer nearest-neighbour repetition (H = s*h, W = s*w), which is
    what ``torch.nn.functional.interpolate(mode='nearest')`` does for integer factors."""
    h, w = x.shape[2:]
    if size[0] % h or size[1] % w:
        raise DriftError(f"feature map {h}x{w} does not divide the patch grid {size[0]}x{size[1]}")
    return np.repeat(np.repeat(x, size[0] // h, axis=2), size[1] // w, axis=3)


def patch_embedding(maps: Sequence[np.ndarray], channels: np.ndarray | None = None) -> np.ndarray:
    """The maps on the first (finest) map's grid, concatenated along channels, then ``channels`` kept:
    (N, d, H, W) float32."""
    if not maps:
        raise DriftError("no feature maps for the patch score")
    size = maps[0].shape[2:]
    e = np.concatenate([upsample_nearest(np.asarray(m, dtype=np.float32), size) for m in maps], axis=1)
    return e if channels is None else e[:, channels]


class PatchGaussian:
    """Per-position Gaussians of a reduced multi-layer patch embedding, fitted on normal images.

    ``d``: channels kept (a seeded random subset of all concatenated channels, as PaDiM: close to the
    full-dimension result at a fraction of the cost); ``eps``: ridge added to each covariance (PaDiM's
    0.01), which keeps it invertible when a channel is constant; ``stages``: which backbone feature maps
    (timm ``feature_info`` indices) the statistics belong to, recorded for the exporter. A Drift rule's member
    (:class:`~defectscope.decision.drift.member.DriftMember`) reading the stages' maps.
    """

    kind: ClassVar[str] = PATCH
    reads: ClassVar[str] = MAPS

    def __init__(self, *, d: int = 100, eps: float = 0.01, seed: int = 0,
                 stages: Sequence[int] = DEFAULT_STAGES):
        if d < 1:
            raise DriftError(f"d must be >= 1, got {d}")
        self.d, self.eps, self.seed, self.stages = int(d), float(eps), int(seed), tuple(int(s) for s in stages)
        self.channels: np.ndarray | None = None
        self.mean: np.ndarray | None = None  # (P, d)
        self.precision: np.ndarray | None = None  # (P, d, d)
        self.grid: tuple[int, int] | None = None
        self.map_shapes: list[list[int]] = []
        self.n_train = 0

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, maps: Sequence[np.ndarray], *, chunk: int = 128) -> PatchGaussian:
        """Fit on the training images' maps (one ``(N, C_l, H_l, W_l)`` array per stage, finest first).
        Sums are accumulated in float64 over chunks of images, so memory stays at one chunk's embedding."""
        n = len(maps[0])
        if n < 2:
            raise DriftError(f"the patch Gaussian needs at least 2 training images, got {n}")
        if any(len(m) != n for m in maps):
            raise DriftError("every feature map needs the same number of images")
        total = sum(m.shape[1] for m in maps)
        d = min(self.d, total)
        self.channels = np.sort(np.random.default_rng(self.seed).choice(total, d, replace=False))
        self.grid = tuple(int(s) for s in maps[0].shape[2:])
        self.map_shapes = [list(m.shape[1:]) for m in maps]
        p = self.grid[0] * self.grid[1]
        s1, s2 = np.zeros((p, d)), np.zeros((p, d, d))
        for i in range(0, n, chunk):
            e = patch_embedding([m[i:i + chunk] for m in maps], self.channels)
            e = e.reshape(len(e), d, p).transpose(2, 0, 1).astype(np.float64)  # (P, B, d)
            s1 += e.sum(axis=1)
            s2 += np.einsum("pbd,pbe->pde", e, e)
        mean = s1 / n
        # Unbiased covariance (PaDiM uses np.cov), then the ridge.
        cov = (s2 - n * np.einsum("pd,pe->pde", mean, mean)) / (n - 1) + self.eps * np.eye(d)
        self.mean = mean.astype(np.float32)
        self.precision = np.linalg.inv(cov).astype(np.float32)
        self.n_train = n
        return self

    def _check(self, maps: Sequence[np.ndarray]) -> None:
        if not self.fitted:
            raise DriftError("the patch Gaussian is not fitted (call fit or load)")
        shapes = [list(m.shape[1:]) for m in maps]
        if shapes != self.map_shapes:
            raise DriftError(f"feature maps {shapes} do not match the fitted {self.map_shapes}")

    def score_maps(self, maps: Sequence[np.ndarray], *, chunk: int = 64) -> np.ndarray:
        """Mahalanobis distance of every patch: (N, H, W) float32."""
        self._check(maps)
        n, (h, w) = len(maps[0]), self.grid
        out = np.empty((n, h, w), dtype=np.float32)
        for i in range(0, n, chunk):
            e = patch_embedding([m[i:i + chunk] for m in maps], self.channels)
            diff = e.reshape(len(e), self.mean.shape[1], h * w).transpose(0, 2, 1) - self.mean  # (B, P, d)
            m2 = np.einsum("bpd,pde,bpe->bp", diff, self.precision, diff, optimize=True)
            out[i:i + chunk] = np.sqrt(np.clip(m2, 0.0, None)).reshape(-1, h, w)
        return out

    def score_samples(self, maps: Sequence[np.ndarray]) -> np.ndarray:
        """The image score: the largest patch distance, (N,) float64."""
        s = self.score_maps(maps)
        return s.reshape(len(s), -1).max(axis=1).astype(np.float64)

    score = score_samples  # its name before the member protocol, kept for the benches and tests

    def params(self) -> dict[str, Any]:
        return {"version": PATCH_VERSION, "score": "patch", "d": self.d, "eps": self.eps, "seed": self.seed,
                "stages": list(self.stages), "grid": list(self.grid or []), "map_shapes": self.map_shapes,
                "reduce": "max", "n_train": self.n_train}

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if not self.fitted:
            raise DriftError("nothing to save: the patch Gaussian is not fitted")
        return {"patch.mean": np.ascontiguousarray(self.mean), "patch.precision": np.ascontiguousarray(self.precision),
                "patch.channels": np.ascontiguousarray(self.channels.astype(np.int64))}, self.params()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> PatchGaussian:
        if params.get("version", PATCH_VERSION) > PATCH_VERSION:
            raise DriftError(f"patch drift statistics version {params['version']} is newer than this defectscope reads")
        missing = {"patch.mean", "patch.precision", "patch.channels"} - set(arrays)
        if missing:
            raise DriftError(f"patch drift statistics lack {sorted(missing)}")
        g = cls(d=params["d"], eps=params["eps"], seed=params["seed"], stages=params["stages"])
        g.mean, g.precision = arrays["patch.mean"], arrays["patch.precision"]
        g.channels = arrays["patch.channels"].astype(np.int64)
        g.grid, g.map_shapes = tuple(params["grid"]), [list(s) for s in params["map_shapes"]]
        g.n_train = int(params.get("n_train", 0))
        if g.mean.shape != (g.grid[0] * g.grid[1], len(g.channels)) or g.precision.shape != (len(g.mean),) + 2 * (
                len(g.channels),):
            raise DriftError(f"patch drift statistics have inconsistent shapes: mean {g.mean.shape}, "
                             f"precision {g.precision.shape}, {len(g.channels)} channels on a {g.grid} grid")
        return g

    def state(self) -> dict[str, Any]:
        """``{"arrays": ..., "params": ...}``: what ``patch_drift.safetensors`` and ``patch_drift.json`` hold."""
        arrays, params = self.to_arrays()
        return {"arrays": arrays, "params": params}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PatchGaussian:
        return cls.from_arrays(state["arrays"], state["params"])

    def save(self, run_dir: str | Path | Run) -> tuple[Path, Path]:
        """Write the statistics into a run (through :class:`Run`) or any folder; (weights, parameters) paths."""
        from safetensors.numpy import save_file

        arrays, params = self.to_arrays()
        if isinstance(run_dir, Run):
            return run_dir.save_patch_drift_statistics(arrays, params), run_dir.file(PATCH_PARAMS)
        run_dir = Path(run_dir)
        weights, meta = run_dir / PATCH_WEIGHTS, run_dir / PATCH_PARAMS
        save_file(arrays, str(weights))
        meta.write_text(json.dumps(params, indent=2) + "\n")
        return weights, meta

    @classmethod
    def load(cls, run_dir: str | Path | Run) -> PatchGaussian:
        from safetensors.numpy import load_file

        if isinstance(run_dir, Run):
            stats = run_dir.patch_drift_statistics()
            if stats is None:
                raise DriftError(f"{run_dir.path}: no patch drift statistics ({PATCH_WEIGHTS} + {PATCH_PARAMS}); "
                                 f"run calibrate with a patch Drift score first")
            return cls.from_arrays(*stats)
        run_dir = Path(run_dir)
        weights, meta = run_dir / PATCH_WEIGHTS, run_dir / PATCH_PARAMS
        if not weights.is_file() or not meta.is_file():
            raise DriftError(f"{run_dir}: no patch drift statistics ({PATCH_WEIGHTS} + {PATCH_PARAMS})")
        return cls.from_arrays(load_file(str(weights)), json.loads(meta.read_text()))


# ---------------------------------------------------------------- torch side (fitting only)

def default_stages(model) -> tuple[int, ...]:
    """The stages whose maps the patch score reads: stride 8 and 16 of a timm backbone; the last conv+pool
    stage of a seed CNN (its stages do not divide each other's grids, and its last map is already coarse)."""
    from torch import nn

    from defectscope.models.seed_cnn import SeedCNN

    if isinstance(model.backbone, SeedCNN):
        return (sum(isinstance(m, nn.MaxPool2d) for m in model.backbone.features) - 1,)
    return DEFAULT_STAGES


def feature_maps(model, images: np.ndarray, stages: Sequence[int] = DEFAULT_STAGES, *,
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(pooled features (N, D) float32, logits (N, K) float64, one (N, C, H, W) float32 map per stage) of
    uint8 images (N, H, W) in one pass of a :class:`~defectscope.models.factory.Classifier` whose backbone
    is a timm model with ``forward_intermediates`` or a seed CNN (the pooled features equal
    ``forward_features``)."""
    import torch

    _check_backbone(model)
    device = next(model.parameters()).device
    model.eval()
    feats, logits, maps = [], [], [[] for _ in stages]
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[i:i + batch_size])).to(device).float().div_(255).unsqueeze(1)
            f, m = multilayer_forward(model, x, stages)
            feats.append(f.float().cpu().numpy())
            logits.append(model.head(f).double().cpu().numpy())
            for j, t in enumerate(m):
                maps[j].append(t.float().cpu().numpy())
    if not feats:
        raise DriftError("no images to compute feature maps of")
    return np.concatenate(feats), np.concatenate(logits), [np.concatenate(m) for m in maps]


def _check_backbone(model) -> None:
    from defectscope.models.seed_cnn import SeedCNN

    backbone = model.backbone
    if not isinstance(backbone, SeedCNN) and not hasattr(backbone, "forward_intermediates"):
        raise DriftError(f"the patch drift score needs a seed CNN or a timm backbone with forward_intermediates; "
                         f"{type(backbone).__name__} has none")


def _seed_cnn_forward(backbone, x, stages: Sequence[int]):
    """(pooled features, maps after the conv+pool stages ``stages``) of a seed CNN, one pass."""
    from torch import nn

    maps, stage, h = {}, 0, x
    for layer in backbone.features:
        h = layer(h)
        if isinstance(layer, nn.MaxPool2d):
            maps[stage] = h
            stage += 1
    missing = [s for s in stages if s not in maps]
    if missing:
        raise DriftError(f"the seed CNN has stages 0..{stage - 1}, not {missing}")
    return backbone.mlp(h), [maps[s] for s in stages]


def multilayer_forward(model, x, stages: Sequence[int]):
    """(pooled features, [maps of ``stages``]) of a Classifier on an input ``x`` in [0, 1] (normalised
    here, as ``forward_features`` does); one backbone pass for the maps. The pooled features equal
    ``model.forward_features(x)``: the frozen recipe's feature transform (``post``) is applied, and with
    test-time views the other views' features are averaged in (one more pass per view). Torch-traceable
    (the exporter calls it inside the graph)."""
    from defectscope.models.seed_cnn import SeedCNN

    backbone = model.backbone
    xn = (x - model.mean) / model.std
    if isinstance(backbone, SeedCNN):
        pooled, maps = _seed_cnn_forward(backbone, xn, stages)
    else:
        final, maps = backbone.forward_intermediates(xn, indices=list(stages))
        pooled = backbone.forward_head(final, pre_logits=True)
    return model.post(model.pooled_over_views(xn, pooled)), list(maps)


def fit_patch_gaussian(run: Run, model, *, d: int = 100, stages: Sequence[int] | None = None) -> PatchGaussian:
    """The patch Gaussian fitted on the maps of the run's training split (not saved)."""
    stages = tuple(stages) if stages is not None else default_stages(model)
    _check_backbone(model)
    _, images = run.images(run.rows("train"))
    _, _, maps = feature_maps(model, images, stages)
    return PatchGaussian(d=d, seed=run.seed, stages=stages).fit(maps)


def fit_patch_drift(run: str | Path | Run, *, d: int = 100, stages: Sequence[int] | None = None,
                    model=None) -> PatchGaussian:
    """Fit the patch Gaussian on the maps of the run's training split and save it in the run
    (``RUN/patch_drift.safetensors`` + ``RUN/patch_drift.json``), beside ``fit_drift``'s statistics.
    ``stages``: default :func:`default_stages` of the model."""
    run = run if isinstance(run, Run) else Run(run)
    model = model if model is not None else run.model()
    g = fit_patch_gaussian(run, model, d=d, stages=stages)
    weights, _ = g.save(run)
    log.info(f"patch drift statistics of {g.n_train} training images ({len(g.channels)} channels on a "
             f"{g.grid[0]}x{g.grid[1]} grid, {g.precision.nbytes / 1e6:.1f} MB) written: {weights}")
    return g
