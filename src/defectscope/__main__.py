"""``python -m defectscope``: the ``defectscope`` command, for launchers that start a module
(``torchrun -m defectscope train ...``) and environments without the console script on PATH."""

from __future__ import annotations

import sys

from defectscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
