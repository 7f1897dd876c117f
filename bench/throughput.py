"""Line throughput: PNG files on disk -> decision -> row in the log, against a plain loop and the bound.

On ELPV images (300x300 8-bit PNG, from the elpv-dataset package) and one trained run, exported to ONNX:

  end_to_end  ``sort(mode='copy', settle_seconds=0)`` on a fresh inbox: images/s from the wall time
              of the call (model loading, hashing, decoding, inference, copying and the SQLite log included)
  components  decode / preprocessing (resize, scale) / inference / logging, each timed alone on the same
              files with the sorter's own pieces (decode_gray on the file bytes, resize_gray, the sorter's
              ONNX Runtime session in its batches, ResultLog find + begin + mark_done per image) plus
              filing (read, hash, place_file's fsynced copy): seconds per image and share of their sum
  plain_loop  the model in eager PyTorch, one image at a time, as the inspection projects ran theirs:
              PIL open -> resize -> tensor -> model -> argmax, eval() and inference_mode, torch threads = 2
  bound       decode rate alone (load_gray in a 2-thread pool) and batched ONNX Runtime rate alone (2
              intra-op threads, batch 32, preloaded arrays); no pipeline beats 1 / (1/decode + 1/inference)

Each repeat measures everything once, in that order, on a fresh copy of the inbox; the medians are compared.
Targets on 2 cores: end-to-end >= 5x the plain loop and >= 70% of the bound.

    python bench/throughput.py                          # the ELPV bench's default run -> results/throughput.json
    python bench/throughput.py --run RUN --images 512 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SORTER_BATCH = 16  # sort's default batch size
ORT_BATCH = 32
STAGES = ("decode", "preprocessing", "inference", "logging", "filing")
TARGET_SPEEDUP = 5.0
TARGET_BOUND_FRACTION = 0.70


def default_run() -> Path:
    results = HERE / "results" / "elpv.json"
    try:
        return Path(json.loads(results.read_text())["recipes"]["default"]["run_dir"])
    except (OSError, KeyError, ValueError):
        sys.exit(f"no default run in {results} (run bench/elpv.py first) - pass --run RUN")


def elpv_files(n: int) -> list[Path]:
    """``n`` ELPV images spread evenly over the dataset (its labels file is ordered by class)."""
    from defectscope.data.table import load_table

    paths = load_table("elpv")[0]["path"].tolist()
    if n > len(paths):
        sys.exit(f"--images {n}: ELPV has only {len(paths)} images")
    return [Path(paths[i]) for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def fresh_inbox(files: list[Path], root: Path) -> Path:
    """A new folder holding copies of ``files`` (unique names), outside any timing."""
    inbox = Path(tempfile.mkdtemp(prefix="inbox-", dir=root))
    for i, f in enumerate(files):
        shutil.copyfile(f, inbox / f"{i:05d}_{f.name}")
    return inbox


# ------------------------------------------------------------------------------------------ measurements

def measure_end_to_end(onnx: Path, files: list[Path], root: Path) -> dict[str, Any]:
    from defectscope.deploy.sorter import sort

    inbox = fresh_inbox(files, root)
    out = Path(tempfile.mkdtemp(prefix="sorted-", dir=root))
    start = time.perf_counter()
    summary = sort(str(onnx), inbox, out, mode="copy", settle_seconds=0, progress=False)
    wall = time.perf_counter() - start
    if summary["processed"] != len(files) or summary["errors"]:
        raise RuntimeError(f"the sorter filed {summary['processed']} of {len(files)} images: {summary['errors']}")
    shutil.rmtree(inbox)
    shutil.rmtree(out)
    return {"seconds": wall, "images_per_second": len(files) / wall,
            "sorter_reported_images_per_second": summary["images_per_second"],
            "per_decision": summary["per_decision"]}


def measure_components(onnx: Path, files: list[Path], root: Path) -> dict[str, float]:
    """Seconds per image of each stage, alone and one after the other, with the sorter's own pieces."""
    from defectscope.data.images import decode_gray, resize_gray
    from defectscope.deploy import metadata as md
    from defectscope.deploy.predictor import Predictor
    from defectscope.deploy.resultlog import ResultLog
    from defectscope.deploy.sorter import place_file

    predictor = Predictor(onnx)  # the sorter's configuration (threads and decode threads by default)
    size, mode, n = predictor.image_size, predictor.resize, len(files)
    data = [f.read_bytes() for f in files]  # the sorter decodes the bytes it read and hashed

    start = time.perf_counter()
    decoded = [decode_gray(d) for d in data]
    decode = time.perf_counter() - start

    start = time.perf_counter()
    inputs = [(resize_gray(g, size, mode).astype(np.float32) / np.float32(255))[None] for g in decoded]
    preprocess = time.perf_counter() - start

    x = np.stack(inputs)
    names = list(md.OUTPUTS[1:])
    predictor.session.run(names, {md.INPUT: x[:SORTER_BATCH]})  # warm-up
    start = time.perf_counter()
    probs = np.concatenate([predictor.session.run(names, {md.INPUT: x[i:i + SORTER_BATCH]})[0]
                            for i in range(0, n, SORTER_BATCH)])
    inference = time.perf_counter() - start

    # What the sorter writes per image: look the image up (twice), a pending row, then done.
    db_dir = Path(tempfile.mkdtemp(prefix="log-", dir=root))
    records = [{
        "file_name": f.name, "source_path": str(f), "content_sha256": f"{i:064x}", "size_bytes": len(d),
        "decision": predictor.classes[int(p.argmax())], "top_class": predictor.classes[int(p.argmax())],
        "confidence": float(p.max()), "probabilities": dict(zip(predictor.classes, map(float, p), strict=True)),
        "drift_score": None, "model_id": "0" * 16, "model_version": "bench", "destination": str(db_dir / f.name),
        "error": None,
    } for i, (f, d, p) in enumerate(zip(files, data, probs, strict=True))]
    with ResultLog(db_dir / "results.db") as db:
        start = time.perf_counter()
        for r in records:
            db.find(r["content_sha256"], r["file_name"])
            db.find(r["content_sha256"], r["file_name"])
            db.mark_done(db.begin(r))
        logging = time.perf_counter() - start
    shutil.rmtree(db_dir)

    # Filing, what else the sorter does per image: read and hash the file, copy it (fsynced, verified) into place.
    out = Path(tempfile.mkdtemp(prefix="filed-", dir=root))
    start = time.perf_counter()
    for i, f in enumerate(files):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        place_file(f, out / f"{i:05d}_{f.name}", "copy", sha, out / f".part-{i}")
    filing = time.perf_counter() - start
    shutil.rmtree(out)
    return {"decode": decode / n, "preprocessing": preprocess / n, "inference": inference / n,
            "logging": logging / n, "filing": filing / n}


