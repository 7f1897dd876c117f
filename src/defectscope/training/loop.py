"""The training loop: phases, sampling, early stopping, per-epoch checkpoints and exact resume.

Batches are cut from the cached uint8 images in the main process with one torch.Generator, which
keeps a CPU run repeatable and lets ``resume`` continue with the very same random stream.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.config import ConfigError, PhaseConfig, RunConfig
from defectscope.metrics import classification_metrics
from defectscope.models.factory import Classifier
from defectscope.models.inference import predict_logits
from defectscope.models.seed_cnn import SeedCNN
from defectscope.progress import progress
from defectscope.rundir import CHECKPOINT
from defectscope.training import distributed
from defectscope.training.augment import augment_batch
from defectscope.training.cached_blocks import FrozenPrefixCache
from defectscope.training.ema import WeightEMA
from defectscope.training.losses import inverse_frequency_weights, make_loss

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything needed to resume; saved as plain tensors and numbers (loadable with weights_only)."""

    phase: int = 0
    phase_epoch: int = 0  # epochs finished in the current phase
    epoch: int = 0  # epochs finished overall
    phase_done: bool = False
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False  # the time budget ran out: no further phases
    history: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def phases_of(cfg: RunConfig) -> list[PhaseConfig]:
    if cfg.train.phases:
        return list(cfg.train.phases)
    return [PhaseConfig(unfreeze="all", epochs=cfg.train.epochs, lr=cfg.train.lr)]


def set_trainable(model: Classifier, unfreeze: str) -> list[nn.Parameter]:
    """Freeze all but the chosen parameter groups; frozen parameters cost no backward pass."""
    groups = model.param_groups()
    if unfreeze == "all":
        chosen = groups
    elif unfreeze == "head":
        chosen = groups[-1:]
    else:
        n = int(unfreeze.split(":", 1)[1])
        chosen = groups[-(n + 1):]
    names = {name for group in chosen for name in group}
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if p.requires_grad:
            params.append(p)
    return params


