"""Notebook 01 in JupyterLab, in a real browser: every cell runs through the UI without an error.

The unit tests and nbval run the notebooks in a bare kernel. This test checks the way a learner
meets them: JupyterLab serves a copy of the series, headless Chromium opens notebook 01, clears
its stored outputs and runs all cells from the "Run" menu, and the test reads the outputs
JupyterLab rendered. A screenshot of the executed notebook goes to
``output/screenshots/01_load_images.png``.

Needs the ``playwright`` package (``requirements.txt``) and Debian's Chromium at
``/usr/bin/chromium`` (``apt-get install chromium``); Playwright's own browser download is never
used. Without them the test is skipped, except under ``CI=true``, where it fails. Only loopback
connections are made: the browser is not allowed to load anything that is not the local server.
Select or deselect it with ``-m browser`` / ``-m "not browser"``.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "01_load_images.ipynb"
SCREENSHOT = ROOT / "output" / "screenshots" / "01_load_images.png"  # output/ is git-ignored
# Text the executed notebook must show: the set-up line and the shape of the loaded images.
EXPECTED_TEXT = ("deterministic ops", "(3, 197, 197, 1)")

SERVER_START_SECONDS = 60  # until /api/status answers
KERNEL_READY_SECONDS = 120  # page loaded and the kernel ready (TensorFlow is not imported yet)
CLEAR_SECONDS = 60  # Edit > Clear Outputs of All Cells
RUN_ALL_SECONDS = 180  # all cells; 4-10 s on an idle 2-core CPU
STOP_SECONDS = 30  # for the server to shut its kernel down and exit

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-proxy-server",  # a proxy from the environment must not see the loopback traffic
    # No internet here: without these, Chromium keeps trying to reach Google's services.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-first-run",
    "--no-default-browser-check",
]

# JupyterLab marks every output with the MIME type it rendered: errors (tracebacks) and text
# written to stderr are both "application/vnd.jupyter.stderr". A lesson shows neither.
ERROR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'

# The state of the open notebook as the browser shows it.
NOTEBOOK_STATE_JS = """() => {
    const notebook = document.querySelector('.jp-NotebookPanel .jp-Notebook');
    if (!notebook) return null;
    const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
    const kernelName = document.querySelector(
        '.jp-NotebookPanel-toolbar [data-jp-item-name="kernelName"]');
    const cells = [...notebook.querySelectorAll('.jp-CodeCell')];
    return {
        kernelName: kernelName ? kernelName.textContent.trim() : '',
        kernel: indicator ? indicator.getAttribute('data-status') : null,
        dialogs: [...document.querySelectorAll('.jp-Dialog')].map(dialog =>
            dialog.textContent.trim()),
        // A cell whose code is collapsed shows a placeholder without its prompt: null.
        prompts: cells.map(cell => {
            const prompt = cell.querySelector('.jp-InputArea-prompt');
            return prompt ? prompt.textContent.trim() : null;
        }),
        errors: cells.flatMap((cell, index) =>
            [...cell.querySelectorAll(ERROR_OUTPUT)].map(out =>
                ({cell: index + 1, text: out.textContent}))),
        outputs: cells.map(cell =>
            [...cell.querySelectorAll('.jp-OutputArea-output')].map(out =>
                out.textContent).join('\\n')),
    };
}""".replace("ERROR_OUTPUT", json.dumps(ERROR_OUTPUT))

# The notebook is open with a kernel ready. Before the kernel is connected the toolbar shows
# "No Kernel" next to an "idle" indicator, and Run All would then ask for a kernel in a dialog.
KERNEL_READY_JS = """() => {
    const state = (STATE)();
    return !!state && state.prompts.length === CODE_CELLS && state.kernel === 'idle'
        && state.kernelName !== '' && state.kernelName !== 'No Kernel';
}""".replace("STATE", NOTEBOOK_STATE_JS)

# Run All has finished: nothing queued or running ("[*]:"), the kernel idle, and either every
# code cell numbered or an error shown (JupyterLab stops Run All at the first error); or a
# dialog waits for an answer nobody will give.
RUN_FINISHED_JS = """() => {
    const state = (STATE)();
    if (state && state.dialogs.length > 0) return true;
    if (!state || state.kernel !== 'idle' || state.prompts.length === 0) return false;
    if (state.prompts.some(prompt => prompt === '[*]:')) return false;
    return state.errors.length > 0
        || state.prompts.every(prompt => prompt === null || /^\\[\\d+\\]:$/.test(prompt));
}""".replace("STATE", NOTEBOOK_STATE_JS)

# JupyterLab settings for the test's private configuration folder: no "Jupyter news?" pop-up and
# no update check (both would fetch from the internet), and every cell attached to the page so
# that the full-height screenshot shows them all.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def _require(available: bool, what: str, install: str) -> None:
    """Skip when a browser-test requirement is missing; under CI=true, fail instead."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {what} is missing: {install}", pytrace=False)
    pytest.skip(f"{what} is missing: {install}")


