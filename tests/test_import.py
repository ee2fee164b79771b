"""Importing ``utils`` or ``bn_toolkit`` changes nothing in the learner's process (README, "Your
own pictures and model"): no environment variable (so no C++ log level), thread pool, Python log
level, fd 2, determinism or seed. ``bn_toolkit`` stands alone: Keras, NumPy, TensorFlow and the
standard library only, never ``utils``."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
import random, numpy
random_state = [numpy.random.get_state()[1][:4].tolist(), list(random.getstate()[1][:4])]
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
__import__(sys.argv[2])
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
    "determinism": __import__(
        "tensorflow.python.framework.config", fromlist=["x"]
    ).is_op_determinism_enabled(),
    "seeded": [numpy.random.get_state()[1][:4].tolist(),
               list(random.getstate()[1][:4])] != random_state,
    "new_modules": sorted({m.split(".")[0] for m in set(sys.modules) - before}),
}))
"""


@pytest.mark.parametrize("module", ["utils", "bn_toolkit"])
def test_import_after_tensorflow_changes_nothing(module):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), module],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["env"] == {}, f"import {module} set or changed environment variables"
    assert seen["pools"] == [0, 0], f"import {module} fixed TensorFlow's thread pools"
    assert seen["log_level_same"], f"import {module} changed TensorFlow's Python log level"
    assert seen["fd2_same"] and seen["fd_calls"] == [], f"import {module} touched fd 2"
    assert seen["determinism"] is False, f"import {module} switched op determinism on"
    assert seen["seeded"] is False, f"import {module} seeded NumPy's global generator"
    if module == "bn_toolkit":  # stands alone (TensorFlow itself loads Pillow and IPython)
        assert "utils" not in seen["new_modules"], "import bn_toolkit imported utils"


def test_bn_toolkit_imports_only_keras_numpy_tensorflow_and_the_standard_library():
    """Every import statement of bn_toolkit.py, at any depth; IPython only inside a function, to
    show a table where it is installed (bn_toolkit works without it)."""
    tree = ast.parse((ROOT / "bn_toolkit.py").read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | {"__future__", "keras", "numpy", "tensorflow"}
    top_level = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in (n.split(".")[0] for n in names):  # name -> imported at module level
            found[name] = found.get(name, False) or id(node) in top_level
    assert {"keras", "numpy", "tensorflow"} <= set(found)
    others = {name for name in found if name not in allowed}
    assert others <= {"IPython"} and not found.get("IPython"), f"bn_toolkit imports {others}"


SETUP_AFTER_AN_OPERATION = r"""
import sys
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
import utils
tf.constant(1.0) + 1.0  # TensorFlow starts, with the pools the environment names
utils.setup()
"""


def test_setup_accepts_pools_the_environment_already_fixed():
    """The opt-out of docs/decisions.md: pools set by environment variables before TensorFlow
    started, and an operation run before ``utils.setup()``; setup finds them and says their
    sizes."""
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    for sizes in ("2", "1"):
        done = subprocess.run(
            [sys.executable, "-c", SETUP_AFTER_AN_OPERATION, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(env, TF_NUM_INTRAOP_THREADS=sizes, TF_NUM_INTEROP_THREADS=sizes),
        )
        assert done.returncode == 0, done.stderr
        assert f"{sizes}+{sizes} threads" in done.stdout, done.stdout


def test_the_toolkit_s_tests_need_no_utils():
    """tests/test_toolkit.py tests bn_toolkit.py alone, as a learner who copied it would."""
    tree = ast.parse((ROOT / "tests" / "test_toolkit.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "bn_toolkit" in imported and "utils" not in imported, imported
