"""``defectscope tune``: a study of small trials, pruning per epoch, the budget, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import FAST
from optuna.trial import TrialState

from defectscope import evaluate, tune
from defectscope.config import build_config
from defectscope.rundir import Run
from defectscope.training.tune import DEFAULT_STUDY, VIEWS, _trial_config, base_params, default_space

SPACE = {"train.recipe": ["frozen", "finetune"], "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
         "train.frozen_head": ["rbf", "linear"], "train.class_weight_power": {"low": 0.0, "high": 1.0}}


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=DEFAULT_STUDY, storage=f"sqlite:///{out / 'study.db'}")


def test_study_runs_trials_and_the_best_is_an_ordinary_run(folder_dataset, tmp_path):
    out = tmp_path / "tune"
    run = tune(folder_dataset, out, budget_minutes=5, n_trials=4, space=SPACE, **FAST)
    assert isinstance(run, Run) and run.path == (out / "best").resolve()
    summary = json.loads((out / "tune.json").read_text())
    assert (out / "study.db").is_file()
    assert len(summary["trials"]) == 4 and summary["counts"]["fail"] == 0
    values = [t["value"] for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["value"] == max(values)
    best_trial = out / summary["best"]["trial_run"]
    assert (out / "best" / "model.safetensors").read_bytes() == (best_trial / "model.safetensors").read_bytes()
    for t in summary["trials"]:
        # a parameter of one recipe is not sampled in the other's trials
        assert ("train.lr" in t["params"]) == (t["params"]["train.recipe"] == "finetune")
        assert ("train.frozen_head" in t["params"]) == (t["params"]["train.recipe"] == "frozen")
        assert not (out / t["run"] / "checkpoint.pt").exists()
    assert evaluate(run)["n"] > 0
    # the same call again: the study already has its 4 trials, so it only re-reads them
    tune(folder_dataset, out, budget_minutes=5, n_trials=4, space=SPACE, **FAST)
    assert len(_study(out).trials) == 4


def test_a_bad_learning_rate_is_pruned_after_its_first_epoch(folder_dataset, tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name=DEFAULT_STUDY, storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize")
    # Fixed order makes it deterministic: a good trial sets the bar at epoch 1, a learning rate that moves
    # nothing stays at chance and successive halving (rung 0: the best of fewer than 3) stops it there.
    study.enqueue_trial({"train.lr": 5e-3})
    study.enqueue_trial({"train.lr": 1e-8})
    tune(folder_dataset, out, budget_minutes=5, n_trials=2, pruner="halving",
         space={"train.lr": {"low": 1e-8, "high": 1e-2, "log": True}}, **{**FAST, "train.epochs": 4})
    good, bad = _study(out).trials
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 4
    assert bad.state == TrialState.PRUNED and list(bad.intermediate_values) == [1]
    summary = json.loads((out / "tune.json").read_text())
    assert summary["counts"]["pruned"] == 1 and summary["best"]["number"] == good.number


def test_budget_stops_starting_trials(folder_dataset, tmp_path):
    tune(folder_dataset, tmp_path / "tune", budget_minutes=0.001, space=SPACE, **FAST)
    summary = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert len(summary["trials"]) == 1  # the first always starts; nothing fits after it


def test_default_space_offers_only_the_views_the_data_has():
    assert VIEWS not in default_space(build_config())  # die images: orientation is fixed
    elpv = default_space(build_config(preset="elpv"))
    assert elpv[VIEWS] == ["none", "rot90", "flips", "dihedral"]
    assert set(elpv["train.recipe"]) == {"frozen", "finetune"}
    base = build_config(preset="elpv", overrides={"train.time_limit_minutes": 30})
    frozen = _trial_config(optuna.trial.FixedTrial({"train.recipe": "frozen", VIEWS: "rot90"}), base,
                           {"train.recipe": ["frozen"], VIEWS: ["rot90"]}, minutes_left=12)
    assert (frozen.augment.hflip, frozen.augment.vflip, frozen.augment.rot90) == (False, False, True)
    assert frozen.train.time_limit_minutes == 12  # never more than what is left of the budget
    tuned = _trial_config(optuna.trial.FixedTrial({"train.recipe": "finetune", VIEWS: "none"}), base,
                          {"train.recipe": ["finetune"], VIEWS: ["none"]}, minutes_left=60)
    assert tuned.model.tta is False and tuned.augment.rot90 and tuned.train.time_limit_minutes == 30


@pytest.mark.slow
def test_resume_after_kill(folder_dataset, tmp_path):
    out = tmp_path / "tune"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"low": 1e-3, "high": 5e-3, "log": True}}))
    fast = {**FAST, "train.epochs": 8}
    command = [sys.executable, "-m", "defectscope.cli", "tune", "--data", str(folder_dataset), "--out", str(out),
               "--budget", "10m", "--trials", "3", "--space", str(space), "--pruner", "none",
               *[f"--set={k}={v}" for k, v in fast.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not _killable(out / "study.db"):
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    before = _study(out).trials
    stale = [t for t in before if t.state == TrialState.RUNNING]
    first = next(t for t in before if t.state == TrialState.COMPLETE)
    assert len(stale) == 1

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = {t.number: t for t in _study(out).trials}
    assert len(after) > len(before)
    assert after[first.number].state == TrialState.COMPLETE and after[first.number].value == first.value
    assert after[stale[0].number].state == TrialState.FAIL
    retried = [t for t in after.values() if t.number > stale[0].number and t.params == stale[0].params]
    assert retried and retried[0].state == TrialState.COMPLETE  # the interrupted configuration ran again
    assert sum(t.state == TrialState.COMPLETE for t in after.values()) == 3
    # the resumed session draws new configurations, not the first session's random start again
    new = [t for t in after.values() if t.number > stale[0].number and t is not retried[0]]
    assert new and all(t.params != first.params for t in new)
    assert (out / "best" / "model.safetensors").is_file() and not (out / "tune.lock").exists()


def _killable(db: Path) -> bool:
    """A trial complete and another running with its parameters drawn (killed mid-training, not between
    ask and sample). Read-only SQL: polling must not take the write locks the tuning process needs."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
        try:
            states = dict(con.execute("SELECT trial_id, state FROM trials").fetchall())
            with_params = {row[0] for row in con.execute("SELECT DISTINCT trial_id FROM trial_params")}
        finally:
            con.close()
    except sqlite3.Error:  # being created, or busy: look again
        return False
    return "COMPLETE" in states.values() and any(
        state == "RUNNING" and trial in with_params for trial, state in states.items())


