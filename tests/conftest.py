"""Pytest set-up shared by the tests: a headless plot backend and ``import utils``."""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: plots must not need a display

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
