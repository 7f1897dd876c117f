"""``defectscope tune`` with two workers on one PostgreSQL study (the server the store's tests start): they
share the trials, and a worker killed mid-trial loses nothing: its trial is failed by heartbeat and retried."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import fresh_postgres_database
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
SRC = Path(__file__).parent.parent / "src"
STUDY = "shared"
# Optuna 4.9 renamed RetryFailedTrialCallback (the old name warns); older Optuna has only the old one.
RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
TRIALS = 4


def _worker(data: Path, out: Path, url: str, space: Path, log: Path) -> subprocess.Popen:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "defectscope", "tune", "--data", str(data), "--out", str(out), "--budget", "5m",
           "--trials", str(TRIALS), "--storage", url, "--study", STUDY, "--space", str(space), "--pruner", "none",
           "--heartbeat", "1", "--epochs", "6", "--no-progress",
           "--set", "model.name=seed_cnn2", "--set", "model.image_size=32", "--set", "train.batch_size=16",
           "--set", "train.lr=2e-3", "--set", "train.patience=0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {log}: {log.read_text()}")


def test_two_workers_finish_one_study_and_a_killed_workers_trial_is_retried(folder_dataset, postgres_url,
                                                                            tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.recipe": ["finetune"], "train.lr": {"low": 1e-3, "high": 1e-2}}))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    postgres_url = fresh_postgres_database(postgres_url)  # not the store's: both keep alembic_version
    a = _worker(folder_dataset, tmp_path / "a", postgres_url, space, logs[0])
    try:
        _wait_for(logs[0], r"trial 0: ", a)  # worker A created the study and started trial 0
        b = _worker(folder_dataset, tmp_path / "b", postgres_url, space, logs[1])
        time.sleep(0.5)
        a.send_signal(signal.SIGKILL)  # in the middle of trial 0: no clean-up, its trial stays RUNNING
        a.wait()
        assert b.wait(timeout=150) == 0, logs[1].read_text()
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
    storage = optuna.storages.RDBStorage("postgresql+psycopg://" + postgres_url.split("://", 1)[1])
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TRIALS and TrialState.RUNNING not in states.values()
    assert states[0] == TrialState.FAIL  # the killed worker's trial, failed by heartbeat...
    retried = [t for t in complete if RETRY.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].params == trials[0].params  # ...and run again: none lost
    # no trial run twice: each trial number started by one worker, once
    started = [n for log in logs for n in re.findall(r"trial (\d+): \{", log.read_text())]
    assert len(started) == len(set(started))
    assert "0" in re.findall(r"trial (\d+): \{", logs[0].read_text())
    assert len({tuple(sorted(t.params.items())) for t in complete}) == TRIALS
