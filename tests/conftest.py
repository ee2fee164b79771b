"""Pytest set-up shared by the tests: the notebooks' process settings, a headless plot backend and
``import utils``."""

import os
import sys
from pathlib import Path

# The test process runs as the notebooks do (their setup cell and utils.setup()): TensorFlow's
# C++ logs off, oneDNN off, both thread pools at utils.THREADS = 2, fixed before any test starts
# TensorFlow, so a test that calls utils.setup() after another test ran an operation still can.
for name, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TF_ENABLE_ONEDNN_OPTS", "0"),
                    ("TF_NUM_INTRAOP_THREADS", "2"), ("TF_NUM_INTEROP_THREADS", "2")):
    os.environ.setdefault(name, value)

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: plots must not need a display

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
