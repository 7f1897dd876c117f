"""DDP overhead on this machine: ``train`` as 1 process x 2 threads against 2 processes x 1 thread (torchrun,
gloo), in training images per second, and the time of one gradient all-reduce per step (gloo, 2 processes)
for the models' gradient sizes. Writes bench/results/ddp.json.

    python bench/ddp.py [--images 240] [--epochs 3]

On a GPU cluster, expect (on paper): a step's all-reduce moves 2 x (N-1)/N x the gradient (4 bytes per
trainable parameter: EfficientNet-Lite0 4.7 M -> 19 MB, Lite2 6.1 M -> 24 MB) over NVLink (~100+ GB/s, well
under 1 ms) inside a node and over the network between nodes (25 Gb/s Ethernet ~3 GB/s: ~13 ms for Lite0);
DDP overlaps it with the backward pass, so throughput scales almost linearly while a step's compute
(~50-100 ms for a batch of 64 at 224 px on one GPU) is much longer than its all-reduce. Measure it with this
script's torchrun command on the cluster (images/s at 1, 8, 16, 32 GPUs) and the all-reduce time printed
by ``torch.distributed`` benchmarks (``nccl-tests``' all_reduce_perf) at the gradient's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "seed_cnn2", "--image-size", "64", "--batch-size", "32", "--lr", "2e-3",
        "--set", "train.patience=0", "--no-progress"]


def _dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 3):
            img = rng.normal(90 + 30 * "abc".index(c), 12, (64, 64)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def _images_per_second(run: Path) -> float:
    history = pd.read_csv(run / "history.csv")
    n_train = int((pd.read_csv(run / "dataset.csv")["split"] == "train").sum())
    return n_train * len(history) / float(history["seconds"].sum())


def _train(data: Path, out: Path, epochs: int, nproc: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "defectscope", "train", "--data", str(data), "--out", str(out),
           "--epochs", str(epochs), *ARGS, "--set", f"train.threads={threads}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return _images_per_second(out)


def _allreduce_worker(rank: int, numels: list[int], port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for numel in numels:
        t = torch.ones(numel)
        dist.all_reduce(t)
        started = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(t)
        result[numel] = (time.perf_counter() - started) / 10 * 1000
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _allreduce_ms(numels: list[int]) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_allreduce_worker, args=(numels, port, f.name), nprocs=2)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from defectscope.models.factory import create_model

    sizes = {name: sum(p.numel() for p in create_model(name, 3, image_size=64, pretrained="none").parameters())
             for name in ("seed_cnn2", "tf_efficientnet_lite0")}
    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp) / "data", args.images)
        one = _train(data, Path(tmp) / "one", args.epochs, 1, 2)
        two = _train(data, Path(tmp) / "two", args.epochs, 2, 1)
        single = _train(data, Path(tmp) / "single", args.epochs, 1, 1)  # control: one thread, one process
    reduce_ms = _allreduce_ms(list(sizes.values()))
    result = {
        "machine_cpus": os.cpu_count(), "model": "seed_cnn2", "image_size": 64, "batch_size": 32,
        "train_images_per_second": {"1 process x 2 threads": round(one, 1), "2 processes x 1 thread": round(two, 1),
                                    "1 process x 1 thread": round(single, 1)},
        "ddp_overhead": round(1 - two / one, 3), "target_overhead": 0.10,
        "allreduce_ms_per_step_gloo_2proc": {name: round(reduce_ms[str(n)], 2) for name, n in sizes.items()},
        "gradient_parameters": sizes,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "note": "2 cores shared with other work (see the load average): a 2-thread process suffers most from "
                "oversubscription, so the overhead is only meaningful on an idle machine; GPU clusters: see the "
                "module docstring",
    }
    from defectscope.training.train import machine_info

    result |= {"machine": machine_info(), "command": "python " + " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = ROOT / "bench" / "results" / "ddp.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
