"""A learner on Binder runs the notebooks in order, leaving each kernel open: no kernel dies.

Runs ``tests/binder_session.py --keep-previous`` on every notebook, in order: one CPU and 2 GB of
memory for the whole session, each notebook's kernel left alive while the next one runs. Needs
root and a memory cgroup; where the machine cannot make one, the test says so and skips. The
figures are printed (``pytest -s``) and kept in ``output/binder_session.json``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BINDER_MB = 2048


@pytest.mark.skipif(os.geteuid() != 0, reason="a memory cgroup needs root")
def test_notebooks_in_order_with_kernels_left_open_fit_in_binder():
    # Binder sets no TensorFlow variable: each notebook's setup cell chooses oneDNN's setting, even
    # when the test command runs as on another kind of CPU (TF_ENABLE_ONEDNN_OPTS=1).
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "binder_session.py"),
            "--keep-previous",
            "--memory-mb",
            str(BINDER_MB),
            *map(str, NOTEBOOKS),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(result.stdout)
    if result.returncode == 2:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads((ROOT / "output" / "binder_session.json").read_text())
    assert [row["notebook"] for row in report["notebooks"]] == [p.name for p in NOTEBOOKS]
    assert all(row["error"] is None and row["peak_mb"] < BINDER_MB for row in report["notebooks"])
