"""What ``defectscope serve`` can be told, and where its API keys come from."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from defectscope.station.store import sqlite_path

__all__ = ["HTTP_CHOICES", "KEY_RE", "LOOP_CHOICES", "ServeConfig", "inference_streams", "is_loopback", "load_api_keys",
           "load_read_keys"]

# What a key may hold: the RFC 6750 bearer-token characters. No blank of any kind, so a key is compared
# byte for byte and a pasted key with a trailing space is refused, not trimmed into a match.
KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
# The HTTP parser and the event loop (see defectscope.station.serve.connections): "auto" takes the C ones
# (httptools, uvloop) when they are installed, else h11 and asyncio's own loop.
HTTP_CHOICES = ("auto", "httptools", "h11")
LOOP_CHOICES = ("auto", "uvloop", "asyncio")


@dataclass
class ServeConfig:
    """Everything ``defectscope serve`` can be told. Sizes in bytes; ``max_queue`` counts images."""

    model: Path
    db: str = "station/results.db"
    data: Path | None = None  # default: beside a SQLite database, else ./station
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: frozenset[str] = frozenset()  # full keys: read and write
    read_keys: frozenset[str] = frozenset()  # read-only keys: dashboards, results, images, metrics
    open_reads: bool = False  # with keys set, let reads through without one (an explicit choice)
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_files: int = 32
    max_upload_bytes: int = 32 << 20
    max_request_bytes: int = 128 << 20  # a predict request (its images streamed, never buffered whole)
    max_body_bytes: int = 64 << 10  # any other request's body (a review is a few hundred bytes)
    max_pixels: int = 50_000_000
    pilot: bool = False
    escape_cap: float = 0.01
    reload_poll_seconds: float = 2.0  # how often the model file is checked for a new model (0: never)
    generation_poll_seconds: float = 2.0  # how often the store is asked which model the station runs (0: never)
    replica: str | None = None  # this process's name in the rows and the dashboard (default: host:port)
    threads: int | None = None
    # Inference threads, each running its own Predictor of the model, sharing ``threads`` between them (None:
    # the rule of inference_streams() below). Two one-thread streams beat one two-thread stream on a 2-core station: a
    # request need not wait for the other's batch, and a parallel region never waits for a preempted thread.
    inference_streams: int | None = None
    runtime: str = "onnxruntime"  # onnxruntime | openvino | auto (see defectscope.runtime.engines)
    precision: str = "fp32"  # fp32 | int8 | bf16 | fp16 | auto
    device: str = "cpu"  # cpu | gpu (falls back to the CPU)
    max_connections: int = 128  # open connections at most; one more is answered 503 and closed
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    body_timeout: float = 60.0  # seconds a request may take to send its whole body (408 after)
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    http: str = "auto"  # auto | httptools | h11: the HTTP parser
    loop: str = "auto"  # auto | uvloop | asyncio: the event loop
    max_dashboard_points: int = 3_000  # window / bucket at most (the dashboard's bounded cost)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.data is None:
            db_file = sqlite_path(self.db)
            self.data = db_file.parent if db_file is not None else Path("station")
        self.data = Path(self.data).absolute()
        if not self.replica:
            self.replica = f"{socket.gethostname()}:{self.port}"
        for name in ("max_batch", "max_queue", "max_files", "max_upload_bytes", "max_request_bytes", "max_pixels",
                     "max_body_bytes", "max_connections", "max_dashboard_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inference_streams is not None and self.inference_streams < 1:
            raise ValueError(f"inference_streams must be >= 1, got {self.inference_streams}")
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.http not in HTTP_CHOICES:
            raise ValueError(f"http must be one of {', '.join(HTTP_CHOICES)}, got {self.http!r}")
        if self.loop not in LOOP_CHOICES:
            raise ValueError(f"loop must be one of {', '.join(LOOP_CHOICES)}, got {self.loop!r}")
        both = self.api_keys & self.read_keys
        if both:
            raise ValueError(f"{len(both)} key(s) given both as a full and as a read-only key; give each once")
        if not 0 < self.escape_cap < 1:
            raise ValueError(f"escape_cap must be in (0, 1), got {self.escape_cap}")


def inference_streams(config: ServeConfig) -> int:
    """The inference streams the station runs: as configured, else two on a CPU with two or more inference
    threads (given, or one per core), else one. Never more streams than threads."""
    threads = config.threads or os.cpu_count() or 1
    if config.inference_streams is not None:
        return max(1, min(config.inference_streams, threads))
    return 2 if config.device == "cpu" and threads >= 2 else 1


def load_api_keys(key_file: str | Path | None = None, env: dict[str, str] | None = None) -> frozenset[str]:
    """Full keys from ``DEFECTSCOPE_API_KEYS`` (comma-separated) and a key file (one per line, # comments)."""
    return _load_keys("DEFECTSCOPE_API_KEYS", key_file, env)


def load_read_keys(key_file: str | Path | None = None, env: dict[str, str] | None = None) -> frozenset[str]:
    """Read-only keys from ``DEFECTSCOPE_READ_KEYS`` and a key file, in the same forms."""
    return _load_keys("DEFECTSCOPE_READ_KEYS", key_file, env)


def _load_keys(variable: str, key_file: str | Path | None, env: dict[str, str] | None) -> frozenset[str]:
    env = os.environ if env is None else env
    # Only the separators are trimmed (a comma list, a file's line ends); a key itself is taken as written.
    keys = {k.strip(" \t") for k in env.get(variable, "").split(",") if k.strip(" \t")}
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip(" \t\r")
            if line:
                keys.add(line)
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys")
    bad = [k for k in keys if not KEY_RE.match(k)]
    if bad:
        raise ValueError(f"{len(bad)} API key(s) hold characters other than A-Z a-z 0-9 . _ ~ + / = - (or are over "
                         "256 long); use long random keys such as `openssl rand -hex 24`")
    return frozenset(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
