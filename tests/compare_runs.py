"""One machine, one CPU or all of them: the notebooks must give the same outputs.

Every nbval run writes the outputs it got to ``output/notebook_runs/<label>/`` (see
``tests/nbval_cpu.py``). This script compares two such runs cell by cell, the outputs sanitized as
nbval compares them (timings and memory only). It compares the runs with each other, not with the
stored notebooks, so it checks determinism on any CPU, including one whose arithmetic differs from
the recording's.

Usage, from the repository root, after the two runs::

    runs=output/notebook_runs
    python tests/compare_runs.py $runs/all-cpus-onednn0 $runs/one-cpu-onednn0

Exit status 0: both runs hold the same notebooks, every cell's outputs agree, and both computed the
same digests (``tests/arithmetic.py``); 1 otherwise, with the differences listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_run(folder: Path) -> dict[str, dict]:
    """``notebook file name -> {cell number: outputs}`` of one run.

    Args:
        folder: a run's folder under ``output/notebook_runs/``.

    Returns:
        The recorded outputs per notebook.

    Raises:
        FileNotFoundError: the folder holds no recorded notebook.
    """
    runs = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.ipynb.json"))}
    if not runs:
        raise FileNotFoundError(f"{folder} holds no recorded notebook: run nbval first")
    return runs


def decisions(folder: Path) -> dict:
    """What a run's plugin decided: this machine's digests and the kinds left uncompared."""
    path = folder / "arithmetic.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {"found": report["found"], "differs": report["differs"]}


def differences(first: dict[str, dict], second: dict[str, dict]) -> list[str]:
    """Every notebook or cell in which two runs differ, one line each.

    Args:
        first: one run, as ``load_run`` returns it.
        second: the other run.

    Returns:
        A list of descriptions; empty when the runs agree.
    """
    found = []
    for name in sorted(set(first) ^ set(second)):
        found.append(f"{name}: recorded in one run only")
    for name in sorted(set(first) & set(second)):
        cells_a, cells_b = first[name], second[name]
        for cell in sorted(set(cells_a) | set(cells_b), key=int):
            if cells_a.get(cell) != cells_b.get(cell):
                found.append(f"{name}: cell {cell} differs")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    first, second = load_run(args.first), load_run(args.second)
    found = differences(first, second)
    if decisions(args.first) != decisions(args.second):  # the digests: the same bits, too
        found.append(f"the digests differ: {decisions(args.first)} and {decisions(args.second)}")
    cells = sum(len(cells) for cells in first.values())
    if found:
        print(f"{args.first.name} and {args.second.name} differ:")
        print("\n".join(f"  {line}" for line in found))
        return 1
    print(
        f"{args.first.name} and {args.second.name}: {len(first)} notebooks, {cells} cells, "
        "the same outputs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
