"""Every notebook has the series' shape, and every Binder link uses the one repository
definition."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DEEP_DIVES = sorted((ROOT / "notebooks" / "deep_dives").glob("*.ipynb"))
REPOSITORY = "batchnorm-series/fit-vs-predict"  # the series' GitHub repository, owner/name
BINDER_LINK = re.compile(r"https://mybinder\.org/v2/gh/[^)\s\"]+")


def binder_url(path=""):
    """The mybinder.org link that opens ``path`` in JupyterLab (the whole series without one)."""
    base = f"https://mybinder.org/v2/gh/{REPOSITORY}/HEAD"
    return f"{base}?urlpath=lab/tree/{path}" if path else f"{base}?urlpath=lab"


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def markdown(path):
    return ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "markdown"]


def code(path):
    return ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "code"]


def test_there_are_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 5


COST = re.compile(
    r"\*\*Cost:\*\* about \d+ s and \d+\.\d GB on a 2-core CPU; about \d+ s on Binder"
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_screen_title_one_line_badge_cost_and_neighbours(path):
    top = markdown(path)[0]
    assert top.startswith(f"# {path.name[:2]} · "), "the first cell starts with the numbered title"
    links = BINDER_LINK.findall(top)
    assert links == [binder_url(f"notebooks/{path.name}")], "the badge opens this very notebook"
    assert COST.search(top), (
        "the cost in one line: seconds and memory on 2 cores, seconds on Binder"
    )
    assert top.split("\n\n")[1].startswith("You will see"), "what you will see happen, right after"
    index = NOTEBOOKS.index(path)
    if index > 0:
        assert "**Previous:** [" in top and f"]({NOTEBOOKS[index - 1].name})" in top
    if index < len(NOTEBOOKS) - 1:
        assert "**Next:** [" in top and f"]({NOTEBOOKS[index + 1].name})" in top
    assert len(top.split()) < 100, "the first screen stays short"


@pytest.mark.parametrize("path", DEEP_DIVES, ids=lambda p: p.stem)
def test_deep_dive_has_the_series_shape_and_links_both_ways(path):
    top = markdown(path)[0]
    assert top.startswith("# Deep dive · ")
    assert BINDER_LINK.findall(top) == [binder_url(f"notebooks/deep_dives/{path.name}")]
    assert COST.search(top)
    assert top.split("\n\n")[1].startswith("You will see")
    arises = re.findall(r"\*\*Arises in:\*\* \[[^]]+\]\(\.\./(\d\d_[^)]+\.ipynb)\)", top)
    assert arises, "says where on the main path its question arises"
    for name in arises:
        origin = ROOT / "notebooks" / name
        assert origin.exists(), f"broken link to {name}"
        assert f"](deep_dives/{path.name})" in "\n".join(markdown(origin)), (
            f"{name} links to the deep dive where its question arises"
        )
    sources = code(path)
    assert "utils.setup()" in sources[0] and "print(utils.resources())" in sources[-1]
    text = "\n".join(markdown(path))
    assert "## Summary" in text and "## Exercises" in text
    assert re.search(r"\*\*Back to:\*\* \[[^]]+\]\(\.\./\d\d_", markdown(path)[-1])


def test_every_deep_dive_link_resolves():
    assert DEEP_DIVES, "the side roads live in notebooks/deep_dives/"
    for path in NOTEBOOKS:
        for target in re.findall(r"\]\(deep_dives/([^)]+\.ipynb)\)", "\n".join(markdown(path))):
            assert (ROOT / "notebooks" / "deep_dives" / target).exists(), f"{path.name}: {target}"


def words(path):
    """Words of Markdown outside collapsed <details> blocks (hints and solutions)."""
    text = "\n".join(markdown(path))
    return len(re.sub(r"<details>.*?</details>", " ", text, flags=re.S).split())


MAIN_PATH = [p for p in NOTEBOOKS if p.name[:2] <= "05"]
MAIN_PATH_WORDS, NOTEBOOK_WORDS = 5500, 1500
BEYOND_THE_CASE_WORDS = 2200  # 06 and 07 each


def test_the_main_path_reads_in_one_sitting():
    counts = {p.stem: words(p) for p in MAIN_PATH}
    print("words per notebook:", counts, "total:", sum(counts.values()))
    assert all(c <= NOTEBOOK_WORDS for c in counts.values()), f"over {NOTEBOOK_WORDS}: {counts}"
    assert sum(counts.values()) <= MAIN_PATH_WORDS, f"main path over {MAIN_PATH_WORDS}: {counts}"


def test_beyond_the_case_stays_within_its_budget():
    counts = {p.stem: words(p) for p in NOTEBOOKS if p not in MAIN_PATH}
    print("words beyond the case:", counts)
    assert all(c <= BEYOND_THE_CASE_WORDS for c in counts.values()), counts


README_WORDS = 1500


def test_readme_is_a_landing_page():
    """README answers first and points the way; maintainers' material lives in docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.split()) <= README_WORDS, f"README: {len(readme.split())} words"
    headings = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    assert headings[:3] == ["The answer", "Check your own model", "The fix"], headings
    for target in re.findall(r"\]\(((?:docs|notebooks)/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to a missing {target}"
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^):#]+)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_checks_versions_and_last_cell_reports_cost(path):
    sources = code(path)
    assert "utils.setup()" in sources[0], "the first code cell is the setup cell"
    assert "print(utils.resources())" in sources[-1], "the last cell prints what the notebook cost"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_summary_exercises_and_neighbour_links(path):
    text = "\n".join(markdown(path))
    assert "## Summary" in text and "## Exercises" in text
    index = NOTEBOOKS.index(path)
    end = markdown(path)[-1]
    if index > 0:
        assert f"]({NOTEBOOKS[index - 1].name})" in end, "links to the previous notebook"
    if index < len(NOTEBOOKS) - 1:
        assert f"]({NOTEBOOKS[index + 1].name})" in end, "links to the next notebook"
    for target in re.findall(r"\]\((\d\d_[^)]+\.ipynb)\)", text):
        assert (ROOT / "notebooks" / target).exists(), f"broken link to {target}"


