"""The tuner's shared-study storage: a dead worker's trial is retried (at most twice) through the callback the
installed Optuna offers, without the deprecation warning of the name Optuna 4.9 retired."""

from __future__ import annotations

import warnings

import optuna
import pytest
from helpers import fresh_postgres_database

from defectscope.training import tune


def test_shared_storage_retries_stale_trials_without_a_deprecation_warning(postgres_url):
    url = fresh_postgres_database(postgres_url)
    with warnings.catch_warnings():
        # Deprecations only: the heartbeat itself is an experimental Optuna argument (ExperimentalWarning).
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        storage = tune._storage(url, heartbeat_seconds=2)
    try:
        callback = storage.heartbeat_stale_trial_callback if hasattr(storage, "heartbeat_stale_trial_callback") \
            else storage.failed_trial_callback
        assert callback is not None and callback._max_retry == 2
        assert storage.heartbeat_interval == 2 and storage.grace_period == 6
    finally:
        storage.engine.dispose()


def test_the_retry_keyword_follows_the_installed_optuna(monkeypatch):
    """Optuna < 4.9 (pyproject allows >= 3.4) has only RetryFailedTrialCallback and ``failed_trial_callback``."""
    kw = tune._retry_stale_trials(2)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        assert set(kw) == {"heartbeat_stale_trial_callback"}
        assert type(kw["heartbeat_stale_trial_callback"]) is optuna.storages.RetryHeartbeatStaleTrialCallback
    monkeypatch.delattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old class is deprecated where it is only an alias
        old = tune._retry_stale_trials(2)
    assert set(old) == {"failed_trial_callback"} and old["failed_trial_callback"]._max_retry == 2


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db"])
def test_postgres_urls_take_the_psycopg3_driver(url, monkeypatch):
    seen = {}
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda u, **kw: seen.update(url=u, **kw))
    tune._storage(url, heartbeat_seconds=1)
    assert seen["url"] == "postgresql+psycopg://u@h/db" and seen["grace_period"] == 3
