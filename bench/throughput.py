"""Line throughput per runtime and precision: PNG files on disk -> decision -> row in the log.

On ELPV images (300x300 8-bit PNG, from the elpv-dataset package) and one trained run, exported to ONNX
(fp32, the int8 QDQ model and the reference set beside it):

  runtimes    every runtime x precision this machine offers (onnxruntime_fp32, onnxruntime_int8,
              openvino_fp32, openvino_bf16, openvino_int8; unavailable ones are listed with the reason):
              images/s batched (batch 32 on preloaded arrays, candidates interleaved), images/s one at a
              time and p50/p99 latency of ``Predictor.predict(path)`` (decode + inference of one PNG), and,
              from :func:`defectscope.runtime.choice.select` on the run's ELPV test split: accuracy,
              decision agreement with fp32 (the run's policy), Drift AUROC change, accepted or refused
  end_to_end  ``sort(mode='copy', settle_seconds=0)`` on a fresh inbox of ``--sorter-images`` with the ``auto``
              choice and with onnxruntime fp32 (the old default). The target is checked on the steady state:
              the model loaded beforehand, images/s from the log's own row times after the first batch
              (hashing, decoding, inference, fsynced copies and the SQLite log included). One cold call
              (model load included, wall time) is reported beside it; ``--compare-src`` measures another
              source tree's sorter (e.g. main before a change) in the same repeats
  components  decode / preprocessing / inference / logging / filing, each timed alone with the sorter's
              pieces: seconds per image and share of their sum
  plain_loop  the model in eager PyTorch, one image at a time: PIL open -> resize -> tensor -> model ->
              argmax, eval() and inference_mode, torch threads = 2
  bound       decode rate alone (load_gray in a 2-thread pool) and the batched rate of a runtime alone:
              no pipeline beats 1 / (1/decode + 1/inference); fraction_of_bound = end to end / bound

Each repeat measures everything once, in that order; the medians are compared. Targets on 2 cores: the
sorter >= 90% of the new bound, the new bound >= 3x the old one (onnxruntime fp32).

    python bench/throughput.py                          # the ELPV bench's default run -> results/throughput.json
    python bench/throughput.py --run RUN --images 512 --repeats 3
    python bench/throughput.py --model RUN/export/model.onnx --run RUN   # reuse an export
    python bench/throughput.py --run RUN --compare-src ../main/src       # the sorter before a change, too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SORTER_BATCH = 32  # sort's default batch size
ORT_BATCH = 32
ONE_AT_A_TIME = 128  # images for the one-at-a-time latency loop
STAGES = ("decode", "preprocessing", "inference", "logging", "filing")
TARGET_BOUND_FRACTION = 0.90
TARGET_BOUND_GAIN = 3.0
TARGET_CHOICE_GAIN_MATRIX = 3.0  # auto vs onnxruntime fp32, batched, on a CPU with AMX or AVX512-BF16
TARGET_CHOICE_GAIN_PLAIN = 1.5  # on one with neither


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

def measure_end_to_end(onnx: Path, files: list[Path], root: Path, runtime: str = "auto",
                       precision: str = "auto") -> dict[str, Any]:
    from defectscope.station.sorter import sort

    inbox = fresh_inbox(files, root)
    out = Path(tempfile.mkdtemp(prefix="sorted-", dir=root))
    start = time.perf_counter()
    summary = sort(str(onnx), inbox, out, mode="copy", settle_seconds=0, progress=False,
                   runtime=runtime, precision=precision, batch_size=SORTER_BATCH)
    wall = time.perf_counter() - start
    if summary["processed"] != len(files) or summary["errors"]:
        raise RuntimeError(f"the sorter filed {summary['processed']} of {len(files)} images: {summary['errors']}")
    shutil.rmtree(inbox)
    shutil.rmtree(out)
    return {"seconds": wall, "images_per_second": len(files) / wall,
            "sorter_reported_images_per_second": summary["images_per_second"],
            "per_decision": summary["per_decision"], "runtime": summary["runtime"]}


def commit_times(db: Path) -> list[float]:
    """The time of every row of a sorter's SQLite log (each row's last write: its fsynced done), sorted."""
    import sqlite3
    from datetime import datetime

    with closing(sqlite3.connect(db)) as conn:
        return sorted(datetime.fromisoformat(t).timestamp() for (t,) in conn.execute("SELECT time FROM decisions"))


def measure_steady(onnx: Path, files: list[Path], root: Path, runtime: str = "auto",
                   precision: str = "auto") -> dict[str, Any]:
    """The line's rate once it runs: the model loaded beforehand (timed apart), one ``sort()`` call over the
    inbox, the rate from the log's own row times between the first batch's fsynced rows and the last ones
    (start-up, the first batch's decode and the pipeline filling up excluded; the last batches' filing
    included). Also the share of the call's wall time the runtime was busy: near 1, inference bounds the line."""
    from defectscope.runtime.predictor import Predictor
    from defectscope.station.sorter import sort

    inbox = fresh_inbox(files, root)
    out = Path(tempfile.mkdtemp(prefix="sorted-", dir=root))
    started = time.perf_counter()
    predictor = Predictor(onnx, runtime=runtime, precision=precision)
    load = time.perf_counter() - started
    busy = [0.0]
    run = predictor.engine.run

    def timed_run(*args: Any, **kwargs: Any) -> Any:  # the bench's own stopwatch around the runtime call
        t = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - t

    predictor.engine.run = timed_run
    wall_start, start = time.time(), time.perf_counter()
    summary = sort(predictor, inbox, out, mode="copy", settle_seconds=0, progress=False, batch_size=SORTER_BATCH)
    wall = time.perf_counter() - start
    if summary["processed"] != len(files) or summary["errors"]:
        raise RuntimeError(f"the sorter filed {summary['processed']} of {len(files)} images: {summary['errors']}")
    times = commit_times(out / "results.db")
    first = times[min(SORTER_BATCH, len(times)) - 1]
    later = sum(1 for t in times if t > first)
    shutil.rmtree(inbox)
    shutil.rmtree(out)
    return {"images_per_second": later / (times[-1] - first) if later else float("nan"),
            "rows_after_first_batch": later, "seconds_first_to_last_batch": times[-1] - first,
            "call_images_per_second": len(files) / wall, "call_seconds": wall, "model_load_seconds": load,
            "first_row_after_seconds": times[0] - wall_start, "runtime_busy_fraction": busy[0] / wall,
            "runtime": summary["runtime"]}


