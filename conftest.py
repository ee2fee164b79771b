"""pytest's set-up for the whole repository: nbval compares the notebooks' outputs strictly where
this machine's arithmetic reproduces the recording's (``tests/nbval_cpu.py``, docs/testing.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

pytest_plugins = ["nbval_cpu"]