@pytest.fixture
def playwright_api():
    """The Playwright sync API, once the package and Debian's Chromium are known to be there."""
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    _require(
        sync_api is not None,
        "the playwright package",
        "pip install -r requirements.txt (it pins playwright)",
    )
    _require(
        CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK),
        str(CHROMIUM),
        "apt-get install chromium (Debian's package; Playwright's browser download is not used)",
    )
    return sync_api


@pytest.fixture
def series_copy(tmp_path):
    """What notebook 01 needs, copied, so that JupyterLab's autosave never touches the
    repository."""
    copy = tmp_path / "series"
    copy.mkdir()
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
    shutil.copytree(ROOT / "notebooks", copy / "notebooks", ignore=ignore)
    shutil.copytree(ROOT / "data", copy / "data", ignore=ignore)
    for module in ("utils.py", "bn_toolkit.py"):  # utils imports the toolkit
        shutil.copy2(ROOT / module, copy / module)
    return copy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def jupyterlab(playwright_api, series_copy, tmp_path):
    """A JupyterLab server on 127.0.0.1 serving the copy; yields its base URL and token."""
    port, token = _free_port(), secrets.token_hex(24)
    home = tmp_path / "jupyter"  # private configuration: no user settings, workspaces, kernels
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
    )
    env.pop("BN_SERIES_DATA", None)  # the series' own three images, from the copy
    for plugin, settings in LAB_SETTINGS.items():
        path = home / "config" / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))

    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ServerApp.port_retries=0",  # the port chosen here, or fail
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={series_copy}",
        "--LabApp.news_url=None",  # no news feed from the internet
        "--LabApp.extension_manager=readonly",
    ]  # no extension search on PyPI
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")

    log = tmp_path / "jupyterlab.log"
    base_url = f"http://127.0.0.1:{port}"
    # Straight to the server, even when the environment names an HTTP proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    status = urllib.request.Request(
        f"{base_url}/api/status", headers={"Authorization": f"token {token}"}
    )
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            command,
            cwd=series_copy,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + SERVER_START_SECONDS
            while True:
                if server.poll() is not None:
                    pytest.fail(
                        f"JupyterLab exited with code {server.returncode} before it "
                        f"answered:\n{_log_tail(log)}",
                        pytrace=False,
                    )
                try:
                    with opener.open(status, timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not answer on {base_url}/api/status within "
                        f"{SERVER_START_SECONDS} s:\n{_log_tail(log)}",
                        pytrace=False,
                    )
                time.sleep(0.5)
            yield base_url, token
        finally:
            # SIGTERM: the server shuts its kernels down and exits.
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=STOP_SECONDS)


@pytest.fixture
def blocked_requests():
    """The URLs the page tried to load from anywhere but 127.0.0.1 (and was refused)."""
    return []


