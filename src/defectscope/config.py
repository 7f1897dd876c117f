"""Layered run configuration: dataclass defaults <- preset <- YAML file <- command-line flags.

The final config is written into every run directory (``config.yaml``) so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from defectscope.errors import DefectscopeError


class ConfigError(DefectscopeError, ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


@dataclass
class DataConfig:
    source: str = ""  # class-per-folder tree, CSV manifest, or a dataset name such as "elpv"
    image_root: str | None = None  # where a manifest's relative paths start (default: the CSV's folder)
    path_column: str | None = None  # auto-detected when None
    label_column: str | None = None  # auto-detected when None
    split_column: str | None = None  # a predefined split (train/val/test) to honour
    group_column: str | None = None  # rows sharing a value stay in one split (e.g. a wafer or a lot)
    stratify: list[str] = field(default_factory=list)  # metadata columns to stratify by, besides the label
    # train, val, test; or train, val, calib, test (calib: images for `defectscope calibrate` alone)
    fractions: list[float] = field(default_factory=lambda: [0.70, 0.15, 0.15])
    classes: list[str] | None = None  # fixes class order; any other label is an error
    # Severity order of ordered labels, least to most severe (ELPV: functional < possibly_defective <
    # likely_defective < defective). Used by the ordinal head (train.ordinal) and by the escape cap's
    # expected-severity score; empty: the labels are not ordered.
    class_order: list[str] = field(default_factory=list)
    skip_bad: bool = False  # skip unreadable/missing files with a report instead of stopping
    # One file listed with two labels: refuse (default), keep the first / last row, or drop the file.
    label_conflicts: str = "refuse"
    # A class with fewer images than this is refused (often a typo'd label); 1 accepts any class.
    min_class_images: int = 5
    max_pixels: int = 200_000_000  # decompression-bomb guard
    resize: str = "squash"  # squash | pad (keep aspect ratio) | nearest (wafer maps always resize nearest)
    trust_pickle: bool = False  # allow reading a WM-811K LSWMD.pkl (unpickling runs code from the file)
    cache_dir: str | None = None  # default: $DEFECTSCOPE_CACHE or ~/.cache/defectscope


@dataclass
class ModelConfig:
    # The TF-padding variant is the architecture the offline ImageNet weights were trained in: with the
    # symmetric-padding efficientnet_lite0 the same weights gave the frozen recipe 0.70 instead of 0.84 test
    # macro-F1 on synthetic wafer maps (bench/results/generality.json, 2026-11-29).
    name: str = "tf_efficientnet_lite0"
    pretrained: str | None = "auto"  # auto | none | package | hub[:name] | path/to/weights
    image_size: int = 160
    drop_rate: float = 0.2
    # Test-time augmentation: average the pooled features over the symmetries switched on in `augment`
    # (hflip, vflip, rot90); part of the model and of its ONNX export. Costs that many forward passes.
    tta: bool = False
    # Metadata columns of the dataset table fed beside the image (``name`` or ``name:categorical|numeric``):
    # categorical one-hot, numeric standardised, concatenated to the pooled features before the head; the
    # exported model then requires them (see defectscope/data/metadata_inputs.py).
    metadata_inputs: list[str] = field(default_factory=list)


@dataclass
class AugmentConfig:
    photometric: bool = True  # brightness, contrast, gamma, noise
    brightness: float = 0.1
    contrast: float = 0.15
    gamma: float = 0.15
    noise: float = 0.02
    hflip: bool = False  # off by default: die structures have a fixed orientation
    vflip: bool = False
    rot90: bool = False


@dataclass
class PhaseConfig:
    unfreeze: str = "all"  # head | last:N (the last N parameter groups plus the head) | all
    epochs: int = 1
    lr: float = 1e-3


@dataclass
class TrainConfig:
    # finetune: train the network end to end (the loop below). frozen: keep the pretrained backbone fixed,
    # pool its features (averaged over the data's symmetries) and fit an RBF-kernel or linear head with
    # scikit-learn, the regularisation chosen by cross-validation on the training split; seconds to fit.
    # auto: frozen first, then fine-tune within what is left of time_limit_minutes (the budget), and keep
    # the fine-tuned model only if it beats the frozen one on validation in >= 80% of bootstrap resamples.
    recipe: str = "finetune"
    frozen_head: str = "rbf"  # rbf | linear
    # Frozen recipe only: a cumulative-link (ordinal) head along data.class_order instead of softmax: one
    # shared score and K-1 cut points, P(rank > k) = sigmoid(f - b_k); still K class probabilities.
    ordinal: bool = False
    # C grid for the head's cross-validation (3 folds): ELPV's best was 10 (research/elpv/FINDINGS.md); each
    # value costs 3 kernel logistic-regression fits, minutes on 2 cores at a few thousand images.
    frozen_c: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0])
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | adam | sgd
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.5
    phases: list[PhaseConfig] = field(default_factory=list)  # phased fine-tuning; replaces epochs/lr
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    class_weights: bool = True  # inverse-frequency weights in the loss (with sampling: shuffle)
    class_weight_power: float = 1.0  # weights (n / (k n_c)) ** power: 1 inverse frequency, 0.5 its square root
    sampling: str = "shuffle"  # shuffle | balanced | undersample
    undersample_ratio: float = 1.0  # with undersample: majority classes cut to ratio x the smallest class
    monitor: str = "val_macro_f1"  # val_macro_f1 | val_loss
    # Early stopping after this many epochs without a better validation score; 0 disables it. 3, not 5: on the
    # small sets of bench/generality.py the best epoch was never beaten after 3 more (README: The real default).
    patience: int = 3
    time_limit_minutes: float | None = None  # stop before an epoch that would end past this budget
    label_smoothing: float = 0.0
    # Fine-tuning: exponential moving average of the weights after every step (e.g. 0.999); validation, early
    # stopping and the saved model use the averaged weights. 0: off.
    ema_decay: float = 0.0
    # Layer-wise learning-rate decay: the head trains at lr, each parameter group nearer the input at
    # layer_decay times the one above it (ImageNet features near the input need the least change). 1: off.
    layer_decay: float = 1.0
    # Progressive resizing: the first epoch of a phase trains at this fraction of model.image_size, growing
    # linearly to the full size by the phase's half-way epoch (early epochs cost a fraction); validation and
    # inference always run at the full size (train low, test high). 0: off. timm backbones only.
    progressive_resize: float = 0.0
    # Fine-tuning phases that freeze the stem and early blocks (unfreeze: head | last:N): compute those blocks'
    # output once per training image and symmetry view at the phase's start, so an epoch runs only the later
    # blocks. Photometric augmentation is off in such a phase (it would change the cached input).
    # EfficientNet backbones (the offline Lite weights); not with progressive_resize.
    cache_frozen: bool = False
    # Seed of initialisation, sampling and augmentation; None: the run's seed. The split always follows the
    # run's seed, so runs differing only here share their split: members of a seed ensemble
    # (`defectscope ensemble`).
    init_seed: int | None = None
    device: str = "auto"  # auto | cpu | cuda | mps
    channels_last: bool = True
    threads: int | None = None  # default: all cores
    progress: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    @property
    def training_seed(self) -> int:
        """The seed of initialisation, sampling and augmentation (``train.init_seed``, default ``seed``)."""
        return self.seed if self.train.init_seed is None else int(self.train.init_seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


PRESETS: dict[str, dict[str, Any]] = {
    # ELPV cells are symmetric under flips and quarter turns, unlike die structures.
    # Square-root class weights: the two middle ELPV classes (defect probability 1/3 and 2/3) are small and
    # ambiguous by construction; full inverse-frequency weights (up to 6x) made the model call most
    # functional cells defective (validation accuracy 0.40-0.47 over 5 epochs, bench log 2026-11-23).
    "elpv": {
        # the labels are defect probabilities 0, 1/3, 2/3, 1
        "data": {"source": "elpv", "stratify": ["type"],
                 "class_order": ["functional", "possibly_defective", "likely_defective", "defective"]},
        "augment": {"hflip": True, "vflip": True, "rot90": True},
        "train": {"class_weight_power": 0.5},
    },
    # Wafer maps: a die grid of 3 states. Nearest-neighbour keeps dies from blending; a wafer can be loaded at
    # any notch angle and either side up, so quarter turns and flips are label-preserving; photometric jitter
    # would blur the three intensities that mean no die / pass / fail. 64 px is the usual size in WM-811K work.
    # Applied automatically to LSWMD.pkl and to folders/manifests of .npy/.npz/.xml maps.
    "wafer": {
        "data": {"resize": "nearest"},
        "model": {"image_size": 64},
        "augment": {"photometric": False, "hflip": True, "vflip": True, "rot90": True},
    },
}


def _merge_into(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a nested dict, refusing unknown keys with the list of valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, path)
        elif key == "phases":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list of phases")
            phases = []
            for i, item in enumerate(value):
                phase = PhaseConfig()
                _merge_into(phase, item, f"{path}[{i}]")
                phases.append(phase)
            setattr(obj, key, phases)
        else:
            setattr(obj, key, _coerce(value, current, known[key], path))


def _coerce(value: Any, current: Any, fld: dataclasses.Field, path: str) -> Any:
    """Check a value against the field's default type; YAML and the CLI give strings and numbers."""
    if value is None:
        return None
    expected = type(current) if current is not None else None
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if expected in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        # The declared type decides, not the current value's: a float field set to 10 earlier still takes 7.5.
        if expected is float or "float" in str(fld.type):
            return number
        if not number.is_integer():
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return int(number)
    if expected is list and not isinstance(value, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train...)")
    return values