def measure_steady_elsewhere(src: Path, onnx: Path, files: list[Path], root: Path) -> dict[str, Any]:
    """:func:`measure_steady` with the sorter of another source tree (e.g. main before a change), in a child
    process: the same images, in the same repeat."""
    listing = root / "files.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, "--steady-child", str(onnx), str(listing), str(root)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the sorter of {src} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_components(onnx: Path, files: list[Path], root: Path) -> dict[str, float]:
    """Seconds per image of each stage, alone and one after the other, with the sorter's own pieces."""
    from defectscope.data.images import decode_gray, resize_gray
    from defectscope.runtime.predictor import Predictor
    from defectscope.station.filing import DirSync, place_file
    from defectscope.station.store import Store

    # The sorter's configuration: the auto runtime, threads and decode threads by default.
    predictor = Predictor(onnx, runtime="auto", precision="auto")
    size, mode, n = predictor.image_size, predictor.resize, len(files)
    data = [f.read_bytes() for f in files]  # the sorter decodes the bytes it read and hashed

    start = time.perf_counter()
    decoded = [decode_gray(d) for d in data]
    decode = time.perf_counter() - start

    start = time.perf_counter()
    inputs = [(resize_gray(g, size, mode).astype(np.float32) / np.float32(255))[None] for g in decoded]
    preprocess = time.perf_counter() - start

    x = np.stack(inputs)
    predictor.engine.run(x[:SORTER_BATCH])  # warm-up
    start = time.perf_counter()
    probs = np.concatenate([predictor.engine.run(x[i:i + SORTER_BATCH])[0] for i in range(0, n, SORTER_BATCH)])
    inference = time.perf_counter() - start

    # What the sorter writes per batch: the batch looked up twice (reading, then filing), its pending rows in
    # one commit, their outcome in another.
    db_dir = Path(tempfile.mkdtemp(prefix="log-", dir=root))
    records = [{
        "file_name": f.name, "source_path": str(f), "content_sha256": f"{i:064x}", "size_bytes": len(d),
        "decision": predictor.classes[int(p.argmax())], "top_class": predictor.classes[int(p.argmax())],
        "confidence": float(p.max()), "probabilities": dict(zip(predictor.classes, map(float, p), strict=True)),
        "drift_score": None, "model_id": "0" * 16, "model_version": "bench", "destination": str(db_dir / f.name),
        "error": None,
    } for i, (f, d, p) in enumerate(zip(files, data, probs, strict=True))]
    with Store(db_dir / "results.db") as db:
        start = time.perf_counter()
        for i in range(0, n, SORTER_BATCH):
            batch = records[i:i + SORTER_BATCH]
            keys = [(r["content_sha256"], r["file_name"]) for r in batch]
            db.find_many(keys)
            db.find_many(keys)
            db.settle_many(db.begin_many([(r, None) for r in batch]))
        logging = time.perf_counter() - start
    shutil.rmtree(db_dir)

    # Filing, what else the sorter does per image: read and hash the file, copy it (fsynced, verified) into place;
    # per batch: each folder fsynced once.
    out = Path(tempfile.mkdtemp(prefix="filed-", dir=root))
    start = time.perf_counter()
    later = DirSync()
    for i, f in enumerate(files):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        place_file(f, out / f"{i:05d}_{f.name}", "copy", sha, out / f".part-{i}", later)
        if (i + 1) % SORTER_BATCH == 0 or i + 1 == n:
            later.finish()
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