@pytest.fixture
def page(playwright_api, blocked_requests):
    """A page in headless Chromium that may only talk to 127.0.0.1."""

    def loopback_only(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked_requests.append(route.request.url)
            route.abort()

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.route("**/*", loopback_only)
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def _click_menu(page, menu: str, item: str) -> None:
    """Open a menu of JupyterLab's menu bar and click one of its items, as a user would."""
    page.locator(".lm-MenuBar").get_by_role("menuitem", name=menu, exact=True).click()
    page.locator(".lm-Menu").get_by_role("menuitem", name=item, exact=True).click()


def _describe(state) -> str:
    if not state:
        return "no notebook on the page"
    return (
        f"kernel {state['kernelName']!r} {state['kernel']!r}, "
        f"prompts {' '.join(map(str, state['prompts']))}, dialogs {state['dialogs']}"
    )


def _screenshot_whole_notebook(page, path: Path) -> None:
    """Make the window as tall as the notebook, so that the screenshot shows every cell."""
    # The notebook scrolls inside JupyterLab's window: how much taller is it than its view?
    missing = page.evaluate("""() => {
        const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
        const cells = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell');
        if (!scroller || cells.length === 0) return 0;
        const bottom = cells[cells.length - 1].getBoundingClientRect().bottom
            - scroller.getBoundingClientRect().top + scroller.scrollTop;
        return Math.ceil(bottom + 20 - scroller.clientHeight);
    }""")
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    page.set_viewport_size({"width": width, "height": min(height + max(missing, 0), 16_000)})
    page.evaluate("""() => {
        const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
        if (scroller) scroller.scrollTop = 0;
    }""")
    page.wait_for_timeout(1_000)  # let JupyterLab lay the notebook out again
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def test_notebook_01_runs_in_jupyterlab(
    playwright_api, jupyterlab, page, blocked_requests, series_copy
):
    base_url, token = jupyterlab
    stored = json.loads((series_copy / "notebooks" / NOTEBOOK).read_text())
    code_cells = sum(cell["cell_type"] == "code" for cell in stored["cells"])
    # Code cells stored with their source collapsed show no prompt: None in the expected list.
    expected_prompts = [
        None if cell.get("metadata", {}).get("jupyter", {}).get("source_hidden") else f"[{n}]:"
        for n, cell in enumerate((c for c in stored["cells"] if c["cell_type"] == "code"), 1)
    ]

    page.goto(f"{base_url}/lab/tree/notebooks/{NOTEBOOK}?token={token}")
    try:
        page.wait_for_function(
            KERNEL_READY_JS.replace("CODE_CELLS", str(code_cells)),
            timeout=KERNEL_READY_SECONDS * 1000,
            polling=250,
        )
    except playwright_api.TimeoutError:
        pytest.fail(
            f"notebook {NOTEBOOK} with a ready kernel did not appear within "
            f"{KERNEL_READY_SECONDS} s: {_describe(page.evaluate(NOTEBOOK_STATE_JS))}",
            pytrace=False,
        )

    # Start from a blank notebook, so that nothing below can be read from the stored outputs.
    _click_menu(page, "Edit", "Clear Outputs of All Cells")
    try:
        page.wait_for_function(
            f"() => {{ const s = ({NOTEBOOK_STATE_JS})(); "
            "return s && s.prompts.length > 0 && s.prompts.every(p => p === null || p === '[ ]:') "
            "&& s.outputs.every(o => o === ''); }",
            timeout=CLEAR_SECONDS * 1000,
            polling=250,
        )
    except playwright_api.TimeoutError:
        state = page.evaluate(NOTEBOOK_STATE_JS)
        pytest.fail(
            f"the outputs were not cleared within {CLEAR_SECONDS} s: {_describe(state)}, "
            f"outputs {[o[:80] for o in state['outputs']] if state else None}",
            pytrace=False,
        )

    started = time.monotonic()
    _click_menu(page, "Run", "Run All Cells")
    finished = True
    try:
        page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_SECONDS * 1000, polling=250)
    except playwright_api.TimeoutError:
        finished = False
    seconds = time.monotonic() - started
    state = page.evaluate(NOTEBOOK_STATE_JS)
    _screenshot_whole_notebook(page, SCREENSHOT)  # also when the run failed: it shows why

    assert finished, (
        f"Run All Cells did not finish within {RUN_ALL_SECONDS} s: "
        f"{_describe(state)}; screenshot in {SCREENSHOT}"
    )
    assert not state["dialogs"], f"JupyterLab asks something in a dialog: {state['dialogs']}"
    errors = "\n\n".join(
        f"code cell {error['cell']}:\n{error['text'][-2000:]}" for error in state["errors"]
    )
    assert not state["errors"], f"the notebook shows error output in JupyterLab:\n{errors}"
    # Every shown prompt has its cell's number, so collapsed cells ran too, in order.
    assert state["prompts"] == expected_prompts, (
        f"not every code cell ran once, in order, in a fresh kernel: {_describe(state)}"
    )
    shown = "\n".join(state["outputs"])
    for text in EXPECTED_TEXT:
        assert text in shown, f"{text!r} is not among the outputs JupyterLab shows:\n{shown}"
    # Not an error: a notebook may link an image on the web (a Binder badge); it is just not shown.
    refused = f"; refused to load {', '.join(blocked_requests)}" if blocked_requests else ""
    print(f"\nnotebook 01 ran in JupyterLab in {seconds:.0f} s; screenshot {SCREENSHOT}{refused}")