def test_every_binder_link_uses_the_one_repository_definition():
    prefix = f"https://mybinder.org/v2/gh/{REPOSITORY}/HEAD"
    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    texts.update({p.name: "\n".join(markdown(p)) for p in NOTEBOOKS + DEEP_DIVES})
    for name, text in texts.items():
        for link in BINDER_LINK.findall(text):
            assert link.startswith(prefix), f"{name}: {link} does not use REPOSITORY"
    assert binder_url() in texts["README.md"], "README has the badge that opens the series"


def test_binder_url():
    assert binder_url() == f"https://mybinder.org/v2/gh/{REPOSITORY}/HEAD?urlpath=lab"
    assert binder_url("notebooks/x.ipynb").endswith("?urlpath=lab/tree/notebooks/x.ipynb")


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Test\n.*?```bash\n([^`]+)```", readme, re.DOTALL).group(1)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert block.strip() == "bash tests/run.sh"
    assert block.strip() in ci, "the README's test command is one that .ci/run runs"


def test_the_test_command_pins_no_cpu_by_number():
    """Any machine means any CPU set: the lanes use the CPUs the process may use."""
    script = (ROOT / "tests" / "run.sh").read_text(encoding="utf-8")
    assert not re.search(r"taskset -c \d", script)
    assert "sched_getaffinity" in script


def test_binder_files_pin_the_environment():
    runtime = (ROOT / "runtime.txt").read_text(encoding="utf-8").strip()
    assert re.fullmatch(r"python-3\.\d+", runtime)
    assert not (ROOT / "environment.yml").exists(), (
        "environment.yml would make Binder ignore runtime.txt"
    )
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][^\s]*", line.strip()), (
                f"not pinned: {line}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS + DEEP_DIVES, ids=lambda p: p.stem)
def test_every_check_is_at_most_four_lines(path):
    """A `# Check` cell states its claim in comments and asserts it in at most 4 lines of code."""
    for source in code(path):
        if source.lstrip().startswith("# Check"):
            lines = [
                line
                for line in source.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            assert len(lines) <= 4, f"{path.name}: a check of {len(lines)} lines:\n{source}"


@pytest.mark.parametrize("path", NOTEBOOKS + DEEP_DIVES, ids=lambda p: p.stem)
def test_every_check_and_plot_code_is_collapsed(path):
    """A check guards the text, and plotting code draws a figure, without interrupting the text:
    their code is stored collapsed."""
    for cell in cells(path):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and source.lstrip().startswith(("# Check", "# extra code")):
            assert cell["metadata"].get("jupyter", {}).get("source_hidden"), (
                f"{path.name}: a check or plot code shown expanded:\n{source}"
            )