@pytest.mark.slow
def test_readme_tuning_commands(folder_dataset, tmp_path):
    """The README's Tuning block as written, on a small space and 2 trials so it takes seconds."""
    import re
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = readme.split("## Tuning", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S)
                for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("defectscope tune")
    shutil.copytree(folder_dataset, tmp_path / "my_images")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"train.recipe": ["frozen", "finetune"]}))
    small = " --trials 2 --space space.yaml --no-progress " + " ".join(f"--set {k}={v}" for k, v in FAST.items())
    commands[0] += small
    commands[1] += " --no-report"  # the metrics are the check; the HTML report's Grad-CAM takes the time
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert json.loads((tmp_path / "runs/tune/best/evaluation/metrics.json").read_text())["n"] > 0


def test_a_bad_space_fails_before_any_trial(folder_dataset, tmp_path):
    from defectscope.config import ConfigError

    with pytest.raises(ConfigError, match="train.nope"):
        tune(folder_dataset, tmp_path / "t", budget_minutes=1, space={"train.nope": [1, 2]}, **FAST)
    with pytest.raises(ConfigError, match="views"):
        tune(folder_dataset, tmp_path / "t", budget_minutes=1, space={VIEWS: ["sideways"]}, **FAST)
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_a_second_process_on_the_same_study_is_refused(folder_dataset, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "tune.lock").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(RuntimeError, match="being tuned by process"):
        tune(folder_dataset, out, budget_minutes=1, space=SPACE, **FAST)
    assert (out / "tune.lock").read_text() == str(os.getppid())  # the other process's lock is left alone


def test_a_new_study_starts_from_the_base_configuration(folder_dataset, tmp_path):
    out = tmp_path / "tune"
    tune(folder_dataset, out, budget_minutes=5, n_trials=2, space=SPACE, **{**FAST, "train.epochs": 1})
    first = _study(out).trials[0]
    assert first.params == {"train.recipe": "finetune", "train.lr": FAST["train.lr"],
                            "train.class_weight_power": 1.0}
    assert json.loads((out / "tune.json").read_text())["base_trial"] == 0
    base = build_config(overrides={"train.recipe": "auto"})
    assert base_params(base, SPACE) is None  # auto is not a choice of the space: nothing to reproduce
