"""``defectscope.train``: from a data source to a finished run directory."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from defectscope import rundir
from defectscope._version import __version__
from defectscope.config import ConfigError, RunConfig, apply_overrides, build_config, config_from_dict, load_yaml
from defectscope.data.cache import drop_bad, load_images
from defectscope.data.checks import cheap_checks, check_classes, plural
from defectscope.data.split import assign_splits, split_summary
from defectscope.data.table import DataError, class_names, is_wafer_source, load_table
from defectscope.data.wafer import is_wafer_file
from defectscope.machine import speed_flags
from defectscope.progress import progress

log = logging.getLogger(__name__)

# Short names accepted by train() besides dotted config keys.
SHORT_KEYS = {"model": "model.name", "image_size": "model.image_size", "epochs": "train.epochs",
              "seed": "seed", "pretrained": "model.pretrained", "batch_size": "train.batch_size",
              "lr": "train.lr"}


def train(
    data: str | Path | None = None,
    out: str | Path = "runs/run",
    *,
    config: RunConfig | None = None,
    config_file: str | Path | None = None,
    preset: str | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> Path:
    """Train a classifier on ``data`` and write the run directory ``out``; returns its path.

    ``overrides`` are dotted config keys, e.g. ``train(..., **{"model.name": "resnet18", "train.epochs": 3})``,
    or the short names ``model``, ``image_size``, ``epochs``, ``seed``, ``pretrained``, ``batch_size``, ``lr``.
    They apply on top of ``config`` (a :class:`RunConfig`) or ``config_file``, never both of those.
    ``data='elpv'`` applies the ELPV preset (flips and quarter turns on, stratified by cell type) and wafer-map
    data (``LSWMD.pkl``, folders or manifests of .npy/.npz/.xml/KLARF maps) the ``wafer`` preset, unless
    ``preset`` names another or a config says otherwise. ``resume=True`` continues ``out`` with its saved
    config: nothing else may be given. ``on_epoch(epoch, val_macro_f1)``, if given, is called after each
    fine-tuning epoch (``defectscope tune`` reports it to its pruner); an exception it raises stops training.

    >>> run = train("path/to/class_folders", "runs/first", epochs=5)  # doctest: +SKIP
    """
    wait_passively_if_busy()  # before torch is imported: OpenMP reads its wait policy once, when it loads
    import torch

    from defectscope.training import distributed
    from defectscope.training.loop import pick_device

    out = Path(out)
    if not resume and distributed.restarted() and (out / rundir.CHECKPOINT).is_file():
        # torchrun started this job again after a rank failed (--max-restarts): continue from the checkpoint.
        log.info(f"restarted by torchrun: resuming {out} from its last checkpoint")
        data, config, config_file, overrides, resume = None, None, None, {}, True
    if resume:
        cfg, table = _resumed_config_and_table(out, data, config, config_file, overrides)
    else:
        cfg, table = _new_config_and_table(out, data, config, config_file, overrides, preset)
    ctx = distributed.setup(pick_device(cfg.train.device))
    torch.manual_seed(cfg.training_seed)  # the same initial weights on every rank
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    classes = cfg.data.classes or class_names(table)
    table, images = _usable_images(table, cfg, out)
    if not resume and ctx.main:
        table.to_csv(out / rundir.TABLE, index=False)
        cfg.data.classes = classes
        cfg.save(out / rundir.CONFIG)
    index = {c: i for i, c in enumerate(classes)}
    labels = table["label"].map(index).to_numpy()
    split = table["split"].to_numpy()
    _check_training_split(table, split, classes)

    model, encoder, meta = _new_model(cfg, classes, table, split)
    source = model.pretrained_report.get("source")
    tr, va = split == "train", split == "val"
    started = time.perf_counter()
    train_data = (images[tr], labels[tr], images[va], labels[va])
    metadata = (meta[tr], meta[va]) if meta is not None else (None, None)
    if cfg.train.recipe == "frozen":
        model, history, extra = _fit_frozen(model, cfg, train_data, classes, source, metadata)
    elif cfg.train.recipe == "auto":
        model, history, extra = _fit_auto(model, cfg, train_data, classes, source, out, started, metadata)
    else:
        model, history, extra = _fine_tune(model, cfg, train_data, classes, out, resume, on_epoch, metadata)
    if encoder is not None:
        extra["metadata_inputs"] = encoder.to_spec()
    seconds = time.perf_counter() - started
    if ctx.main:  # rank 0 alone writes the run directory
        _save_run(out, model, cfg, classes, table, history, extra, source, seconds)
    ctx.barrier()  # the run is complete on disk before any rank returns
    return out


BUSY_LOAD = 1.0  # 1-minute load average (other processes' runnable threads) from which a machine is busy


def wait_passively_if_busy() -> str | None:
    """On a busy machine, have OpenMP's threads sleep instead of spinning while they wait; returns the policy set.

    Why: torch's CPU kernels end every parallel region at a barrier, and by default a thread spins there. When
    other processes hold the cores, the thread being waited for is off the CPU while its peers burn their time
    slices spinning: on 2 shared cores (load 4-11) a training step of EfficientNet-Lite0 at 128 px took 4-18 s
    spinning against 0.5-1.3 s sleeping; idle, spinning is the faster (bench/generality.py, README). Decided once
    per process, from the load before training; the results are the same bits either way (same thread count and
    partition). OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins; nothing is done once torch is loaded.
    """
    import sys

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    if "torch" in sys.modules:
        log.debug("torch already loaded: OpenMP keeps its wait policy")
        return None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < BUSY_LOAD:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    log.info(f"machine busy (load {load:.1f} on {os.cpu_count()} cores): training threads wait passively "
             f"(OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose)")
    return "PASSIVE"


def _resumed_config_and_table(out: Path, data, config: RunConfig | None, config_file,
                              overrides: dict[str, Any]) -> tuple[RunConfig, pd.DataFrame]:
    given = [name for name, value in (("data", data), ("config", config), ("config_file", config_file))
             if value is not None] + sorted(overrides)
    if given:
        raise ConfigError(f"resume continues {out} with its saved config; do not also pass {', '.join(given)}")
    cfg = config_from_dict(load_yaml(out / rundir.CONFIG))
    table = rundir.read_table(out)
    log.info(f"resuming {out} with its saved config and dataset table")
    return cfg, table


def _new_config_and_table(out: Path, data, config: RunConfig | None, config_file, overrides: dict[str, Any],
                          preset: str | None) -> tuple[RunConfig, pd.DataFrame]:
    """The run's config and split dataset table; creates ``out``, which must not hold a run yet."""
    if config is not None and config_file is not None:
        raise ConfigError("give a config object or a config file, not both")
    cfg = _config_for(data, config, config_file, overrides, preset)
    if (out / rundir.SPEC).exists() or (out / rundir.CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; choose another --out or pass --resume")
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return cfg, _build_table(cfg, out)
    except Exception:
        if fresh:  # a refused dataset leaves no half-made run folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _usable_images(table: pd.DataFrame, cfg: RunConfig, out: Path):
    """(table, images) without the files that cannot be decoded, which are listed in ``out``."""
    images, bad = _cached_images(table, cfg)
    if bad:
        table, images = drop_bad(table, images, bad)
        _write_skipped(out, bad)
    return table, images


def _check_training_split(table: pd.DataFrame, split, classes: list[str]) -> None:
    if not (split == "train").any():
        raise DataError("the training split is empty")
    for name in classes:
        if not ((split == "train") & (table["label"].to_numpy() == name)).any():
            log.warning(f"class {name!r} has no training images")


def _new_model(cfg: RunConfig, classes: list[str], table: pd.DataFrame, split):
    """(model, metadata encoder or None, encoded metadata of every table row or None)."""
    from defectscope.models.factory import create_model

    model = create_model(
        cfg.model.name, len(classes), image_size=cfg.model.image_size,
        pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate,
    )
    encoder, meta = _metadata_inputs(cfg, table, split)
    if encoder is not None:
        model.set_metadata_dim(encoder.dim)
    source = model.pretrained_report.get("source")
    log.info(f"model {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
        f"pretrained: {source or 'no (from scratch)'}, {cfg.model.image_size} px")
    return model, encoder, meta


def _save_run(out: Path, model, cfg: RunConfig, classes: list[str], table: pd.DataFrame, history: list[dict],
              extra: dict[str, Any], source: str | None, seconds: float) -> None:
    """The history, the model and its spec (what it is, what it was trained on, where and how long)."""
    from defectscope.models.factory import model_spec

    pd.DataFrame(history).to_csv(out / rundir.HISTORY, index=False)
    spec = model_spec(
        model, cfg.model.name, classes, cfg.model.image_size,
        resize=cfg.data.resize,
        # The predictor renders die grids (files or arrays) with nearest-neighbour when it reads this.
        input_kind="wafer_map" if table["path"].map(is_wafer_file).all() else "image",
        pretrained=source,
        **extra,
        train_seconds=round(seconds, 1),
        dataset_sha256=table_hash(table),
        seed=cfg.seed,
        defectscope_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
    )
    rundir.save_model(model, spec, out)
    if spec.get("recipe") == "frozen":  # no epochs: one fit of the head on fixed features
        log.info(f"frozen-feature model kept ({spec['monitor']} {spec['best_score']:.4f}); run saved in {out}")
    else:
        log.info(f"best epoch {spec['best_epoch']} of {spec.get('epochs_run', '?')} ({spec['monitor']} "
                 f"{spec['best_score']:.4f}); run saved in {out}")


def _metadata_inputs(cfg: RunConfig, table: pd.DataFrame, split):
    """(encoder, encoded metadata of every table row) for ``model.metadata_inputs``, or (None, None)."""
    if not cfg.model.metadata_inputs:
        return None, None
    from defectscope.data.metadata_inputs import MetadataEncoder, MetadataInputError

    try:
        encoder = MetadataEncoder.fit(table, cfg.model.metadata_inputs, train_rows=split == "train")
    except MetadataInputError as exc:
        raise ConfigError(f"model.metadata_inputs: {exc}") from None
    log.info(f"metadata inputs beside the image: {encoder.describe()} ({encoder.dim} values)")
    return encoder, encoder.encode_table(table)


def _fit_frozen(model, cfg: RunConfig, data: tuple, classes: list[str], source: str | None,
                metadata: tuple = (None, None)):
    import torch

    from defectscope.training.frozen_features import fit_frozen

    if source is None:
        log.warning("frozen-feature recipe without pretrained weights: the features are random projections")
    log.info(f"frozen-feature recipe on {torch.get_num_threads()} threads")
    started = time.perf_counter()
    fitted = fit_frozen(model, cfg, *data, classes, metadata=metadata[0], val_metadata=metadata[1])
    if fitted is None:  # a rank of a torchrun job but 0: its features went to rank 0, which fits the head
        return model, [], {}
    val = fitted["val"] or {}
    val_f1 = val.get("macro_f1", float("nan"))
    history = [{"epoch": 0, "val_macro_f1": val_f1, "val_accuracy": val.get("accuracy", float("nan")),
                "seconds": time.perf_counter() - started}]
    extra = dict(best_epoch=0, epochs_run=0, monitor="val_macro_f1", best_score=val_f1, recipe="frozen",
                 views=fitted["views"],
                 frozen_head={"kind": cfg.train.frozen_head, "landmarks": fitted["landmarks"], "C": fitted["C"],
                              **({"ordinal": True, "ranks": fitted["ranks"]} if fitted.get("ranks") else {}),
                              "cv_macro_f1": {f"{c:g}": round(v, 4) for c, v in fitted["cv_macro_f1"].items()},
                              "seconds": fitted["seconds"]})
    return model, history, extra


def _fine_tune(model, cfg: RunConfig, data: tuple, classes: list[str], out: Path, resume: bool,
               on_epoch: Callable[[int, float], None] | None = None, metadata: tuple = (None, None)):
    import torch

    from defectscope.models.heads import symmetry_views
    from defectscope.training.loop import Trainer

    trainer = Trainer(model, cfg, out, classes, on_epoch)
    log.info(f"training on {trainer.device} with {torch.get_num_threads()} threads")
    state = trainer.fit(*data, resume=resume, m_train=metadata[0], m_val=metadata[1])
    model = trainer.model.cpu()
    if cfg.model.tta:  # averaging over the data's symmetries only at inference: training stays one view
        model.views = symmetry_views(cfg.augment.hflip, cfg.augment.vflip, cfg.augment.rot90)
    extra = dict(best_epoch=state.best_epoch, epochs_run=state.epoch, monitor=cfg.train.monitor,
                 best_score=state.best_score if cfg.train.monitor == "val_macro_f1" else -state.best_score,
                 recipe="finetune", views=list(model.views))
    return model, state.history, extra


AUTO_MIN_FINETUNE_MINUTES = 1.0  # less than this left after the frozen fit: no fine-tune is attempted
AUTO_WIN_SHARE = 0.8  # share of bootstrap resamples of the validation split the fine-tune must win


def _fit_auto(model, cfg: RunConfig, data: tuple, classes: list[str], source: str | None, out: Path,
              started: float, metadata: tuple = (None, None)):
    """Frozen first (cheap), then a fine-tune in the rest of the budget; keep the fine-tune only if it wins.

    Tiny validation classes make one macro-F1 number noisy, so the fine-tune must beat the frozen model in
    at least 80% of bootstrap resamples of the validation split (stratified by class), else the cheaper,
    steadier frozen model stays.
    """
    from defectscope.models.factory import create_model
    from defectscope.models.inference import predict_logits
    from defectscope.training.distributed import current

    budget = cfg.train.time_limit_minutes
    frozen, history, extra = _fit_frozen(model, cfg, data, classes, source, metadata)
    left = current().broadcast((budget * 60 - (time.perf_counter() - started)) / 60 if budget else None)
    val_images, val_labels = data[2], data[3]
    if (left is not None and left < AUTO_MIN_FINETUNE_MINUTES) or len(val_labels) == 0:
        log.info("auto: keeping the frozen-feature model (no time left for a fine-tune, or no validation images)")
        return frozen, history, {**extra, "auto": {"chosen": "frozen", "finetune_minutes": 0}}
    import torch

    ft_cfg = auto_finetune_config(cfg, left)
    # The same initial weights and dropout stream as `train --recipe finetune`: the frozen fit above drew
    # from the global generator, so without this the fine-tune inside auto is another run than the plain one.
    torch.manual_seed(cfg.training_seed)
    tuned = create_model(cfg.model.name, len(classes), image_size=cfg.model.image_size,
                         pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate)
    if frozen.metadata_dim:
        tuned.set_metadata_dim(frozen.metadata_dim)
    tuned, ft_history, ft_extra = _fine_tune(tuned, ft_cfg, data, classes, out, False, metadata=metadata)
    if not current().main:  # only rank 0 holds the fitted frozen head and writes the run
        return tuned, ft_history, ft_extra
    m_val = metadata[1]
    wins = _bootstrap_wins(predict_logits(tuned, val_images, metadata=m_val).argmax(1).numpy(),
                           predict_logits(frozen, val_images, metadata=m_val).argmax(1).numpy(), val_labels,
                           len(classes), cfg.seed)
    chosen = "finetune" if wins >= AUTO_WIN_SHARE else "frozen"
    log.info(f"auto: the fine-tune beats the frozen model in {wins:.0%} of validation resamples; keeping {chosen}")
    report = {"chosen": chosen, "finetune_win_share": round(wins, 3),
              "finetune_minutes": None if left is None else round(left, 2),
              "frozen_val_macro_f1": extra["best_score"], "finetune_val_macro_f1": ft_extra["best_score"],
              # what the fine-tune did in its budget: a slow machine shows here as few, long epochs
              "finetune_epochs": [{k: h.get(k) for k in ("epoch", "val_macro_f1", "seconds")} for h in ft_history]}
    if chosen == "finetune":
        return tuned, ft_history, {**ft_extra, "auto": report}
    return frozen, history, {**extra, "auto": report}


def auto_finetune_config(cfg: RunConfig, minutes_left: float | None) -> RunConfig:
    """The config of the fine-tune that ``auto`` tries: the run's own (its preset, image size, augmentation,
    epochs, patience) with only the recipe and the time limit (the budget left after the frozen fit) changed."""
    return apply_overrides(config_from_dict(cfg.to_dict()),
                           {"train.recipe": "finetune", "train.time_limit_minutes": minutes_left})


def _bootstrap_wins(pred_a, pred_b, labels, k: int, seed: int, n: int = 500) -> float:
    """Share of class-stratified bootstrap resamples in which ``pred_a`` has a higher macro-F1 than ``pred_b``."""
    import numpy as np

    from defectscope.metrics import classification_metrics

    rng = np.random.default_rng(seed)
    names = [str(i) for i in range(k)]
    by_class = [np.flatnonzero(labels == c) for c in range(k) if (labels == c).any()]
    wins = 0
    for _ in range(n):
        idx = np.concatenate([rng.choice(i, size=len(i), replace=True) for i in by_class])
        a = classification_metrics(labels[idx], pred_a[idx], names)["macro_f1"]
        b = classification_metrics(labels[idx], pred_b[idx], names)["macro_f1"]
        wins += a > b
    return wins / n


def _config_for(data, config: RunConfig | None, config_file, overrides: dict[str, Any],
                preset: str | None = None) -> RunConfig:
    dotted = {SHORT_KEYS.get(k, k): v for k, v in overrides.items()}
    if data is not None:
        dotted["data.source"] = str(data)
    if config is not None:
        # Overrides apply on top of a copy of the given object, exactly as on top of a YAML file.
        cfg = apply_overrides(config_from_dict(config.to_dict()), dotted)
    else:
        file_source = load_yaml(config_file).get("data", {}).get("source") if config_file else None
        source = dotted.get("data.source") or file_source or ""
        if preset is None and str(source).lower() == "elpv":
            preset = "elpv"
        elif preset is None and source and is_wafer_source(source):
            preset = "wafer"
        cfg = build_config(preset=preset, config_file=config_file, overrides=dotted)
    if not cfg.data.source:
        raise DataError("no data given: pass a folder, a CSV manifest or 'elpv'")
    return cfg


def _build_table(cfg: RunConfig, out: Path) -> pd.DataFrame:
    d = cfg.data
    table, bad = load_table(
        d.source, image_root=d.image_root, path_column=d.path_column, label_column=d.label_column,
        split_column=d.split_column, classes=d.classes, skip_bad=d.skip_bad,
        trust_pickle=d.trust_pickle, cache_dir=d.cache_dir, label_conflicts=d.label_conflicts,
    )
    if bad:
        _write_skipped(out, bad)
    check_classes(table, d.min_class_images, where=str(d.source))
    table = assign_splits(table, d.fractions, seed=cfg.seed, stratify=d.stratify, group_column=d.group_column)
    log.info(f"dataset: {plural(len(table), 'image')}, {plural(table['label'].nunique(), 'class', 'classes')} "
             f"from {d.source}")
    log.info(split_summary(table).to_string())
    for warning in cheap_checks(table):
        log.warning(f"{warning} (run `defectscope audit` for the full data audit)")
    return table


def _cached_images(table: pd.DataFrame, cfg: RunConfig):
    started = time.perf_counter()
    bar = progress(desc="decode+resize", total=len(table), unit="img", enabled=cfg.train.progress)
    images, bad = load_images(
        table, cfg.model.image_size, resize=cfg.data.resize, max_pixels=cfg.data.max_pixels,
        skip_bad=cfg.data.skip_bad, cache_dir=cfg.data.cache_dir, progress=bar.update,
    )
    bar.close()
    log.info(f"images ready: {images.shape[0]} x {images.shape[1]}x{images.shape[2]} "
             f"({time.perf_counter() - started:.1f}s, cached)")
    return images, bad


def _write_skipped(out: Path, bad) -> None:
    from defectscope.training.distributed import world_from_env

    if not world_from_env().main:  # rank 0 alone writes the run directory
        return
    path = out / rundir.SKIPPED
    previous = pd.read_csv(path, dtype=str) if path.is_file() else pd.DataFrame()
    rows = pd.DataFrame([b.__dict__ for b in bad])
    pd.concat([previous, rows]).drop_duplicates().to_csv(path, index=False)
    log.warning(f"skipped {len(bad)} unusable file(s), listed in {path}:")
    for b in bad[:20]:
        log.warning(f"  {b.source}: {b.path}: {b.reason}")
    if len(bad) > 20:
        log.warning(f"  ... and {len(bad) - 20} more")


def table_hash(table: pd.DataFrame) -> str:
    """Identifies the exact images, labels and splits a model was trained on."""
    h = hashlib.sha256()
    for row in table[["path", "label", "split"]].itertuples(index=False):
        h.update(f"{os.path.basename(row.path)}|{row.label}|{row.split}\n".encode())
    return h.hexdigest()


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_flags": speed_flags(),
    }
