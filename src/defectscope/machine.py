"""What machine this is, for every speed result: the CPU, its feature flags that decide which kernels run, the
load. One reader of /proc/cpuinfo, at the bottom of the layers, so training, the runtime and the benches agree."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which kernels run: bf16/AMX matrix units, VNNI int8, AVX-512. Every speed result names them.
SPEED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
               "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def speed_flags() -> list[str]:
    """The flags of SPEED_FLAGS this CPU has, in that order."""
    have = cpu_flags()
    return [f for f in SPEED_FLAGS if f in have]


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_record() -> dict:
    """The machine as a speed result records it (JSON-ready)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_flags": speed_flags(), "load_average": load,
            "platform": platform.platform(), "python": platform.python_version()}
