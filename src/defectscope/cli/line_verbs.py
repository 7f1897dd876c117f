"""Verbs that run on the line, from an exported model and without PyTorch: ``predict``, ``sort``, ``serve``,
and the results database's ``log export`` and ``review export``."""

from __future__ import annotations

import argparse
import sys

from defectscope.cli.options import add_runtime_options, name_values


def add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="classify images with an exported model (no PyTorch needed)")
    pr.add_argument("model", help="exported .onnx file, or a run folder that has been exported")
    pr.add_argument("images", nargs="+", help="image files and/or folders, or CSV manifests (a path column and, "
                                                "for a model with metadata inputs, their columns)")
    pr.add_argument("--metadata", action="append", default=[], metavar="NAME=VALUE",
                    help="a metadata input's value for every image (repeatable), e.g. --metadata type=mono")
    pr.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    pr.add_argument("--format", choices=["table", "csv", "json", "jsonl", "parquet"],
                    help="default: a table on a terminal, JSON lines when piped; with --out, by its suffix; "
                         "with --engine ray: parquet (default) or csv")
    pr.add_argument("--out", help="write here instead of the terminal (with --engine ray: a folder, required)")
    pr.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: an archive on a Ray cluster, one Parquet/CSV file per partition, resumable "
                         "(pip install 'defectscope[ray]')")
    pr.add_argument("--address", help="with --engine ray: auto, ray://HEAD:10001 (default: a local Ray)")
    pr.add_argument("--actors", type=int, default=2, help="with --engine ray: model copies running at once")
    pr.add_argument("--partition-size", type=int, default=1000, help="with --engine ray: images per file")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--threads", type=int, help="inference threads (default: every core)")
    add_runtime_options(pr)
    pr.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from defectscope.errors import UsageError
    from defectscope.runtime.predict import default_format, predict
    from defectscope.runtime.predictor import UNREADABLE

    if args.engine == "ray":
        from defectscope.runtime.archive import archive_predict

        if not args.out:
            raise UsageError("--engine ray writes a folder of partitions: give --out DIR")
        done = archive_predict(args.model, args.images, args.out, recursive=True, fmt=args.format or "parquet",
                               address=args.address, actors=args.actors, partition_size=args.partition_size,
                               batch_size=args.batch_size, threads=args.threads or 1,
                               metadata=name_values(args.metadata))
        print(f"{done['images']} images in {done['partitions']} partitions ({done['done_before']} done before, "
              f"{done['written']} written now) in {done['out']}", file=sys.stderr)
        return 0
    if args.format == "parquet":
        raise UsageError("--format parquet is for --engine ray; the local predict writes a table, jsonl, csv or json")
    fmt = args.format or default_format(args.out, sys.stdout.isatty())
    counts = predict(args.model, args.images, recursive=args.recursive, fmt=fmt, out=args.out,
                     batch_size=args.batch_size, threads=args.threads, runtime=args.runtime,
                     precision=args.precision, device=args.device, metadata=name_values(args.metadata))
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    n = sum(counts.values())
    print(f"{n} image{'' if n == 1 else 's'}: {summary}", file=sys.stderr)
    return 1 if counts.get(UNREADABLE) else 0


def add_sort(sub: argparse._SubParsersAction) -> None:
    so = sub.add_parser("sort", help="file every image of an inbox into OUT/<decision>/ and log each decision")
    so.add_argument("model", help="exported .onnx file, or a run folder that has been exported")
    so.add_argument("--inbox", required=True, help="folder where new images arrive")
    so.add_argument("--out", required=True, help="folder that receives OUT/<decision>/ sub-folders")
    how = so.add_mutually_exclusive_group()
    how.add_argument("--move", dest="mode", action="store_const", const="move", help="move files (default)")
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy, leave the inbox as is")
    so.add_argument("--watch", action="store_true", help="keep running and file new images as they arrive")
    so.add_argument("--db", "--log", dest="db",
                    help="results database: a path (SQLite) or a URL, sqlite:///PATH or postgresql://... "
                         "(default OUT/results.db)")
    so.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged before it is taken")
    so.add_argument("--poll", type=float, default=1.0, help="seconds between inbox scans in --watch mode")
    so.add_argument("--batch-size", type=int, default=32)
    so.add_argument("--metadata-pattern", metavar="REGEX",
                    help="for a model with metadata inputs: a regular expression with named groups, searched in "
                         "each file's path under the inbox, e.g. '(?P<lib>Die\\d+)_(?P<window>\\d+)'")
    so.add_argument("--choice-seconds", type=float, default=None, metavar="S",
                    help="time budget of the first --runtime auto start on a new machine (default 60; 0: none); "
                         "past it the best candidate accepted so far is kept")
    add_runtime_options(so)
    so.set_defaults(handler=run_sort)


def run_sort(args: argparse.Namespace) -> int:
    from defectscope.runtime.engines import check_model_path
    from defectscope.runtime.predict import exported_model_of
    from defectscope.station.sorter import sort

    # A run folder sorts with its own export, as predict does; weights or an unexported run get predict's one line.
    model = check_model_path(exported_model_of(args.model))
    summary = sort(model, args.inbox, args.out, mode=args.mode or "move", log_path=args.db,
                   watch=args.watch, settle_seconds=args.settle, poll_interval=args.poll,
                   batch_size=args.batch_size, runtime=args.runtime, precision=args.precision,
                   device=args.device, metadata_pattern=args.metadata_pattern, choice_seconds=args.choice_seconds)
    return 1 if summary.get("errors") else 0


