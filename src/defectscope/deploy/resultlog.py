"""The sorter's result log, now the shared results store (:mod:`defectscope.deploy.store`).

Kept so ``from defectscope.deploy.resultlog import ResultLog, export_log`` goes on working.
"""

from __future__ import annotations

from defectscope.deploy.store import COLUMNS, STATUSES, Store, StoreError, export_log, utc_now

ResultLog = Store

__all__ = ["COLUMNS", "STATUSES", "ResultLog", "StoreError", "export_log", "utc_now"]
