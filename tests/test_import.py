"""Importing ``utils`` changes nothing in the learner's process (README, "Your own model"): no
environment variable (so no C++ log level), thread pool, Python log level, fd 2 or determinism."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, sys
import tensorflow as tf
calls = []
real_dup2, real_dup = os.dup2, os.dup
os.dup2 = lambda *a, **k: (calls.append("dup2"), real_dup2(*a, **k))[1]
os.dup = lambda *a, **k: (calls.append("dup"), real_dup(*a, **k))[1]
env, fd2 = dict(os.environ), os.fstat(2)
log_level = tf.get_logger().level
sys.path.insert(0, sys.argv[1])
import utils
os.dup2, os.dup = real_dup2, real_dup
after = os.fstat(2)
print(json.dumps({
    "env": {k: [env.get(k), os.environ.get(k)] for k in set(env) | set(os.environ)
            if env.get(k) != os.environ.get(k)},
    "pools": [tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads()],
    "log_level_same": tf.get_logger().level == log_level,
    "fd2_same": (fd2.st_dev, fd2.st_ino) == (after.st_dev, after.st_ino),
    "fd_calls": calls,
    "determinism": __import__("tensorflow.python.framework.config", fromlist=["x"]).is_op_determinism_enabled(),
}))
"""


def test_import_after_tensorflow_changes_nothing():
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["env"] == {}, "import utils set or changed environment variables"
    assert seen["pools"] == [0, 0], "import utils fixed TensorFlow's thread pools"
    assert seen["log_level_same"], "import utils changed TensorFlow's Python log level"
    assert seen["fd2_same"] and seen["fd_calls"] == [], "import utils touched file descriptor 2"
    assert seen["determinism"] is False, "import utils switched op determinism on"


SETUP_AFTER_AN_OPERATION = r"""
import sys
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
import utils
tf.constant(1.0) + 1.0  # TensorFlow starts, with the pools the environment names
utils.setup()
"""


def test_setup_accepts_pools_the_environment_already_fixed():
    """README's opt-out: pools set by environment variables before TensorFlow started, and an
    operation run before ``utils.setup()``; setup finds them and says their sizes."""
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    for sizes in ("2", "1"):
        done = subprocess.run([sys.executable, "-c", SETUP_AFTER_AN_OPERATION, str(ROOT)],
                              capture_output=True, text=True, timeout=300,
                              env=dict(env, TF_NUM_INTRAOP_THREADS=sizes,
                                       TF_NUM_INTEROP_THREADS=sizes))
        assert done.returncode == 0, done.stderr
        assert f"{sizes}+{sizes} threads" in done.stdout, done.stdout