def build_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then a named preset, then a YAML file, then overrides ({"model.name": "resnet18"} or nested)."""
    cfg = RunConfig()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        _merge_into(cfg, PRESETS[preset], "")
    if config_file:
        _merge_into(cfg, load_yaml(config_file), "")
    apply_overrides(cfg, overrides or {})
    _validate(cfg)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set dotted keys ({"model.name": "resnet18"}) on ``cfg`` in place, checked; None values are skipped."""
    for key, value in overrides.items():
        if value is None:
            continue
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge_into(cfg, nested, "")
    _validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _merge_into(cfg, values, "")
    return cfg


def _validate(cfg: RunConfig) -> None:
    fr = cfg.data.fractions
    if len(fr) not in (3, 4) or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"data.fractions must be 3 or 4 non-negative numbers summing to 1, got {fr}")
    choices = {
        "data.resize": (cfg.data.resize, {"squash", "pad", "nearest"}),
        "data.label_conflicts": (cfg.data.label_conflicts, {"refuse", "first", "last", "drop"}),
        "train.loss": (cfg.train.loss, {"ce", "focal"}),
        "train.sampling": (cfg.train.sampling, {"shuffle", "balanced", "undersample"}),
        "train.monitor": (cfg.train.monitor, {"val_macro_f1", "val_loss"}),
        "train.optimizer": (cfg.train.optimizer, {"adamw", "adam", "sgd"}),
        "train.schedule": (cfg.train.schedule, {"cosine", "constant"}),
        "train.recipe": (cfg.train.recipe, {"finetune", "frozen", "auto"}),
        "train.frozen_head": (cfg.train.frozen_head, {"rbf", "linear"}),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(sorted(valid))}")
    if not cfg.train.frozen_c or any(float(c) <= 0 for c in cfg.train.frozen_c):
        raise ConfigError(f"train.frozen_c must be a non-empty list of positive numbers, got {cfg.train.frozen_c}")
    cfg.train.frozen_c = [float(c) for c in cfg.train.frozen_c]
    if not 0.0 < cfg.train.layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must lie in (0, 1] (1: off), got {cfg.train.layer_decay}")
    if cfg.train.progressive_resize and not 0.25 <= cfg.train.progressive_resize < 1.0:
        raise ConfigError(f"train.progressive_resize must be 0 (off) or in [0.25, 1), got "
                          f"{cfg.train.progressive_resize}")
    seed = cfg.train.init_seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"train.init_seed must be a non-negative integer (or absent: the run's seed), got {seed!r}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must lie in [0, 1) (0: off), got {cfg.train.ema_decay}")
    order = cfg.data.class_order
    if len(set(order)) != len(order):
        raise ConfigError(f"data.class_order lists a class twice: {order}")
    if cfg.data.classes and order and sorted(order) != sorted(cfg.data.classes):
        raise ConfigError(f"data.class_order {order} must list exactly the classes {cfg.data.classes}")
    if cfg.train.ordinal and (len(order) < 2 or cfg.train.recipe == "finetune"):
        raise ConfigError("train.ordinal needs data.class_order (least to most severe) and the frozen or auto "
                          "recipe (the ordinal head is a frozen-feature head)")
    if cfg.model.image_size < 16:
        raise ConfigError(f"model.image_size must be at least 16, got {cfg.model.image_size}")
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0:
        raise ConfigError("train.batch_size must be >= 1 and train.epochs >= 0")
    for phase in cfg.train.phases:
        if phase.unfreeze not in {"head", "all"} and not phase.unfreeze.startswith("last:"):
            raise ConfigError(f"phase unfreeze={phase.unfreeze!r}: use head, last:N or all")
