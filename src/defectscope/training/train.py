"""``defectscope.train``: from a data source to a finished run directory."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

from defectscope import rundir
from defectscope._version import __version__
from defectscope.config import ConfigError, RunConfig, apply_overrides, build_config, config_from_dict, load_yaml
from defectscope.data.cache import drop_bad, load_images
from defectscope.data.split import assign_splits, split_summary
from defectscope.data.table import DataError, class_names, load_table
from defectscope.logs import progress

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
    resume: bool = False,
    **overrides: Any,
) -> Path:
    """Train a classifier on ``data`` and write the run directory ``out``; returns its path.

    ``overrides`` are dotted config keys, e.g. ``train(..., **{"model.name": "resnet18", "train.epochs": 3})``,
    or the short names ``model``, ``image_size``, ``epochs``, ``seed``, ``pretrained``, ``batch_size``, ``lr``.
    They apply on top of ``config`` (a :class:`RunConfig`) or ``config_file``, never both of those.
    ``data='elpv'`` applies the ELPV preset (flips and quarter turns on, stratified by cell type) unless a
    config says otherwise. ``resume=True`` continues ``out`` with its saved config: nothing else may be given.

    >>> run = train("path/to/class_folders", "runs/first", epochs=5)  # doctest: +SKIP
    """
    import torch

    from defectscope.models.factory import create_model, model_spec
    from defectscope.models.heads import symmetry_views
    from defectscope.training.loop import Trainer

    out = Path(out)
    if resume:
        given = [name for name, value in (("data", data), ("config", config), ("config_file", config_file))
                 if value is not None] + sorted(overrides)
        if given:
            raise ConfigError(f"resume continues {out} with its saved config; do not also pass {', '.join(given)}")
        cfg = config_from_dict(load_yaml(out / rundir.CONFIG))
        table = rundir.read_table(out)
        log.info(f"resuming {out} with its saved config and dataset table")
    else:
        if config is not None and config_file is not None:
            raise ConfigError("give a config object or a config file, not both")
        cfg = _config_for(data, config, config_file, overrides)
        if (out / rundir.SPEC).exists() or (out / rundir.CHECKPOINT).exists():
            raise FileExistsError(f"{out} already holds a run; choose another --out or pass --resume")
        out.mkdir(parents=True, exist_ok=True)
        table = _build_table(cfg, out)

    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    classes = cfg.data.classes or class_names(table)
    index = {c: i for i, c in enumerate(classes)}
    images, bad = _cached_images(table, cfg)
    if bad:
        table, images = drop_bad(table, images, bad)
        _write_skipped(out, bad)
    if not resume:
        table.to_csv(out / rundir.TABLE, index=False)
        cfg.data.classes = classes
        cfg.save(out / rundir.CONFIG)
    labels = table["label"].map(index).to_numpy()
    split = table["split"].to_numpy()
    if not (split == "train").any():
        raise DataError("the training split is empty")
    for name in classes:
        if not ((split == "train") & (table["label"].to_numpy() == name)).any():
            log.warning(f"class {name!r} has no training images")

    model = create_model(
        cfg.model.name, len(classes), image_size=cfg.model.image_size,
        pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate,
    )
    source = model.pretrained_report.get("source")
    log.info(f"model {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
        f"pretrained: {source or 'no (from scratch)'}, {cfg.model.image_size} px")
    tr, va = split == "train", split == "val"
    started = time.perf_counter()
    extra: dict[str, Any]
    if cfg.train.recipe == "frozen":
        from defectscope.training.frozen import fit_frozen

        if source is None:
            log.warning("frozen-feature recipe without pretrained weights: the features are random projections")
        log.info(f"frozen-feature recipe on {torch.get_num_threads()} threads")
        fitted = fit_frozen(model, cfg, images[tr], labels[tr], images[va], labels[va], classes)
        val_f1 = fitted["val"]["macro_f1"] if fitted["val"] else float("nan")
        history = [{"epoch": 0, "val_macro_f1": val_f1,
                    "val_accuracy": fitted["val"]["accuracy"] if fitted["val"] else float("nan"),
                    "seconds": time.perf_counter() - started}]
        extra = dict(best_epoch=0, epochs_run=0, monitor="val_macro_f1", best_score=val_f1,
                     recipe="frozen", views=fitted["views"],
                     frozen_head={"kind": cfg.train.frozen_head, "landmarks": fitted["landmarks"], "C": fitted["C"],
                                  "cv_macro_f1": {f"{c:g}": round(v, 4) for c, v in fitted["cv_macro_f1"].items()},
                                  "seconds": fitted["seconds"]})
    else:
        trainer = Trainer(model, cfg, out, classes)
        log.info(f"training on {trainer.device} with {torch.get_num_threads()} threads")
        state = trainer.fit(images[tr], labels[tr], images[va], labels[va], resume=resume)
        model = trainer.model.cpu()
        history = state.history
        if cfg.model.tta:  # averaging over the data's symmetries only at inference: training stays one view
            model.views = symmetry_views(cfg.augment.hflip, cfg.augment.vflip, cfg.augment.rot90)
        extra = dict(best_epoch=state.best_epoch, epochs_run=state.epoch, monitor=cfg.train.monitor,
                     best_score=state.best_score if cfg.train.monitor == "val_macro_f1" else -state.best_score,
                     recipe="finetune", views=list(model.views))
    seconds = time.perf_counter() - started

    pd.DataFrame(history).to_csv(out / rundir.HISTORY, index=False)
    spec = model_spec(
        model, cfg.model.name, classes, cfg.model.image_size,
        resize=cfg.data.resize,
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
    log.info(f"best epoch {spec['best_epoch']} ({spec['monitor']} {spec['best_score']:.4f}); run saved in {out}")
    return out


def _config_for(data, config: RunConfig | None, config_file, overrides: dict[str, Any]) -> RunConfig:
    dotted = {SHORT_KEYS.get(k, k): v for k, v in overrides.items()}
    if data is not None:
        dotted["data.source"] = str(data)
    if config is not None:
        # Overrides apply on top of a copy of the given object, exactly as on top of a YAML file.
        cfg = apply_overrides(config_from_dict(config.to_dict()), dotted)
    else:
        file_source = load_yaml(config_file).get("data", {}).get("source") if config_file else None
        source = dotted.get("data.source") or file_source or ""
        preset = "elpv" if str(source).lower() == "elpv" else None
        cfg = build_config(preset=preset, config_file=config_file, overrides=dotted)
    if not cfg.data.source:
        raise DataError("no data given: pass a folder, a CSV manifest or 'elpv'")
    return cfg


def _build_table(cfg: RunConfig, out: Path) -> pd.DataFrame:
    d = cfg.data
    table, bad = load_table(
        d.source, image_root=d.image_root, path_column=d.path_column, label_column=d.label_column,
        split_column=d.split_column, classes=d.classes, skip_bad=d.skip_bad,
    )
    if bad:
        _write_skipped(out, bad)
    table = assign_splits(table, d.fractions, seed=cfg.seed, stratify=d.stratify, group_column=d.group_column)
    log.info(f"dataset: {len(table)} images, {table['label'].nunique()} classes from {d.source}")
    log.info(split_summary(table).to_string())
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
    }
