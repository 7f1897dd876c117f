"""A torchrun worker for the tests: ``defectscope ARGS``, except that rank ``DS_KILL_RANK`` kills itself (SIGKILL,
no clean-up, like a lost node) just before its training batch number ``DS_KILL_STEP`` (counted from 1 over the
whole run) in the job's first attempt. torchrun's ``--max-restarts`` then starts the job again."""

from __future__ import annotations

import os
import signal
import sys

from defectscope.cli import main
from defectscope.training import loop

if (int(os.environ.get("RANK", "0")) == int(os.environ.get("DS_KILL_RANK", "-1"))
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
    kill_step = int(os.environ["DS_KILL_STEP"])
    real_augment = loop.augment_batch
    calls = [0]

    def augment_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_augment(*args, **kwargs)

    loop.augment_batch = augment_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