def layerwise_groups(model: Classifier, params: list[nn.Parameter], decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable ``params``, each with its ``lr_scale``: 1 for the head,
    ``decay ** k`` for the k-th group below it (the model's parameter groups, input to output)."""
    trainable = {id(p) for p in params}
    by_name = dict(model.named_parameters())
    groups = model.param_groups()
    out: list[dict[str, Any]] = []
    covered: set[int] = set()
    for depth, names in enumerate(reversed(groups)):
        chosen = [by_name[n] for n in names if n in by_name and id(by_name[n]) in trainable]
        covered.update(id(p) for p in chosen)
        if chosen:
            out.append({"params": chosen, "lr_scale": decay ** depth})
    rest = [p for p in params if id(p) not in covered]  # in no named group (e.g. metadata scaling): full rate
    if rest:
        out.append({"params": rest, "lr_scale": 1.0})
    return out


def progressive_size(full: int, start_fraction: float, epoch: int, planned: int, multiple: int = 32) -> int:
    """Training image size for ``epoch`` (0-based) of a phase of ``planned`` epochs: ``start_fraction * full``
    at epoch 0, growing linearly to ``full`` by the half-way epoch; a multiple of ``multiple`` (the
    backbone's stride), never above ``full``."""
    if not start_fraction:
        return full
    ramp = max(1, planned // 2)
    fraction = start_fraction + (1.0 - start_fraction) * min(1.0, epoch / ramp)
    return int(min(full, max(multiple, round(full * fraction / multiple) * multiple)))


def _freeze_norm_stats(model: nn.Module) -> None:
    """Batch-norm layers whose weights are frozen keep their running statistics too."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_indices(labels: torch.Tensor, sampling: str, ratio: float, gen: torch.Generator) -> torch.Tensor:
    n = len(labels)
    # Drawn unconditionally so the random stream does not depend on the sampling choice.
    perm = torch.randperm(n, generator=gen)
    if sampling == "shuffle":
        return perm
    counts = torch.bincount(labels).float()
    if sampling == "balanced":
        weights = 1.0 / counts[labels]
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    # undersample: every class cut to `ratio` x the smallest class, a fresh draw each epoch.
    cap = max(1, int(round(counts[counts > 0].min().item() * ratio)))
    shuffled = labels[perm]
    keep = torch.zeros(n, dtype=torch.bool)
    for c in torch.unique(labels):
        keep[torch.nonzero(shuffled == c).flatten()[:cap]] = True
    return perm[keep]


def _weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _Fit:
    """What one call of :meth:`Trainer.fit` carries from phase to phase and epoch to epoch."""

    model: Classifier
    criterion: nn.Module
    gen: torch.Generator
    ema: WeightEMA | None
    state: TrainState
    best_weights: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    x_val: np.ndarray
    y_val: np.ndarray
    started: float  # the time budget counts from here, after any checkpoint was loaded


@dataclass
class _Phase:
    """One phase's optimizer and schedule while it runs."""

    index: int
    config: PhaseConfig
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    cache: FrozenPrefixCache | None
    steps_per_epoch: int
    warmup: int
    planned: int  # epochs; cut short when the time budget would not fit them all
    cache_seconds: float  # building the cache; reported with the phase's first epoch only
    forward: nn.Module  # the training forward pass (under DistributedDataParallel in a torchrun job)


class Trainer:
    """Fits a Classifier on cached images and keeps its run directory's checkpoint current."""

    def __init__(self, model: Classifier, cfg: RunConfig, run_dir: Path, classes: list[str],
                 on_epoch: Callable[[int, float], None] | None = None):
        self.model = model
        # Called as on_epoch(epoch, val_macro_f1) after each epoch's checkpoint; an exception it raises (e.g. a
        # tuner pruning the trial) ends the fit there, with the run directory holding that epoch's checkpoint.
        self.on_epoch = on_epoch
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.classes = classes
        self.dist = distributed.current()  # joined by train() under torchrun; world size 1 otherwise
        self.device = self.dist.device(pick_device(cfg.train.device))
        self.channels_last = cfg.train.channels_last and self.device.type == "cpu"
        self.amp = self.device.type == "cuda"

    def fit(
        self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        *, resume: bool = False, m_train: np.ndarray | None = None, m_val: np.ndarray | None = None,
    ) -> TrainState:
        """``m_train``/``m_val``: encoded metadata inputs (N, M) for a model that takes them."""
        self._check_options()
        self.m_train = None if m_train is None else torch.as_tensor(np.asarray(m_train), dtype=torch.float32)
        self.m_val = m_val
        phases = phases_of(self.cfg)
        run, optimizer_state = self._start(x_train, y_train, x_val, y_val, resume, len(phases))
        for p_idx in range(run.state.phase, len(phases)):
            if run.state.stopped:
                break
            self._run_phase(run, phases[p_idx], p_idx, optimizer_state)
            optimizer_state = None  # a saved optimizer belongs to the phase it was saved in, the first one here
        run.model.load_state_dict(run.best_weights)
        for p in run.model.parameters():
            p.requires_grad_(True)
        run.model.eval()
        return run.state

    def _check_options(self) -> None:
        tcfg = self.cfg.train
        if tcfg.cache_frozen and tcfg.progressive_resize:
            raise ConfigError("train.cache_frozen caches maps at the full image size; it cannot be combined with "
                              "train.progressive_resize (switch one off)")
        if tcfg.progressive_resize and isinstance(self.model.backbone, SeedCNN):
            raise ConfigError("train.progressive_resize needs a backbone that takes any input size (a timm model); "
                              "the seed CNNs' dense layers fix theirs")

    def _start(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               resume: bool, n_phases: int) -> tuple[_Fit, dict[str, Any] | None]:
        """The fit's starting point, fresh or from the checkpoint, and the saved optimizer state on resume."""
        cfg, tcfg = self.cfg, self.cfg.train
        model = self.model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        x_train_t, y_train_t = torch.from_numpy(np.ascontiguousarray(x_train)), torch.as_tensor(y_train)
        weight = None
        if tcfg.class_weights and tcfg.sampling == "shuffle":
            weight = inverse_frequency_weights(y_train_t, len(self.classes), tcfg.class_weight_power).to(self.device)
        criterion = make_loss(tcfg.loss, weight, tcfg.focal_gamma, tcfg.label_smoothing)
        gen = torch.Generator().manual_seed(cfg.training_seed)
        state = TrainState()
        best_weights = _weights_copy(model)
        # train.ema_decay: validate, early-stop on and keep the averaged weights (see training/ema.py)
        ema = WeightEMA(model, tcfg.ema_decay) if tcfg.ema_decay else None
        optimizer_state = None
        if resume:
            saved, state, best_weights = self._load_checkpoint(gen)
            if ema is not None:
                ema.load_state_dict(saved["ema"])
            optimizer_state = saved["optimizer"]
            log.info(f"resuming after epoch {state.epoch} (phase {state.phase + 1}/{n_phases})")
        run = _Fit(model=model, criterion=criterion, gen=gen, ema=ema, state=state, best_weights=best_weights,
                   x=x_train_t, y=y_train_t, x_val=x_val, y_val=y_val, started=time.perf_counter())
        return run, optimizer_state

    def _run_phase(self, run: _Fit, phase: PhaseConfig, p_idx: int, optimizer_state: dict[str, Any] | None) -> None:
        # The phase's cache lives in this frame only, so the previous phase's maps are gone before the next
        # phase builds its own: one cache in memory.
        ph = self._start_phase(run, phase, p_idx, optimizer_state)
        if ph is None:
            return
        while run.state.phase_epoch < ph.planned and not run.state.phase_done:
            self._epoch(run, ph)

    def _start_phase(self, run: _Fit, phase: PhaseConfig, p_idx: int,
                     optimizer_state: dict[str, Any] | None) -> _Phase | None:
        """The phase set up to run its epochs, or None when it finished before a resume."""
        state, model, tcfg = run.state, run.model, self.cfg.train
        if p_idx != state.phase:
            state.phase, state.phase_epoch, state.phase_done, state.bad_epochs = p_idx, 0, False, 0
            # A new phase starts from the best weights so far, as a person would continue.
            model.load_state_dict(run.best_weights)
            if run.ema is not None:
                run.ema.reset(model)
        if state.phase_done or state.phase_epoch >= phase.epochs:
            return None
        params = set_trainable(model, phase.unfreeze)
        cache = None
        if tcfg.cache_frozen:
            cache = FrozenPrefixCache.build(model, run.x, self.cfg.augment, device=self.device,
                                            batch_size=tcfg.batch_size, channels_last=self.channels_last)
        optimizer = self._optimizer(layerwise_groups(model, params, tcfg.layer_decay), phase.lr)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        steps_per_epoch = self._steps_per_epoch(run.y)
        return _Phase(index=p_idx, config=phase, optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cuda") if self.amp else None, cache=cache,
                      steps_per_epoch=steps_per_epoch, warmup=int(tcfg.warmup_epochs * steps_per_epoch),
                      planned=phase.epochs, cache_seconds=cache.seconds if cache is not None else 0.0,
                      forward=distributed.wrap(model, cache, self.device))

    def _epoch(self, run: _Fit, ph: _Phase) -> None:
        """One epoch: train, validate, track the best weights and the budget, checkpoint, report."""
        state, model = run.state, run.model
        started = time.perf_counter()
        size = progressive_size(self.cfg.model.image_size, self.cfg.train.progressive_resize, state.phase_epoch,
                                ph.planned)
        train_loss = self._train_epoch(
            model, run.criterion, ph.optimizer, ph.scaler, run.x, run.y, run.gen, ph.config.lr,
            state.phase_epoch * ph.steps_per_epoch, ph.steps_per_epoch * ph.planned, ph.warmup,
            f"epoch {state.epoch + 1}", run.ema, size, ph.cache, ph.forward,
        )
        if run.ema is not None:
            with run.ema.applied(model):
                val = self._validate(model, run.x_val, run.y_val)
        else:
            val = self._validate(model, run.x_val, run.y_val)
        state.phase_epoch += 1
        state.epoch += 1
        per_rank = self.dist.all_gather(train_loss)  # each rank's mean over its part of the batches
        train_loss = float(np.mean(per_rank))
        record = {
            "epoch": state.epoch, "phase": ph.index + 1, "unfreeze": ph.config.unfreeze,
            "train_loss": train_loss, "train_size": size, **val,
            "cached_blocks": ph.cache.n_blocks if ph.cache is not None else 0,
            "cache_seconds": round(ph.cache_seconds, 2),  # building it, before the phase's first epoch
            "lr": ph.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
            **({"train_loss_ranks": " ".join(f"{v:.17g}" for v in per_rank)} if self.dist.active else {}),
        }
        self._track_best(run, val, record)
        state.history.append(record)
        self._apply_time_limit(run, ph, record)
        if self.dist.active:  # decided once, by rank 0 (its clock), for every rank
            state.phase_done, state.stopped, ph.planned, decided = self.dist.broadcast(
                (state.phase_done, state.stopped, ph.planned, record))
            record.update(decided)
        ph.cache_seconds = 0.0
        self._save_checkpoint(model, ph.optimizer, run.gen, state, run.best_weights, run.ema)
        # Logged after the checkpoint: a run interrupted on this line resumes after this epoch.
        log.info(
            f"epoch {state.epoch:>3}  phase {ph.index + 1} ({ph.config.unfreeze})  loss {train_loss:.4f}  "
            f"val_loss {val['val_loss']:.4f}  val_macro_f1 {val['val_macro_f1']:.4f}  "
            f"val_acc {val['val_accuracy']:.4f}  {record['seconds']:.0f}s"
            + ("  (early stop)" if record.get("early_stop") else "")
            + ("  (time limit)" if record.get("time_limit") else "")
        )
        if self.on_epoch is not None:
            self.on_epoch(state.epoch, val["val_macro_f1"])

    def _track_best(self, run: _Fit, val: dict[str, float], record: dict[str, Any]) -> None:
        """Keep the best weights by ``train.monitor``; end the phase after ``train.patience`` epochs without."""
        state, tcfg = run.state, self.cfg.train
        score = val["val_macro_f1"] if tcfg.monitor == "val_macro_f1" else -val["val_loss"]
        if score > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = score, state.epoch, 0
            run.best_weights = run.ema.copy() if run.ema is not None else _weights_copy(run.model)
        else:
            state.bad_epochs += 1
            if tcfg.patience and state.bad_epochs >= tcfg.patience:
                state.phase_done = True
                record["early_stop"] = True
        record["best_epoch"] = state.best_epoch

    def _apply_time_limit(self, run: _Fit, ph: _Phase, record: dict[str, Any]) -> None:
        limit = self.cfg.train.time_limit_minutes
        if not limit:
            return
        state = run.state
        # Shorten the plan to the epochs that still fit the budget, so the learning-rate schedule
        # still ends where it should instead of being cut off at a high rate.
        left = limit * 60 - (time.perf_counter() - run.started)
        fits = state.phase_epoch + int(left // max(record["seconds"], 1e-9))
        if fits < ph.planned:
            ph.planned = fits
            record["planned_epochs"] = ph.planned
        if state.phase_epoch >= ph.planned and state.phase_epoch < ph.config.epochs:
            state.phase_done = state.stopped = True
            record["time_limit"] = True

    def _optimizer(self, params: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        wd = self.cfg.train.weight_decay
        name = self.cfg.train.optimizer
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)

    def _steps_per_epoch(self, labels: torch.Tensor) -> int:
        tcfg = self.cfg.train
        if tcfg.sampling == "undersample":
            counts = torch.bincount(labels)
            cap = max(1, int(round(counts[counts > 0].min().item() * tcfg.undersample_ratio)))
            n = int(torch.clamp(counts, max=cap).sum())
        else:
            n = len(labels)
        return max(1, math.ceil(n / tcfg.batch_size))

    def _train_epoch(self, model, criterion, optimizer, scaler, x, y, gen, base_lr, step, total, warmup, desc,
                     ema: WeightEMA | None = None, size: int | None = None,
                     cache: FrozenPrefixCache | None = None, forward: nn.Module | None = None):
        tcfg, dist, seed = self.cfg.train, self.dist, self.cfg.training_seed
        forward = forward if forward is not None else distributed.wrap(model, cache, self.device)
        model.train()
        _freeze_norm_stats(model)
        order = epoch_indices(y, tcfg.sampling, tcfg.undersample_ratio, gen)
        batches = [order[i:i + tcfg.batch_size] for i in range(0, len(order), tcfg.batch_size)]
        losses = []
        bar = progress(batches, desc=desc, unit="batch", enabled=tcfg.progress and dist.main)
        for idx in bar:
            idx = dist.shard(idx)  # under torchrun: this rank's part of the global batch
            # Augment on the CPU with the run's generator so the stream is the same on every device.
            agen = dist.generator(gen, seed, step)
            if dist.active:  # dropout: a stream per rank and step, the same again after a restart
                torch.manual_seed(distributed._mix(seed, dist.rank, step, 1))
            xb = cache.take(idx, agen) if cache is not None else augment_batch(
                x[idx].float().div_(255).unsqueeze(1), self.cfg.augment, agen)
            if cache is None and size is not None and size != xb.shape[-1]:
                xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            xb = (xb.pin_memory() if self.amp else xb).to(self.device, non_blocking=True)  # pinned: async copy
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y[idx].to(self.device)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * group.get("lr_scale", 1.0) * _lr_factor(step, total, warmup, tcfg.schedule)
            mb = () if self.m_train is None else (self.m_train[idx].to(self.device),)
            with torch.autocast(self.device.type, enabled=self.amp):
                out = forward(xb, *mb)
                loss = criterion(out, yb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        return float(np.mean(losses)) if losses else float("nan")

    def _validate(self, model, x_val, y_val) -> dict[str, float]:
        if len(y_val) == 0:
            return {"val_loss": float("nan"), "val_macro_f1": float("nan"), "val_accuracy": float("nan")}
        # Sharded across ranks, the logits gathered: every rank computes the same metrics.
        self.dist.sync_buffers(model)
        rows, m_val = self.dist.rows(len(y_val)), self.m_val
        logits = predict_logits(model, x_val[rows], device=self.device, channels_last=self.channels_last,
                                metadata=None if m_val is None else np.asarray(m_val)[rows])
        logits = self.dist.gather_rows(logits, len(y_val))
        y = torch.as_tensor(y_val)
        m = classification_metrics(y.numpy(), logits.argmax(1).numpy(), self.classes)
        return {
            "val_loss": float(F.cross_entropy(logits, y)),
            "val_macro_f1": m["macro_f1"],
            "val_accuracy": m["accuracy"],
        }

    def _save_checkpoint(self, model, optimizer, gen, state: TrainState, best_weights,
                         ema: WeightEMA | None = None) -> None:
        if not self.dist.main:  # rank 0 alone writes the run directory
            return
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_weights": best_weights,
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": {k: v for k, v in state.__dict__.items() if k != "history"},
            "history": state.history,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        }
        path = self.run_dir / CHECKPOINT
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a run killed mid-write keeps the previous checkpoint

    def _load_checkpoint(self, gen: torch.Generator):
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(saved["model"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = TrainState(**saved["state"], history=list(saved["history"]))
        return saved, state, saved["best_weights"]
