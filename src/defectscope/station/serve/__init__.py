"""``defectscope serve``: the station's HTTP API and dashboard."""

from defectscope.station.serve.app import ServeConfig, create_app, load_api_keys, serve

__all__ = ["ServeConfig", "create_app", "load_api_keys", "serve"]
