"""Pytest set-up shared by the tests: the notebooks' process settings, a headless plot backend and
``import utils``."""

import os
import sys
from pathlib import Path

import matplotlib

# The test process runs as the notebooks do (their setup cell and utils.setup()): TensorFlow's
# C++ logs off and oneDNN off before TensorFlow starts.
for name, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TF_ENABLE_ONEDNN_OPTS", "0")):
    os.environ.setdefault(name, value)

matplotlib.use("Agg")  # before anything imports pyplot: plots must not need a display

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Both thread pools at utils.THREADS before any test runs a TensorFlow operation, so that a test
# calling utils.setup() after other tests have run operations finds the pools it would set.
import tensorflow as tf  # noqa: E402

import utils  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(utils.THREADS)
tf.config.threading.set_inter_op_parallelism_threads(utils.THREADS)
