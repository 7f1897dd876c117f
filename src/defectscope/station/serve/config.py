"""What ``defectscope serve`` can be told, and where its API keys come from."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from defectscope.station.store import sqlite_path

__all__ = ["ServeConfig", "is_loopback", "load_api_keys"]


@dataclass
class ServeConfig:
    """Everything ``defectscope serve`` can be told. Sizes in bytes; ``max_queue`` counts images."""

    model: Path
    db: str = "station/results.db"
    data: Path | None = None  # default: beside a SQLite database, else ./station
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: frozenset[str] = frozenset()
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_files: int = 32
    max_upload_bytes: int = 32 << 20
    max_request_bytes: int = 128 << 20
    max_pixels: int = 50_000_000
    pilot: bool = False
    escape_cap: float = 0.01
    reload_poll_seconds: float = 2.0
    threads: int | None = None
    runtime: str = "onnxruntime"  # onnxruntime | openvino | auto (see defectscope.runtime.engines)
    precision: str = "fp32"  # fp32 | int8 | bf16 | fp16 | auto
    device: str = "cpu"  # cpu | gpu (falls back to the CPU)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.data is None:
            db_file = sqlite_path(self.db)
            self.data = db_file.parent if db_file is not None else Path("station")
        self.data = Path(self.data).absolute()
        for name in ("max_batch", "max_queue", "max_files", "max_upload_bytes", "max_request_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.escape_cap < 1:
            raise ValueError(f"escape_cap must be in (0, 1), got {self.escape_cap}")


def load_api_keys(key_file: str | Path | None = None, env: dict[str, str] | None = None) -> frozenset[str]:
    """Keys from ``DEFECTSCOPE_API_KEYS`` (comma-separated) and a key file (one per line, # comments)."""
    env = os.environ if env is None else env
    keys = {k.strip() for k in env.get("DEFECTSCOPE_API_KEYS", "").split(",") if k.strip()}
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys")
    return frozenset(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
