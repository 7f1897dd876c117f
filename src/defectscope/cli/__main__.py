"""``python -m defectscope.cli``: the ``defectscope`` command (the tests and benches start it this way)."""

from __future__ import annotations

import sys

from defectscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
