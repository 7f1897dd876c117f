"""The station's routes, one ``APIRouter`` per group, in the order the app includes them (the OpenAPI
document lists paths in that order)."""

from __future__ import annotations

from defectscope.station.serve.routes import dashboard, model, predict, probes, results, review

__all__ = ["ROUTERS"]

ROUTERS = (probes.router, predict.router, results.router, review.router, model.router, dashboard.router)
