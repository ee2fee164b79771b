"""Record the notebooks' stored outputs on this machine, and the digests that say which arithmetic.

Runs every notebook top to bottom in a fresh kernel, as Restart & Run All does (02 before 03-05,
which read its saved training; the retraining deep dive before 05, which shows its rows; the other
deep dives last), writes each back with its outputs, copies the
rows the retraining deep dive measured beside it for notebook 05, and stores this machine's digests
in ``tests/recording.json`` (``tests/arithmetic.py``). From then on, this kind of CPU is the one
on which nbval compares every cell. Run it on 2 cores, from the repository root::

    python tests/record.py                     # every notebook
    python tests/record.py notebooks/03_*.ipynb  # some, where the digests match the recording's

The process settings on which the outputs depend are fixed as the test command fixes them
(tests/run.sh): the shipped pictures, TensorFlow's C++ logs off, oneDNN's custom operations off,
TensorFlow's pools left to ``utils.setup()``. Run it on 2 cores (``taskset -c 0,1`` on a larger
machine), as the first screens' costs and the test command's first run are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
ROWS = "retraining_remedies.json"
RECORDING = ROOT / "tests" / "recording.json"
# 02 saves the case that 03-05 and the deep dives read; the retraining deep dive measures the rows
# 05 shows, so it runs before 05.
_MAIN = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
_DEEP = sorted((ROOT / "notebooks" / "deep_dives").glob("*.ipynb"))
_ROWS_NOTEBOOK = ROOT / "notebooks" / "deep_dives" / ROWS.replace(".json", ".ipynb")
_BEFORE_ROWS = [p for p in _MAIN if p.name < "05"]
ORDER = [
    *_BEFORE_ROWS,
    _ROWS_NOTEBOOK,
    *[p for p in _MAIN if p not in _BEFORE_ROWS],
    *[p for p in _DEEP if p != _ROWS_NOTEBOOK],
]


def record(path: Path) -> float:
    """Execute one notebook in a fresh kernel and write it back with its outputs; its seconds."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=3600,
        kernel_name="python3",
        resources={"metadata": {"path": path.parent}},
    ).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all, in order")
    args = parser.parse_args()
    os.environ.update(TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "BN_SERIES_DATA"):
        os.environ.pop(name, None)
    chosen = {p.resolve() for p in args.notebooks} or set(ORDER)
    if args.notebooks:  # some notebooks only: they must join a recording of this arithmetic
        found = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "arithmetic.py")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()[-1]
        if json.loads(found) != json.loads(RECORDING.read_text())["fingerprints"]:
            print(
                "this machine computes the trainings to other bits than tests/recording.json:"
                " re-record every notebook here (python tests/record.py)",
                file=sys.stderr,
            )
            return 1
    shipped, measured = ROOT / "notebooks" / "deep_dives" / ROWS, ROOT / "output" / ROWS
    if _ROWS_NOTEBOOK in chosen:
        measured.unlink(missing_ok=True)  # only rows this run measures are shipped
    for path in [p for p in ORDER if p in chosen]:
        try:
            print(f"{path.relative_to(ROOT)}: {record(path):.0f} s", flush=True)
        except CellExecutionError:
            # The rows notebook checks that the rows it ships are the rows it measures: with new
            # rows (a change to a remedy or its name) that check fails until they are shipped.
            if path != _ROWS_NOTEBOOK or not measured.exists():
                raise
        if path == _ROWS_NOTEBOOK and measured.read_bytes() != shipped.read_bytes():
            # New rows: ship them, then record again, so that the notebook's own output says it
            # checked the rows it ships.
            shutil.copy(measured, shipped)
            print(f"{path.relative_to(ROOT)}, again: {record(path):.0f} s", flush=True)
    if not args.notebooks:
        subprocess.run(
            [sys.executable, str(ROOT / "tests" / "arithmetic.py"), "--write"], check=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