def measure_batched(engine: Any, x: np.ndarray) -> float:
    """Images/s of one engine on preloaded inputs in batches of 32, nothing else running."""
    engine.run(x[:ORT_BATCH])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), ORT_BATCH):
        engine.run(x[i:i + ORT_BATCH])
    return len(x) / (time.perf_counter() - start)


def measure_one_at_a_time(predictor: Any, files: list[Path]) -> dict[str, float]:
    """``predict(path)`` one PNG after the other: images/s and per-image latency percentiles."""
    predictor.predict(files[0])  # warm-up
    times = []
    for f in files:
        start = time.perf_counter()
        predictor.predict(f)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {"images_per_second": len(files) / float(np.sum(times)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


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


def machine_details() -> dict[str, Any]:
    """CPU model and its vector/matrix flags, OpenVINO's view of the CPU, library versions."""
    import platform

    from defectscope.runtime import choice as selection
    from defectscope.runtime import engines as runtimes

    info = selection.machine()
    return {
        **info,
        "all_flags_of_interest": sorted(f for f in runtimes.cpu_flags()
                                        if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))),
        "openvino_cpu_capabilities": runtimes.openvino_capabilities("CPU"),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def steady_child() -> None:
    """``--steady-child ONNX FILES_JSON ROOT``: :func:`measure_steady` run by :func:`measure_steady_elsewhere`."""
    onnx, listing, root = sys.argv[2:5]
    files = [Path(f) for f in json.loads(Path(listing).read_text())]
    print(json.dumps(measure_steady(Path(onnx), files, Path(root))), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--steady-child"]:
        steady_child()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory (default: the default recipe's run in results/elpv.json)")
    parser.add_argument("--model", help="an export of the run to reuse (default: export the run to a temp folder)")
    parser.add_argument("--images", type=int, default=512, help="ELPV images per runtime measurement (512)")
    parser.add_argument("--sorter-images", type=int, default=960,
                        help="ELPV images per sorter run (960: a steady state of about 30 batches)")
    parser.add_argument("--compare-src", help="also measure the sorter of this source tree (its src/ folder, e.g. "
                        "main's before a change) in the same repeats")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="cores for the plain loop, the decode pool and the runtimes (2)")
    parser.add_argument("--results", default=str(HERE / "results" / "throughput.json"))
    parser.add_argument("--workdir", help="where the inbox, output and log go (default: the system temp folder)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: plain_loop, components "
                        "(on a machine shared with other jobs eager PyTorch crawls)")
    args = parser.parse_args()
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if min(args.images, args.sorter_images, args.repeats, args.threads) < 1:
        sys.exit("--images, --sorter-images, --repeats and --threads must be >= 1")

    from PIL import Image

    from defectscope.data.images import load_gray
    from defectscope.onnx_export.exporter import export
    from defectscope.rundir import Run
    from defectscope.runtime import choice as selection
    from defectscope.runtime.predictor import Predictor

    run = Path(args.run) if args.run else default_run()
    spec = Run(run).spec
    size, mode = int(spec["image_size"]), spec.get("resize", "squash")
    files = elpv_files(args.images)
    sorter_files = elpv_files(args.sorter_images)
    with Image.open(files[0]) as im:
        image_format = f"{im.width}x{im.height} {im.format} mode {im.mode}"

    with tempfile.TemporaryDirectory(prefix="defectscope-throughput-", dir=args.workdir) as tmp:
        root = Path(tmp)
        workdir_fs = filesystem_of(root)
        onnx = root / "model.onnx"
        if args.model:
            src = Path(args.model)
            for f in src.parent.glob(src.stem + ".*"):  # the graph, its int8 and stage files, check set, card
                if f.name != src.stem + ".runtime.json":
                    shutil.copy(f, root / ("model" + f.name[len(src.stem):]))
        else:
            export(run, onnx, select=False)
        # The selection the sorter's auto uses, measured here with the bench's thread count (its accuracy,
        # agreement and Drift AUROC columns come from this call, on the run's test split).
        started = time.perf_counter()
        auto = Predictor(onnx, runtime="auto", precision="auto", threads=args.threads)
        first_start = {"seconds": round(time.perf_counter() - started, 1), **auto.selection.get("first_start", {})}
        # Every candidate tested (not only until the first passes), for the table.
        record = selection.select(onnx, threads=args.threads, check_all=True)
        auto_key = auto.selection["chosen"]["key"]
        sorter_config = {"batch_size": SORTER_BATCH, "decode_threads": auto.decode_threads, "runtime": "auto",
                         "precision": "auto", "choice": auto_key, "why": auto.selection["why"],
                         "threads": args.threads}
        del auto
        x = np.stack([(load_gray(f, size, mode).astype(np.float32) / np.float32(255))[None] for f in files])

        predictors: dict[str, Any] = {}
        batch_engines: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        stage_cache: dict = {}
        keys = list(record["candidates"])
        for key in keys:
            row = record["candidates"][key]
            if "images_per_second" not in row:
                unavailable[key] = row.get("refused", "unavailable")
                continue
            batch_engines[key] = selection.engine_for(onnx, row, threads=args.threads, cache=stage_cache)
            if row["layout"] == "full":
                predictors[key] = Predictor(onnx, runtime=row["runtime"], precision=row["precision"],
                                            threads=args.threads)

        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("end_to_end", "steady", "steady_ort_fp32",
                                                                  "steady_compare", "components",
                                                                  "plain_loop", "decode", "batched", "one",
                                                                  "loadavg")}
        for r in range(args.repeats):
            # The bound's pieces first, right beside the sorter runs they are compared with (the load drifts).
            rows["decode"].append(measure_decode(files, size, mode, args.threads))
            rows["batched"].append({k: measure_batched(batch_engines[k], x)  # the chosen one last: nearest the sorter
                                    for k in sorted(batch_engines, key=lambda k: k == auto_key)})
            rows["steady"].append(measure_steady(onnx, sorter_files, root, "auto", "auto"))
            if args.compare_src:
                rows["steady_compare"].append(measure_steady_elsewhere(Path(args.compare_src), onnx, sorter_files,
                                                                       root))
            rows["end_to_end"].append(measure_end_to_end(onnx, sorter_files, root, "auto", "auto"))
            rows["steady_ort_fp32"].append(measure_steady(onnx, sorter_files, root, "onnxruntime", "fp32"))
            if "components" not in skip:
                rows["components"].append(measure_components(onnx, files, root))
            if "plain_loop" not in skip:
                rows["plain_loop"].append(measure_plain_loop(run, files, args.threads))
            rows["loadavg"].append(list(os.getloadavg()))
            rows["one"].append({k: measure_one_at_a_time(p, files[:ONE_AT_A_TIME]) for k, p in predictors.items()})
            print(f"repeat {r + 1}/{args.repeats}: sorter steady {rows['steady'][-1]['images_per_second']:.1f}/s "
                  f"(one cold call {rows['end_to_end'][-1]['images_per_second']:.1f}/s"
                  + (f", compared tree {rows['steady_compare'][-1]['images_per_second']:.1f}/s"
                     if rows["steady_compare"] else "")
                  + f", {sorter_config['runtime']} {sorter_config['precision']}), onnxruntime fp32 "
                  f"{rows['steady_ort_fp32'][-1]['images_per_second']:.1f}/s, plain loop "
                  f"{(rows['plain_loop'] or [{'images_per_second': float('nan')}])[-1]['images_per_second']:.1f}/s, "
                  "decode "
                  f"{rows['decode'][-1]['images_per_second']:.1f}/s, batched "
                  + ", ".join(f"{k} {v:.0f}" for k, v in rows["batched"][-1].items()), flush=True)

    decode = median(rows["decode"], "images_per_second")
    plain = median(rows["plain_loop"], "images_per_second") if rows["plain_loop"] else float("nan")
    per_runtime: dict[str, Any] = {}
    for key in keys:
        if key in unavailable:
            per_runtime[key] = {"available": False, "reason": unavailable[key]}
            continue
        batched = statistics.median(r[key] for r in rows["batched"])
        one = ({m: statistics.median(r[key][m] for r in rows["one"]) for m in ("images_per_second", "p50_ms", "p99_ms")}
               if key in predictors else {"images_per_second": float("nan"), "p50_ms": None, "p99_ms": None})
        checked = record["candidates"].get(key, {})
        per_runtime[key] = {
            "available": True,
            "batched_images_per_second": round(batched, 2),
            "one_at_a_time_images_per_second": round(one["images_per_second"], 2),
            "one_image_latency_ms": {"p50": one["p50_ms"] and round(one["p50_ms"], 2),
                                     "p99": one["p99_ms"] and round(one["p99_ms"], 2)},
            "layout": checked.get("layout"), "views": checked.get("views"),
            "bound_images_per_second": round(1 / (1 / decode + 1 / batched), 2),
            **{k: checked.get(k) for k in ("accuracy", "accuracy_change", "decision_agreement", "decisions_changed",
                                           "drift_auroc", "drift_auroc_change", "accepted", "refused",
                                           "automation", "automation_fp32", "caps")},
            "differing": {k: (checked.get("differing") or {}).get(k) for k in ("count", "far", "farthest")},
        }
    fp32 = per_runtime["onnxruntime_fp32"]
    for row in per_runtime.values():
        if row["available"]:
            row["batched_vs_onnxruntime_fp32"] = round(row["batched_images_per_second"]
                                                       / fp32["batched_images_per_second"], 3)

    chosen = sorter_config["choice"]
    matrix = selection.machine()["matrix"]
    gain_target = TARGET_CHOICE_GAIN_MATRIX if matrix["amx"] or matrix["avx512_bf16"] else TARGET_CHOICE_GAIN_PLAIN
    e2e = median(rows["steady"], "images_per_second")
    chosen_key = sorter_config["choice"]

    def per_repeat_fraction(kind: str) -> list[float]:
        """The sorter's rate over the bound measured in the same repeat, just before it."""
        return [round(r["images_per_second"] * (1 / d["images_per_second"] + 1 / b[chosen_key]), 3)
                for r, d, b in zip(rows[kind], rows["decode"], rows["batched"], strict=True)]

    fractions = per_repeat_fraction("steady")
    fractions_compare = per_repeat_fraction("steady_compare") if rows["steady_compare"] else []
    cold = median(rows["end_to_end"], "images_per_second")
    e2e_old = median(rows["steady_ort_fp32"], "images_per_second")
    steady = {k: round(median(rows["steady"], k), 3) for k in rows["steady"][0] if k != "runtime"}
    commit = (subprocess.run(["git", "-C", args.compare_src, "rev-parse", "HEAD"], capture_output=True,
                             text=True).stdout.strip() if args.compare_src else None)
    compare = ({"src": str(Path(args.compare_src).resolve()), "commit": commit,
                **{k: round(median(rows["steady_compare"], k), 3) for k in rows["steady_compare"][0]
                   if k != "runtime"}} if rows["steady_compare"] else None)
    bound_new = per_runtime[chosen]["bound_images_per_second"]
    bound_old = fp32["bound_images_per_second"]
    stages = {k: median(rows["components"], k) if rows["components"] else float("nan") for k in STAGES}
    total = sum(stages.values())
    # The target is checked on the median over repeats of (sorter / the bound measured just before it): the load
    # drifts between repeats, a ratio of medians taken minutes apart would mix two machines.
    fraction, fraction_old, gain = statistics.median(fractions), e2e_old / bound_old, bound_new / bound_old

    results = {
        "benchmark": "line throughput per runtime and precision: PNG files on disk -> decision -> fsynced log row",
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
        "runtimes": per_runtime,
        "selection": {"chosen": chosen, "rules": record["rules"],
                      "reference_images": record["candidates"]["onnxruntime_fp32"].get("images"),
                      "drift_images": record["candidates"]["onnxruntime_fp32"].get("drift_images")},
        "end_to_end": {
            "what": f"the sorter's steady state on {args.sorter_images} images: sort(predictor, mode='copy', "
                    "settle_seconds=0) with the model loaded beforehand; rate = rows fsynced after the first "
                    "batch's / time from the first batch's rows to the last ones (the log's own row times)",
            "target_checked_on": "steady_state",
            "why": "a line runs for hours on a model loaded once: the rate it keeps is what the bound is compared "
                   "with; one cold call (model load and first batch included) is reported beside it",
            "images": args.sorter_images,
            "images_per_second": round(e2e, 2),
            "steady_state": steady,
            "cold_call": {"what": "sort(onnx file, mode='copy', settle_seconds=0): wall time of the call, the "
                                  "model's loading (OpenVINO compile) included",
                          "images_per_second": round(cold, 2),
                          "seconds": round(median(rows["end_to_end"], "seconds"), 2),
                          "fraction_of_bound": round(cold / bound_new, 3)},
            "fraction_of_bound_per_repeat": fractions,
            "fraction_of_bound_median_of_repeats": statistics.median(fractions),
            "compared_tree": compare and {**compare, "fraction_of_bound": round(compare["images_per_second"]
                                                                                / bound_new, 3),
                                          "fraction_of_bound_per_repeat": fractions_compare,
                                          "fraction_of_bound_median_of_repeats": statistics.median(fractions_compare),
                                          "new_over_compared_per_repeat": [
                                              round(a["images_per_second"] / b["images_per_second"], 3)
                                              for a, b in zip(rows["steady"], rows["steady_compare"], strict=True)]},
            "sorter": sorter_config,
            "bound_images_per_second": bound_new,
            "fraction_of_bound": round(fraction, 3),
            "fraction_of_bound_what": "median over repeats of the steady rate / the bound measured just before it in "
                                      "the same repeat (what the target is checked on); ratio of the medians: "
                                      f"{e2e / bound_new:.3f}",
            "onnxruntime_fp32": {"what": "the same steady state with runtime onnxruntime fp32 (the old default)",
                                 "images_per_second": round(e2e_old, 2), "bound_images_per_second": bound_old,
                                 "fraction_of_bound": round(fraction_old, 3)},
            "speedup_vs_onnxruntime_fp32": round(e2e / e2e_old, 3),
        },
        "components": {
            "what": "each stage alone on the same files, sequentially: decode_gray(bytes), resize_gray + /255, "
                    f"the chosen runtime in batches of {SORTER_BATCH}; logging per batch of {SORTER_BATCH}: "
                    "find_many x2 + begin_many + settle_many (SQLite, WAL, synchronous=FULL, one commit each); "
                    "filing: read + SHA-256 + place_file copy (fsync, verify), each folder fsynced once per batch. "
                    "In the sorter logging and filing run in the filing thread while the next batch is inferred, "
                    "decoding in the decode thread: the shares are of the work, not of the wall time",
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
            "what": f"decode: load_gray in a {args.threads}-thread pool; inference: the runtime alone, "
                    f"{args.threads} threads, batch {ORT_BATCH}, preloaded arrays; "
                    "bound = 1 / (1/decode + 1/inference)",
            "decode_images_per_second": round(decode, 2),
            "new": {"runtime": chosen, "images_per_second": bound_new},
            "old": {"runtime": "onnxruntime_fp32", "images_per_second": bound_old},
            "new_over_old": round(gain, 3),
        },
        "bounded_by": {
            "runtime_busy_fraction": steady["runtime_busy_fraction"],
            "what": "share of the sort() call's wall time spent inside the runtime's run (bench stopwatch): the "
                    "rest is start-up, the first batch's decode, the main thread's reading, hashing and look-ups, "
                    "and the last batches' filing",
        },
        "speedup_vs_plain_loop": round(e2e / plain, 3),
        "fraction_of_bound": round(fraction, 3),
        "auto_choice": {
            "key": chosen, "why": sorter_config["why"], "first_start": first_start,
            "batched_vs_onnxruntime_fp32": per_runtime[chosen].get("batched_vs_onnxruntime_fp32"),
            "accuracy_change": per_runtime[chosen].get("accuracy_change"), "caps": per_runtime[chosen].get("caps"),
        },
        "load": {"loadavg_per_repeat": rows["loadavg"], "note": "the load average per repeat is what the machine "
                 "carried (the bench's own 2 threads count about 2); candidates are interleaved within each repeat "
                 "and medians compared"},
        "targets": {
            f"auto >= {gain_target:g}x onnxruntime fp32 batched": (per_runtime[chosen].get(
                "batched_vs_onnxruntime_fp32") or 0) >= gain_target,
            "auto accuracy within 0.5 points": abs(per_runtime[chosen].get("accuracy_change") or 0) <= 0.005
            or (per_runtime[chosen].get("accuracy_change") or 0) > 0,
            "auto holds both caps on the check set": all(c["held"] for c in (per_runtime[chosen].get("caps")
                                                                             or {}).values()),
            f"fraction_of_bound >= {TARGET_BOUND_FRACTION:g}": fraction >= TARGET_BOUND_FRACTION,
            f"new bound >= {TARGET_BOUND_GAIN:g}x old": gain >= TARGET_BOUND_GAIN,
        },
        "per_repeat": rows,
        "selection_record": record,
        "machine": machine_details(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    def line(r: dict[str, Any]) -> str:
        if not r["available"]:
            return f"unavailable: {r['reason']}"
        latency = r["one_image_latency_ms"]
        return (f"batched {r['batched_images_per_second']:7.1f}/s ({r['batched_vs_onnxruntime_fp32']:.2f}x)  "
                f"one-by-one {r['one_at_a_time_images_per_second']:6.1f}/s  p50 {latency['p50']} "
                f"p99 {latency['p99']} ms  automation {r['automation']}  agreement {r['decision_agreement']}  "
                f"acc change {r['accuracy_change']}  drift AUROC change {r['drift_auroc_change']}"
                + ("" if r["accepted"] else f"  REFUSED: {r['refused']}"))

    table = "\n".join(f"  {k:32s} {line(r)}" for k, r in per_runtime.items())
    print(f"{table}\nend-to-end {e2e:.1f} img/s with {chosen} = {fraction:.0%} of its bound {bound_new:.1f} "
          f"(target {TARGET_BOUND_FRACTION:.0%}); onnxruntime fp32 {e2e_old:.1f} img/s = {fraction_old:.0%} of "
          f"{bound_old:.1f}; bound gain {gain:.2f}x (target {TARGET_BOUND_GAIN:g}x); plain loop {plain:.1f} img/s "
          f"| {path}")


if __name__ == "__main__":
    main()
