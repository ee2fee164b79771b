"""The notebooks' outputs on any CPU: which cells are compared where, and that the rules hold.

See ``tests/nbval_cpu.py`` (the nbval plugin), ``tests/arithmetic.py`` (the digests) and
docs/testing.md (the decision and the list of cells whose outputs follow a training's bits).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from compare_runs import differences
from nbval_cpu import cell_kind

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [
    *sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")),
    *sorted((ROOT / "notebooks" / "deep_dives").glob("*.ipynb")),
]
RECORDING_SETTING = {"TF_ENABLE_ONEDNN_OPTS": "0"}  # as in the notebooks' setup cell
OTHER_CPU = {"TF_ENABLE_ONEDNN_OPTS": "1"}  # oneDNN's kernels: another order of additions


def tagged_cells(path: Path) -> list[int]:
    """Numbers (among code cells, as nbval counts) of the cells tagged ``cpu-dependent-*``."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    return [i for i, cell in enumerate(cells) if cell_kind(cell)]


def test_every_tag_names_a_kind_the_digests_cover():
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            cell_kind(cell)  # raises for an unknown kind or two tags


# nbval leaves a cell uncompared when its stored outputs were never run, or when a marker says so.
# The one cell allowed: 01's os.listdir, whose order is the file system's (the lesson's point).
ALLOWED_MARKERS = {("01_load_images.ipynb", 2): "NBVAL_IGNORE_OUTPUT"}
MARKERS = ("NBVAL_", "PYTEST_VALIDATE_", "nbval-", "raises-exception")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbval_compares_every_cell_but_the_listed_ones(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    for number, cell in enumerate(cells):
        assert cell.execution_count is not None, f"{path.name} cell {number}: never run"
        words = cell.source.split() + cell.metadata.get("tags", [])
        markers = [w for w in words if w.lstrip("#").startswith(MARKERS)]
        allowed = ALLOWED_MARKERS.get((path.name, number))
        assert all(m.lstrip("#").rstrip(":") == allowed for m in markers), (path.name, number)


def test_docs_list_the_cells_compared_only_on_the_recording_cpu():
    """docs/testing.md's table names, per notebook, the cells left uncompared on another CPU."""
    text = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        cells = tagged_cells(path)
        listed = re.search(
            rf"^\| `{re.escape(path.name)}` \| (\d+) \| (\d+) \| ([^|]*)\|", text, re.MULTILINE
        )
        assert listed, f"docs/testing.md has no row for {path.name}"
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert int(listed.group(1)) == len(code) - len(cells), f"{path.name}: portable cells"
        assert int(listed.group(2)) == len(cells), f"{path.name}: cells compared on one CPU kind"
        numbers = [int(n) for n in re.findall(r"\d+", listed.group(3))]
        assert numbers == cells, f"{path.name}: the listed cells are {cells}"


def test_compare_runs_finds_a_changed_cell_and_a_missing_notebook():
    run = {"a.ipynb.json": {"0": [{"text": "1"}], "1": [{"text": "2"}]}}
    assert differences(run, run) == []
    changed = {"a.ipynb.json": {"0": [{"text": "1"}], "1": [{"text": "3"}]}}
    assert differences(run, changed) == ["a.ipynb.json: cell 1 differs"]
    assert differences(run, {}) == ["a.ipynb.json: recorded in one run only"]


def _digests(env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "arithmetic.py")],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_other_cpu_setting_changes_every_kinds_bits():
    """The test command's second lane emulates another CPU with oneDNN's kernels: that only
    exercises the uncompared path if those kernels really compute other bits, for every kind."""
    here, other = _digests(RECORDING_SETTING), _digests(OTHER_CPU)
    assert here.keys() == other.keys()
    assert all(here[kind] != other[kind] for kind in here), (here, other)


def test_a_portable_output_changed_by_one_digit_fails_on_another_cpu():
    """02's parameter count is compared on every CPU, even where the training's cells are not."""
    source = ROOT / "notebooks" / "02_overfit_and_predict.ipynb"
    notebook = nbformat.read(source, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    first_tagged = tagged_cells(source)[0]  # the training: run, not compared on another CPU
    changed = next(
        c for c in code if "parameters" in "".join(o.get("text", "") for o in c.outputs)
    )
    assert code.index(changed) < first_tagged
    changed.outputs[0]["text"] = changed.outputs[0]["text"].replace("23,587,587", "23,587,588")
    notebook.cells = notebook.cells[: notebook.cells.index(code[first_tagged]) + 1]
    folder = ROOT / "output" / "portability_test"  # under the repository: the setup finds utils
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / source.name
    nbformat.write(notebook, copy)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval",
            "--nbval-current-env",
            "--nbval-sanitize-with",
            "tests/sanitize.cfg",
            "-p",
            "no:cacheprovider",
            "-q",
            str(copy),
        ],
        cwd=ROOT,
        env=os.environ | OTHER_CPU | {"NBVAL_RUN_LABEL": "portability-test"},
        capture_output=True,
        text=True,
        check=False,
    )
    failed = re.findall(r"FAILED \S+::Cell (\d+)", result.stdout)
    assert failed == [str(code.index(changed))], result.stdout[-3000:]
    assert "recorded on another kind of CPU" in result.stdout, result.stdout[-3000:]