def measure_plain_loop(run: Path, files: list[Path], threads: int) -> dict[str, float]:
    """Eager PyTorch, one image at a time: PIL open -> resize -> tensor -> model -> argmax."""
    import torch
    from PIL import Image

    from defectscope.data.images import resize_gray
    from defectscope.rundir import Run

    torch.set_num_threads(threads)
    model, spec = Run(run).model(), Run(run).spec
    model.eval()
    size, mode = int(spec["image_size"]), spec.get("resize", "squash")

    def classify(path: Path) -> int:
        with Image.open(path) as im:
            gray = im.convert("L")
        if mode == "squash":
            pixels = np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR))
        else:
            pixels = resize_gray(np.asarray(gray), size, mode)
        x = torch.from_numpy(pixels.astype(np.float32) / np.float32(255))[None, None]
        return int(model(x).argmax(1))

    with torch.inference_mode():
        classify(files[0])  # warm-up, in the baseline's favour
        start = time.perf_counter()
        for f in files:
            classify(f)
        wall = time.perf_counter() - start
    return {"seconds": wall, "images_per_second": len(files) / wall}


def measure_decode(files: list[Path], size: int, mode: str, threads: int) -> dict[str, float]:
    """load_gray (decode + resize) over the files in a thread pool, nothing else running."""
    from defectscope.data.images import load_gray

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda f: load_gray(f, size, mode), files[:threads]))  # warm-up
        start = time.perf_counter()
        list(pool.map(lambda f: load_gray(f, size, mode), files))
        wall = time.perf_counter() - start
    return {"seconds": wall, "images_per_second": len(files) / wall}


def measure_ort(onnx: Path, x: np.ndarray, threads: int) -> dict[str, float]:
    """Batched ONNX Runtime on preloaded inputs, nothing else running."""
    import onnxruntime as ort

    from defectscope.deploy import metadata as md

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    names = list(md.OUTPUTS[1:])  # what the predictor asks for
    session.run(names, {md.INPUT: x[:ORT_BATCH]})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), ORT_BATCH):
        session.run(names, {md.INPUT: x[i:i + ORT_BATCH]})
    wall = time.perf_counter() - start
    return {"seconds": wall, "images_per_second": len(x) / wall}


# ---------------------------------------------------------------------------------------------- main

