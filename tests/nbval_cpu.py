"""nbval on any CPU: strict where the bits are portable, and everywhere on the recording's kind.

A pytest plugin, loaded by the repository's ``conftest.py`` for every run of nbval:

- A code cell whose outputs follow a training's last bits carries the tag
  ``cpu-dependent-<kind>`` (``resnet50`` or ``small-cnn``; see ``tests/arithmetic.py``). Before
  the notebooks run, the plugin computes this machine's digest for each kind that a collected cell
  names. Where it equals the recording machine's (``tests/recording.json``), every cell is
  compared with its stored outputs. Where it differs, the cells of that kind still run, and every
  check in them must hold, but their outputs are not compared; the run says so in one line. Every
  other cell is compared on every machine. Fail safe: where the code, pictures or packages differ
  from the recording's (``arithmetic.inputs``), a differing digest may be a regression rather than
  another CPU, so every cell is compared. ``--nbval-compare-all`` compares every cell whatever the
  digests say.
- Every run writes the outputs it got, sanitized as nbval compares them, to
  ``output/notebook_runs/<label>/``: the label is ``$NBVAL_RUN_LABEL`` if set (the test command
  names its runs), else ``<CPUs>cpu-onednn<setting>``.
  ``tests/compare_runs.py`` compares two such runs cell by cell: the same machine must give the
  same outputs on one CPU and on all of them, whatever CPU recorded the notebooks.

``docs/testing.md`` explains the decision and lists the tagged cells.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nbval.plugin import IPyNbCell

ROOT = Path(__file__).resolve().parent.parent
TAG_PREFIX = "cpu-dependent-"
RUNS_DIR = ROOT / "output" / "notebook_runs"


@dataclass
class ArithmeticReport:
    """What the plugin decided for one pytest session."""

    found: dict[str, str] = field(default_factory=dict)
    recorded: dict[str, str] = field(default_factory=dict)
    differs: list[str] = field(default_factory=list)
    uncompared: list[str] = field(default_factory=list)
    compare_all: bool = False
    inputs_changed: bool = False


def cell_kind(cell) -> str | None:
    """The kind of training a cell's outputs depend on, from its ``cpu-dependent-*`` tag.

    Args:
        cell: a notebook cell (``nbformat`` node or dict).

    Returns:
        ``"resnet50"``, ``"small-cnn"`` or ``None`` for a portable cell.

    Raises:
        ValueError: the tag names a kind ``tests/arithmetic.py`` does not compute, or a cell
            carries two such tags.
    """
    from arithmetic import KINDS

    tags = [t for t in cell.get("metadata", {}).get("tags", []) if t.startswith(TAG_PREFIX)]
    if len(tags) > 1:
        raise ValueError(f"a cell carries {tags}: give it one {TAG_PREFIX}<kind> tag")
    if not tags:
        return None
    kind = tags[0][len(TAG_PREFIX) :]
    if kind not in KINDS:
        raise ValueError(f"tag {tags[0]!r}: the kinds are {list(KINDS)}")
    return kind


def run_label() -> str:
    """``$NBVAL_RUN_LABEL``, else ``<CPUs>cpu-onednn<setting>`` (CPUs this process may use)."""
    if os.environ.get("NBVAL_RUN_LABEL"):
        return os.environ["NBVAL_RUN_LABEL"]
    cpus = len(os.sched_getaffinity(0))
    return f"{cpus}cpu-onednn{os.environ.get('TF_ENABLE_ONEDNN_OPTS', '0')}"


def _this_machine() -> dict[str, str]:
    """This machine's digests, computed in a fresh process with the notebooks' settings."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "arithmetic.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError("tests/arithmetic.py failed:\n" + result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def pytest_addoption(parser):
    parser.addoption(
        "--nbval-compare-all",
        action="store_true",
        help="compare every notebook cell with its stored outputs, even where this machine's "
        "arithmetic differs from the recording's (tests/arithmetic.py)",
    )


def pytest_collection_modifyitems(session, config, items):
    cells = [item for item in items if isinstance(item, IPyNbCell)]
    kinds = {cell_kind(item.cell) for item in cells} - {None}
    report = ArithmeticReport(compare_all=config.getoption("nbval_compare_all"))
    config.stash[REPORT] = report
    if not kinds:
        return
    from arithmetic import inputs, recorded

    stored = recorded()
    report.recorded = stored["fingerprints"]
    report.found = _this_machine()
    report.differs = sorted(k for k in kinds if report.found[k] != report.recorded[k])
    report.inputs_changed = stored["inputs"] != inputs()
    if report.compare_all or report.inputs_changed:
        return
    for item in cells:
        if cell_kind(item.cell) in report.differs:
            item.options["check"] = False  # nbval's own switch: run the cell, skip the compare
            report.uncompared.append(item.nodeid)


REPORT = pytest.StashKey[ArithmeticReport]()
OUTPUTS = pytest.StashKey[dict]()


def _comparable(item) -> list[dict]:
    """A cell's outputs as nbval compares them: sanitized, without the keys it skips."""
    skip = item.parent.skip_compare
    kept = []
    for output in item.test_outputs or []:
        entry = {}
        for key, value in output.items():
            if key in skip:
                continue
            if key == "data":
                entry.update({k: item.sanitize(v) for k, v in value.items() if k not in skip})
            else:
                entry[key] = item.sanitize(value)
        kept.append(entry)
    return kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when == "call" and isinstance(item, IPyNbCell) and item.test_outputs is not None:
        runs = item.config.stash.setdefault(OUTPUTS, {})
        notebook = Path(str(item.fspath)).resolve()
        name = str(notebook.relative_to(ROOT)) if notebook.is_relative_to(ROOT) else str(notebook)
        runs.setdefault(name, {})[str(item.cell_num)] = _comparable(item)


def pytest_sessionfinish(session):
    runs = session.config.stash.get(OUTPUTS, {})
    if not runs:
        return
    folder = RUNS_DIR / run_label()
    folder.mkdir(parents=True, exist_ok=True)
    for name, cells in runs.items():
        (folder / (name.replace("/", "__") + ".json")).write_text(json.dumps(cells, indent=1))
    report = session.config.stash.get(REPORT, None)
    if report is not None:
        (folder / "arithmetic.json").write_text(json.dumps(report.__dict__, indent=1))


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash.get(REPORT, None)
    if report is None or not report.recorded:
        return
    if not report.differs:
        line = "this machine computes the trainings to the recording's bits: every cell compared"
    elif report.inputs_changed:
        line = (
            "the code, pictures or packages differ from the recording's (tests/recording.json), "
            "so a differing digest cannot be told from a regression: every cell compared "
            "(re-record with python tests/record.py)"
        )
    elif report.compare_all:
        line = (
            "this machine's arithmetic differs from the recording's "
            f"({', '.join(report.differs)}),"
            " and --nbval-compare-all compared every cell all the same"
        )
    else:
        line = (
            f"{len(report.uncompared)} cells that depend on a training "
            f"({', '.join(report.differs)}) were recorded on another kind of CPU: they ran, "
            "with their checks, but their outputs were not compared (docs/testing.md)"
        )
    terminalreporter.write_line(f"notebook outputs: {line}")
