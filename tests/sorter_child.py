"""Run the sorter in a child process for tests/test_sorter.py's kill -9 test (not a test module itself).

Usage: python sorter_child.py MODEL INBOX OUT [SLOW_SECONDS [watch]] [--log URL] [--kill-at METHOD:N]. Prints "ready"
once the model is
loaded, so the parent's random kill delay counts from the start of the real work. SLOW_SECONDS (default 0)
pauses before and after every file placement, spreading the work so kills land at many different steps.
With "watch" it runs in watch mode and prints the sorter's log lines (the SIGTERM test reads them).
``--kill-at settle_many:2`` makes the process SIGKILL itself when the store's ``settle_many`` is called the 2nd time
(before it writes anything): a real kill -9 at a chosen step (``begin_many``: a batch inferred, its rows not
written; ``settle_many``: its files placed and fsynced, its outcome not committed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from defectscope.runtime.predictor import Predictor
from defectscope.station import sorter
from defectscope.station.store import Store


def kill_at(spec: str) -> None:
    name, nth = spec.split(":")
    real, calls = getattr(Store, name), [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            print("killed", name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    setattr(Store, name, step)


def main() -> None:
    args = sys.argv[1:]
    log_path = None
    if "--log" in args:  # a store URL (tests/test_sorter_workers.py: a real PostgreSQL)
        i = args.index("--log")
        log_path = args[i + 1]
        del args[i:i + 2]
    if "--kill-at" in args:
        i = args.index("--kill-at")
        kill_at(args[i + 1])
        del args[i:i + 2]
    model, inbox, out = args[:3]
    slow = float(args[3]) if len(args) > 3 else 0.0
    watch = args[4:5] == ["watch"]
    if slow:
        place = sorter.place_file

        def slow_place(*args, **kwargs):
            time.sleep(slow)
            place(*args, **kwargs)
            time.sleep(slow)

        sorter.place_file = slow_place
    predictor = Predictor(model, threads=1, decode_threads=1)
    print("ready", flush=True)
    if watch:  # the parent reads the sorter's messages on stdout
        handler = logging.StreamHandler(sys.stdout)
        logging.getLogger("defectscope").addHandler(handler)
        logging.getLogger("defectscope").setLevel(logging.INFO)
    summary = sorter.sort(predictor, inbox, out, settle_seconds=0, batch_size=4, progress=False,
                          watch=watch, poll_interval=0.1, log_path=log_path)
    print("done", summary["processed"], flush=True)


if __name__ == "__main__":
    main()
