"""Every helper of ``utils.py`` is introduced before a notebook leans on it, and says where.

The series shows an idea in the open first and lets ``utils`` carry it afterwards. So:

- every ``utils.NAME`` that a notebook's code uses is introduced in that notebook or an
  earlier one: named in a Markdown cell (``NAME`` or ``utils.NAME`` in backticks) or written
  out in a code cell (``def NAME`` / ``class NAME``);
- every public function and class of ``utils.py`` says in its docstring
  "Introduced in notebook NN" (optionally ", section S"), and NN is the first notebook that
  introduces it; a section number, when given, is a numbered heading of that notebook.

The toolkit (``bn_toolkit.py``, re-exported by ``utils`` under the same names) is held to the
first rule like every other ``utils.NAME``. Its docstrings document the toolkit for a learner's
own model, not the series, so the second rule applies to the helpers defined in ``utils.py``;
where a lesson writes a toolkit function's core out, the lesson must be the first to introduce it.

The notebooks are found by their names (``notebooks/NN_*.ipynb``), so new ones are covered.
"""

import inspect
import json
import re
from pathlib import Path

import pytest

import bn_toolkit
import utils

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
INTRODUCED = re.compile(r"Notebook (\d\d)(?:, section (\d+))?")
USED = re.compile(r"\butils\.([A-Za-z_]\w*)")
FENCED = re.compile(r"```.*?```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _number(path):
    return path.name[:2]


def _public_helpers():
    """Public functions and classes defined in utils.py (not imported into it)."""
    return {
        name: value
        for name, value in vars(utils).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == utils.__name__
    }


def _public_names():
    """Every public attribute of utils that is its own or the toolkit's it re-exports (helpers and
    constants, not modules)."""
    names = set()
    for name, value in vars(utils).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if inspect.isfunction(value) or inspect.isclass(value):  # other imports are not utils'
            if getattr(value, "__module__", None) not in (utils.__name__, bn_toolkit.__name__):
                continue
        elif not name.isupper():  # other values: the module's constants (DATA_DIR, SEED, ...)
            continue
        names.add(name)
    return names


def _code_spans(markdown):
    """The code a Markdown cell shows: fenced blocks and inline spans."""
    fenced = FENCED.findall(markdown)
    rest = FENCED.sub(" ", markdown)
    return fenced + INLINE.findall(rest)


def _names_in_markdown(markdown, names):
    """Names a Markdown cell introduces: ``utils.NAME`` in any code, an inline span that is the
    name itself (``NAME`` or ``NAME(...)``), or ``def NAME`` / ``class NAME`` in a fenced block.
    A bare word inside other code (``metrics=["accuracy"]``) does not count."""
    found = set()
    for span in _code_spans(markdown):
        for name in names:
            if (
                re.search(rf"\butils\.{name}\b", span)
                or re.fullmatch(rf"\s*{name}\b(\(.*\))?\s*", span, re.S)
                or re.search(rf"^\s*(def|class)\s+{name}\b", span, re.M)
            ):
                found.add(name)
    return found


def _introduced_names(path, names):
    """Names of ``names`` that the notebook introduces: in Markdown code, or defined in code."""
    found = set()
    for cell in _cells(path):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            found |= _names_in_markdown(source, names)
        elif cell["cell_type"] == "code":
            found |= {n for n in names if re.search(rf"^\s*(def|class)\s+{n}\b", source, re.M)}
    return found


def _used_names(path):
    """``utils.NAME`` attributes that the notebook's code cells use."""
    names = set()
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            names |= set(USED.findall("".join(cell["source"])))
    return names


def _first_introduction(names):
    """Name -> number of the first notebook that introduces it (names never introduced are
    absent)."""
    first = {}
    for path in NOTEBOOKS:
        for name in _introduced_names(path, names):
            first.setdefault(name, _number(path))
    return first


def _numbered_sections(path):
    sections = set()
    for cell in _cells(path):
        if cell["cell_type"] == "markdown":
            sections |= set(re.findall(r"^##\s+(\d+)\.", "".join(cell["source"]), re.M))
    return sections


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_helper_a_notebook_uses_is_introduced_there_or_earlier(path):
    names = _public_names()
    used = _used_names(path) & names
    first = _first_introduction(names)
    late = sorted(n for n in used if first.get(n, "99") > _number(path))
    assert not late, (
        f"{path.name} uses utils.{', utils.'.join(late)} before any notebook introduces it "
        "(name it in a Markdown cell, `utils.NAME`, or write it out first)"
    )


def test_every_name_a_notebook_uses_exists_in_utils():
    names = _public_names()
    for path in NOTEBOOKS:
        unknown = sorted(_used_names(path) - names - {"py"})  # "utils.py" in prose-like comments
        assert not unknown, f"{path.name} uses utils.{', utils.'.join(unknown)}, which utils lacks"


@pytest.mark.parametrize("name", sorted(_public_helpers()))
def test_every_public_helper_says_which_notebook_introduces_it(name):
    doc = inspect.getdoc(_public_helpers()[name]) or ""
    match = INTRODUCED.search(" ".join(doc.split()))
    assert match, f"utils.{name}: the docstring lacks 'Notebook NN'"
    number, section = match.groups()
    paths = {_number(p): p for p in NOTEBOOKS}
    if number not in paths and number > max(paths):
        pytest.skip(f"utils.{name} belongs to notebook {number}, not written yet")
    assert number in paths, f"utils.{name}: there is no notebook {number}"
    first = _first_introduction({name}).get(name)
    assert first in (None, number), (
        f"utils.{name}: the docstring says notebook {number}, but notebook {first} introduces it"
    )
    if section is not None:
        assert section in _numbered_sections(paths[number]), (
            f"utils.{name}: notebook {number} has no section {section}"
        )


def test_the_rules_see_what_they_should():
    """The parsing itself: Markdown code naming a helper counts; prose and other code do not."""
    names = {"frozen_moving_statistics", "accuracy", "memorised", "setup", "resources", "SEED"}
    markdown = (
        "Use `utils.frozen_moving_statistics(model)`; memorised is prose; `setup()` is named;\n"
        '`metrics=["accuracy"]` is other code.\n```python\nx = utils.resources()\n```'
    )
    assert _names_in_markdown(markdown, names) == {
        "frozen_moving_statistics",
        "setup",
        "resources",
    }
    assert USED.findall("a = utils.moving_statistics(m)  # utils.SEED") == [
        "moving_statistics",
        "SEED",
    ]


#: Helpers whose core a lesson writes out first (as d2l's ``#@save``): the notebook that
#: introduces each shows this code in the open, and utils.py runs the same code.
CORES = {
    "load_image": ("01", r"Image\.Resampling\.LANCZOS"),
    "replay_moving_statistics": (
        "05",
        r"mean = momentum \* mean \+ \(1 - momentum\) \* \w+\.mean",
    ),
    "recalibrate_batchnorm": ("05", r"\.moving_variance\.assign\("),
    "set_moving_statistics": ("05", r"\.moving_mean\.assign\("),
}

#: The toolkit for a learner's own model (docs/toolkit.md): public even where a single
#: notebook uses it.
TOOLKIT = {
    "diagnose_batchnorm",
    "gaps_table_html",
    "LayerGap",
    "recalibrate_batchnorm",
    "Recalibration",
    "PreciseBN",
    "named_batchnorm_layers",
    "batchnorm_layers",
    "moving_statistics",
    "set_moving_statistics",
    "frozen_moving_statistics",
    "recording_batchnorm_inputs",
    "batch_statistics",
    "Moments",
    "log_variance_ratio",
}


@pytest.mark.parametrize("name", sorted(CORES))
def test_a_helper_introduced_in_a_lesson_has_its_core_written_out_there(name):
    number, core = CORES[name]
    module = inspect.getmodule(getattr(utils, name))  # utils, or bn_toolkit for the toolkit
    assert re.search(core, inspect.getsource(module)), (
        f"{module.__name__}.py no longer runs {core!r}"
    )
    if module is utils:
        doc = " ".join((inspect.getdoc(getattr(utils, name)) or "").split())
        assert f"Notebook {number}" in doc, f"utils.{name} says it is introduced elsewhere"
    else:  # the toolkit's docstring does not name the series' notebooks: the notebooks do
        first = _first_introduction({name}).get(name)
        assert first == number, f"utils.{name}: notebook {first} introduces it, not {number}"
    path = next(p for p in NOTEBOOKS if _number(p) == number)
    lines = [
        line
        for cell in _cells(path)
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if "utils." not in line
    ]
    assert any(re.search(core, line) for line in lines), (
        f"notebook {number} introduces utils.{name} but does not write out its core {core!r}"
    )


DEEP_DIVES = sorted((ROOT / "notebooks" / "deep_dives").glob("*.ipynb"))


def test_no_public_helper_serves_a_single_notebook_unless_it_is_the_toolkit():
    """Shared: used by two notebooks (deep dives count), or called by another helper of utils."""
    helpers = _public_helpers()
    users = {
        name: {p.name for p in NOTEBOOKS + DEEP_DIVES if name in _used_names(p)}
        for name in helpers
    }
    called = {
        name
        for name in helpers
        if any(
            re.search(rf"\b{name}\b", inspect.getsource(other))
            for key, other in helpers.items()
            if key != name
        )
    }
    lonely = sorted(
        n for n, used in users.items() if len(used) == 1 and n not in called and n not in TOOLKIT
    )
    assert not lonely, f"used by one notebook only, so they belong in it: {lonely}"


@pytest.mark.parametrize("path", DEEP_DIVES, ids=lambda p: p.stem)
def test_a_deep_dive_uses_only_helpers_the_main_path_or_itself_introduces(path):
    names = _public_names()
    used = _used_names(path)
    assert not used - names - {"py"}, f"{path.name} uses names utils lacks: {used - names}"
    known = set(_first_introduction(names)) | _introduced_names(path, names)
    assert not (used & names) - known, (
        f"{path.name} uses utils.{', utils.'.join(sorted((used & names) - known))}, which neither "
        "the main path nor the deep dive introduces"
    )
