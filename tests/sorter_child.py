"""Run the sorter in a child process for tests/test_sorter.py's kill -9 test (not a test module itself).

Usage: python sorter_child.py MODEL INBOX OUT [SLOW_SECONDS [watch]]. Prints "ready" once the model is
loaded, so the parent's random kill delay counts from the start of the real work. SLOW_SECONDS (default 0)
pauses before and after every file placement, spreading the work so kills land at many different steps.
With "watch" it runs in watch mode and prints the sorter's log lines (the SIGTERM test reads them).
"""

from __future__ import annotations

import logging
import sys
import time

from defectscope.runtime.predictor import Predictor
from defectscope.station import sorter


def main() -> None:
    model, inbox, out = sys.argv[1:4]
    slow = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    watch = sys.argv[5:6] == ["watch"]
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
                          watch=watch, poll_interval=0.1)
    print("done", summary["processed"], flush=True)


if __name__ == "__main__":
    main()