def add_log(sub: argparse._SubParsersAction) -> None:
    lg = sub.add_parser("log", help="the results database of the sorter and the station")
    lg_sub = lg.add_subparsers(dest="log_command", required=True)
    le = lg_sub.add_parser("export", help="write every decision as CSV")
    le.add_argument("db", help="results database: path or URL (e.g. OUT/results.db)")
    le.add_argument("--out", required=True, help="CSV file to write")
    le.set_defaults(handler=run_log_export)


def run_log_export(args: argparse.Namespace) -> int:
    from defectscope.station.store import export_log

    n = export_log(args.db, args.out)
    print(f"{n} rows written to {args.out}")
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the inspection station: HTTP API, results database, dashboard, review queue")
    sv.add_argument("model", help="exported .onnx file (replace the file to hot-reload a new model)")
    sv.add_argument("--db", default="station/results.db",
                    help="results database: path (SQLite) or URL, sqlite:///PATH or postgresql://... "
                         "(default station/results.db)")
    sv.add_argument("--data", help="folder for uploaded images (default: beside a SQLite database, else ./station)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need API keys)")
    sv.add_argument("--port", type=int, default=8000)
    add_runtime_options(sv)
    sv.add_argument("--key-file", help="API keys, one per line (also: DEFECTSCOPE_API_KEYS, comma-separated); "
                                       "with keys, every endpoint but /healthz and /readyz needs one")
    sv.add_argument("--read-key-file", help="read-only keys (dashboards, results, metrics), one per line "
                                            "(also: DEFECTSCOPE_READ_KEYS)")
    sv.add_argument("--open-reads", action="store_true",
                    help="with keys set, let reads (results, images, dashboard, metrics) through without a key")
    sv.add_argument("--max-connections", type=int, default=128,
                    help="open connections at most; one more is answered 503 (default 128)")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection may take to send a request's headers (default 10)")
    sv.add_argument("--body-timeout", type=float, default=60.0,
                    help="seconds a request may take to send its body, else 408 (default 60)")
    sv.add_argument("--pilot", action="store_true", help="send every decision to review too (pilot phase)")
    sv.add_argument("--escape-cap", type=float, default=0.01,
                    help="pilot: the escape rate GOOD decisions must be shown to stay under (default 0.01)")
    sv.add_argument("--max-batch", type=int, default=16, help="images per inference call at most (default 16)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long the first image of a batch waits for others (default 5 ms)")
    sv.add_argument("--queue", type=int, default=64, help="images waiting at most before 503 (default 64)")
    sv.add_argument("--max-upload-mb", type=float, default=32, help="largest image accepted (default 32 MB)")
    sv.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image in pixels (default 50 M)")
    sv.add_argument("--threads", type=int, help="inference threads (default: every core)")
    sv.add_argument("--inference-streams", type=int,
                    help="inference streams sharing the threads (default: 2 with 2 or more threads, each of one "
                         "thread; 1 = one stream on every thread)")
    sv.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                    help="HTTP parser (default auto: httptools when installed, else h11)")
    sv.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="event loop (default auto: uvloop when installed, else asyncio)")
    sv.add_argument("--replica", help="this replica's name in the rows, the dashboard and /readyz (default: host:port)")
    sv.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from defectscope.station.serve import ServeConfig, load_api_keys, serve
    from defectscope.station.serve.config import load_read_keys

    config = ServeConfig(
        model=args.model, db=args.db, data=args.data, host=args.host, port=args.port,
        api_keys=load_api_keys(args.key_file), read_keys=load_read_keys(args.read_key_file),
        open_reads=args.open_reads, max_connections=args.max_connections, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, pilot=args.pilot, escape_cap=args.escape_cap,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.queue,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels, threads=args.threads,
        runtime=args.runtime, precision=args.precision, device=args.device, replica=args.replica,
        inference_streams=args.inference_streams, http=args.http, loop=args.loop)
    serve(config)
    return 0


def add_review(sub: argparse._SubParsersAction) -> None:
    rv = sub.add_parser("review", help="the station's human reviews")
    rv_sub = rv.add_subparsers(dest="review_command", required=True)
    rve = rv_sub.add_parser("export", help="write reviewed images and their labels as a training manifest")
    rve.add_argument("db", help="results database: path or URL")
    rve.add_argument("--out", required=True, help="CSV manifest to write (filename,label,...)")
    rve.add_argument("--include-drift", action="store_true", help="keep images people labelled Drift")
    rve.add_argument("--conflicts", choices=("drop", "mark"), default="drop",
                     help="images people gave different labels: leave them out (default), or write every label "
                          "marked conflict=1 (training then refuses them until one label is chosen)")
    rve.set_defaults(handler=run_review_export)


def run_review_export(args: argparse.Namespace) -> int:
    from defectscope.station.corrections import export_report

    counts = export_report(args.db, args.out, include_drift=args.include_drift, conflicts=args.conflicts)
    print(f"{counts['rows']} reviewed images written to {args.out}")
    if counts["conflicting"]:
        what = "left out" if args.conflicts == "drop" else "written marked conflict=1"
        print(f"{counts['conflicting']} image(s) with conflicting labels: {counts['conflict_rows']} row(s) {what} "
              "(GET /v1/review/conflicts lists them)")
    return 0
