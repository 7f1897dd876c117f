"""Training on several processes with torch.distributed: torchrun's environment, the process group, and what
the ranks share.

``torchrun`` (torch.distributed.elastic) starts one process per GPU (or per CPU share) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`setup` joins the group with NCCL when the run's
device is CUDA and gloo otherwise. Without those variables (a plain ``defectscope train``) the world is one
process and every collective here returns at once, so the one-process path is exactly what it was.

What the ranks agree on, and how:

- every rank draws the same epoch order (class-balanced or shuffled, from one generator seeded alike) and takes
  its slice of each global batch (``train.batch_size`` is the global batch), so the gradients DistributedDataParallel
  averages are those of the one-process batch;
- augmentation and dropout draw from per-rank streams seeded by (seed, rank, step): a run is repeatable at a given
  world size, and a restarted rank draws the same numbers again;
- validation is sharded and the logits gathered, so every rank computes the same metrics; early stopping and the
  time budget are decided by rank 0 and broadcast;
- rank 0 alone writes the run directory, the logs and the checkpoints; every rank reads the checkpoint on resume
  (several nodes need the run directory on a shared filesystem).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

TIMEOUT_MINUTES = 30  # a collective that waits longer than this means a rank is gone


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: CUDA means this node's GPU ``local_rank``."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return device

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (every ``world``-th item). A batch smaller than the world still
        gives every rank an item (a repeated one), so all ranks step together."""
        if not self.active:
            return idx
        part = idx[self.rank::self.world]
        return part if len(part) else idx[self.rank % len(idx):][:1]

    def rows(self, n: int) -> slice:
        """The rows of an ``n``-row array this rank computes (see :meth:`gather_rows`)."""
        return slice(self.rank, n, self.world) if self.active else slice(0, n)

    def gather_rows(self, part: np.ndarray | torch.Tensor, n: int):
        """Every rank's :meth:`rows` share of an array, put back in row order on every rank."""
        if not self.active:
            return part
        parts = self.all_gather(part)
        first = parts[0]
        shape = (n, *first.shape[1:])
        out = torch.empty(shape, dtype=first.dtype) if isinstance(first, torch.Tensor) else np.empty(shape, first.dtype)
        for r, p in enumerate(parts):
            out[r::self.world] = p
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics, which each rank updated with its own batches) everywhere."""
        if self.active:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def generator(self, shared: torch.Generator, seed: int, step: int) -> torch.Generator:
        """The augmentation stream of one step: the shared generator in a one-process run (as it always was),
        else a stream of its own per (seed, rank, step), the same again after a restart."""
        if not self.active:
            return shared
        return torch.Generator().manual_seed(_mix(seed, self.rank, step))


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)


_CURRENT = Dist()


def world_from_env() -> Dist:
    env = os.environ
    return Dist(rank=int(env.get("RANK", 0)), world=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", 0)))


def current() -> Dist:
    """This process's :class:`Dist` (world size 1 until :func:`setup` joined a torchrun job)."""
    return _CURRENT


def setup(device: torch.device) -> Dist:
    """Join the torchrun job the environment describes, once: NCCL for a CUDA device, gloo otherwise. Ranks but
    0 log warnings only. Returns this process's :class:`Dist`."""
    global _CURRENT
    d = world_from_env()
    if not d.active:
        return _CURRENT
    if not torch.distributed.is_initialized():
        nccl = device.type == "cuda" and torch.cuda.is_available() and torch.distributed.is_nccl_available()
        if nccl:
            torch.cuda.set_device(d.device(device))
        timeout = dt.timedelta(minutes=TIMEOUT_MINUTES)
        store, _, _ = next(torch.distributed.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across --max-restarts: keys of the failed attempt (the old ranks'
        # addresses) would be read back, so each attempt gets keys of its own.
        store = torch.distributed.PrefixStore(f"defectscope/attempt_{restart_count()}", store)
        torch.distributed.init_process_group("nccl" if nccl else "gloo", store=store, rank=d.rank,
                                             world_size=d.world, timeout=timeout)
        if not d.main:
            logging.getLogger("defectscope").setLevel(logging.WARNING)
        log.info(f"distributed: {d.world} processes, backend {torch.distributed.get_backend()}")
    _CURRENT = d
    return d


def restart_count() -> int:
    """How many times torchrun started this job again after a rank failed (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted() -> bool:
    return restart_count() > 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


class _Forward(nn.Module):
    """The training forward pass as one module (the model, or the cached prefix's rest), for DDP to wrap."""

    def __init__(self, model: nn.Module, cache: Any = None):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self.model(x, *extra) if self.cache is None else self.cache.forward(self.model, x, *extra)


# DistributedDataParallel's options for every phase: torch's defaults. bench/ddp.py timed no buffer broadcast
# and gradient_as_bucket_view against them: no gain beyond the noise on CPU, a rank crashing at exit
# ("terminate called without an active exception") in 2 of 4 runs of the 2-process tests, and
# forward_sync_buffers does not exist before torch 2.14 (this project supports 2.4 on). The bench's variants
# still pass them explicitly.
DDP_OPTIONS: dict[str, Any] = {}


def wrap(model: nn.Module, cache: Any, device: torch.device, **options: Any) -> nn.Module:
    """The phase's forward pass: plain in one process, else under DistributedDataParallel, which averages the
    gradients of the trainable parameters across ranks (built per phase: each phase trains other parameters).
    ``options``: DistributedDataParallel keywords over :data:`DDP_OPTIONS`."""
    forward = _Forward(model, cache)
    if not current().active:
        return forward
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(forward, device_ids=ids, **(DDP_OPTIONS | options))


def launch(nproc: int, argv: Sequence[str], *, max_restarts: int = 0) -> int:
    """Run ``defectscope ARGV`` under torchrun with ``nproc`` processes on this machine; its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "defectscope", *argv]
    env = dict(os.environ)
    # One process per core share: torch's default of every core per process oversubscribes the machine.
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    log.info(f"launching: {' '.join(cmd)}")
    return subprocess.call(cmd, env=env)


def strip_option(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--nproc 2`` or ``--nproc=2``)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        flag = item.split("=", 1)[0]
        if flag in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out