def filesystem_of(path: Path) -> str | None:
    """The mount point and type holding ``path`` (fsync costs depend on it), from /proc/mounts where present."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return f"{best[0]} ({best[1]})" if best else None


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory (default: the default recipe's run in results/elpv.json)")
    parser.add_argument("--images", type=int, default=512, help="ELPV images per measurement (512)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="cores for the plain loop, the decode pool and ONNX Runtime (2)")
    parser.add_argument("--results", default=str(HERE / "results" / "throughput.json"))
    parser.add_argument("--workdir", help="where the inbox, output and log go (default: the system temp folder)")
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1 or args.threads < 1:
        sys.exit("--images, --repeats and --threads must be >= 1")

    from PIL import Image

    from defectscope.data.images import load_gray
    from defectscope.deploy.export import export
    from defectscope.deploy.predictor import Predictor
    from defectscope.rundir import Run
    from defectscope.training.train import machine_info

    run = Path(args.run) if args.run else default_run()
    spec = Run(run).spec
    size, mode = int(spec["image_size"]), spec.get("resize", "squash")
    files = elpv_files(args.images)
    with Image.open(files[0]) as im:
        image_format = f"{im.width}x{im.height} {im.format} mode {im.mode}"

    with tempfile.TemporaryDirectory(prefix="defectscope-throughput-", dir=args.workdir) as tmp:
        root = Path(tmp)
        workdir_fs = filesystem_of(root)
        onnx = root / "model.onnx"
        export(run, onnx)
        sorter_predictor = Predictor(onnx)
        sorter_config = {"batch_size": SORTER_BATCH, "decode_threads": sorter_predictor.decode_threads,
                         "ort_intra_op_threads": sorter_predictor.session.get_session_options().intra_op_num_threads}
        del sorter_predictor
        x = np.stack([(load_gray(f, size, mode).astype(np.float32) / np.float32(255))[None] for f in files])

        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("end_to_end", "components", "plain_loop",
                                                                  "decode", "ort")}
        for r in range(args.repeats):
            rows["end_to_end"].append(measure_end_to_end(onnx, files, root))
            rows["components"].append(measure_components(onnx, files, root))
            rows["plain_loop"].append(measure_plain_loop(run, files, args.threads))
            rows["decode"].append(measure_decode(files, size, mode, args.threads))
            rows["ort"].append(measure_ort(onnx, x, args.threads))
            print(f"repeat {r + 1}/{args.repeats}: end-to-end {rows['end_to_end'][-1]['images_per_second']:.1f}/s, "
                  f"plain loop {rows['plain_loop'][-1]['images_per_second']:.1f}/s, "
                  f"decode {rows['decode'][-1]['images_per_second']:.1f}/s, "
                  f"ORT {rows['ort'][-1]['images_per_second']:.1f}/s", flush=True)

    e2e = median(rows["end_to_end"], "images_per_second")
    plain = median(rows["plain_loop"], "images_per_second")
    decode = median(rows["decode"], "images_per_second")
    ort_rate = median(rows["ort"], "images_per_second")
    bound = 1 / (1 / decode + 1 / ort_rate)
    stages = {k: median(rows["components"], k) for k in STAGES}
    total = sum(stages.values())
    speedup, fraction = e2e / plain, e2e / bound

    results = {
        "benchmark": "end-to-end line throughput: PNG files on disk -> decision -> row in the SQLite log",
        "run_dir": str(run.resolve()),
        "architecture": spec.get("architecture"),
        "image_size": size,
        "resize": mode,
        "classes": spec.get("classes"),
        "images": args.images,
        "image_format": image_format,
        "repeats": args.repeats,
        "threads": args.threads,
        "statistic": "median over repeats",
        "workdir_filesystem": workdir_fs,
        "end_to_end": {
            "what": "sort(onnx, mode='copy', settle_seconds=0): wall time of the call, model loading included",
            "images_per_second": round(e2e, 2),
            "sorter": sorter_config,
        },
        "components": {
            "what": "each stage alone on the same files, sequentially: decode_gray(bytes), resize_gray + /255, "
                    f"the sorter's ORT session in batches of {SORTER_BATCH}, ResultLog find x2 + begin + mark_done "
                    "(SQLite, WAL, synchronous=FULL); filing: read + SHA-256 + place_file copy (fsync, verify)",
            "seconds_per_image": {k: round(v, 6) for k, v in stages.items()},
            "share": {k: round(v / total, 4) for k, v in stages.items()},
            "sum_seconds_per_image": round(total, 6),
            "end_to_end_seconds_per_image": round(1 / e2e, 6),
        },
        "plain_loop": {
            "what": f"eager PyTorch, one image at a time: PIL open -> resize -> tensor -> model -> argmax, "
                    f"eval() + inference_mode, torch threads {args.threads}",
            "images_per_second": round(plain, 2),
        },
        "bound": {
            "what": f"decode: load_gray in a {args.threads}-thread pool; inference: ONNX Runtime, "
                    f"{args.threads} intra-op threads, batch {ORT_BATCH}, preloaded arrays; "
                    "bound = 1 / (1/decode + 1/inference)",
            "decode_images_per_second": round(decode, 2),
            "ort_images_per_second": round(ort_rate, 2),
            "images_per_second": round(bound, 2),
        },
        "speedup_vs_plain_loop": round(speedup, 3),
        "fraction_of_bound": round(fraction, 3),
        "targets": {
            f"speedup_vs_plain_loop >= {TARGET_SPEEDUP:g}": speedup >= TARGET_SPEEDUP,
            f"fraction_of_bound >= {TARGET_BOUND_FRACTION:g}": fraction >= TARGET_BOUND_FRACTION,
        },
        "per_repeat": rows,
        "machine": machine_info(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    shares = ", ".join(f"{k} {v:.0%}" for k, v in results["components"]["share"].items())
    print(f"end-to-end {e2e:.1f} img/s | plain loop {plain:.1f} img/s -> {speedup:.2f}x (target {TARGET_SPEEDUP:g}x) | "
          f"bound {bound:.1f} img/s (decode {decode:.1f}, ORT {ort_rate:.1f}) -> {fraction:.0%} "
          f"(target {TARGET_BOUND_FRACTION:.0%}) | time: {shares} | {path}")


if __name__ == "__main__":
    main()
