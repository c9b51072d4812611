"""The explorers of notebook 02 in a real browser: JupyterLab itself, Debian's Chromium driven by Playwright.

One JupyterLab server (a temporary copy of ``notebooks/``, the smoke profile) and one headless Chromium serve the
whole module. The notebook is opened and run with *Run All Cells*, as a learner would; then the parameter explorer
and the VRAM explorer each get a slider moved with the keyboard and a dropdown changed, and their summary line must
show the numbers that :mod:`peftlab.widgets`' pure functions give for the new settings, and their chart must be
redrawn. A learner must see no JupyterLab news pop-up and no error box in the explorers.

Screenshots (before and after each change, and the whole page) go to ``test-artifacts/browser/``, with the
server's log and the browser's console. Needs Debian's Chromium (``apt-get install -y chromium``) and the
``playwright`` package (never ``playwright install``: nothing downloads a browser). Outside CI a machine without
them skips; in CI (``CI`` set) their absence fails.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from peftlab import memory, widgets
from peftlab.params import ParameterCount

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # checked in the fixture: skip outside CI, fail in CI
    sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
NOTEBOOK = "02_memory_anatomy.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
# What this kind of machine needs (as root, on a closed network): no sandbox, no GPU, and none of Chromium's own
# connections to Google's hosts (refused here, many at a time).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}  # a laptop's screen
KERNEL_IDLE = re.compile(r"\|\s*Idle$")  # the status bar: "Python 3 (ipykernel) | Idle"
NEWS = "Would you like to get notified about official Jupyter news?"
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
# Every wait is bounded. The smoke run of notebook 02 takes about 30-45 s on 2 cores; the limits leave room for a
# loaded CI machine without letting a stuck run hang the suite.
SERVER_START_S = 90
PAGE_LOAD_MS = 90_000
RUN_ALL_S = 420
UPDATE_MS = 60_000  # one explorer recomputation (a meta model built, a figure drawn) after a change
ACTION_MS = 30_000  # any other browser action


def _unavailable(what: str, how: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide {what} for the browser test: {how}")
    pytest.skip(f"{what} not available here: {how}")


def _check_tools() -> None:
    if sync_playwright is None:
        _unavailable("the playwright package", "pip install playwright (never `playwright install`)")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"Debian's Chromium ({CHROMIUM})", "apt-get install -y chromium")
    if importlib.util.find_spec("jupyterlab") is None:
        _unavailable("JupyterLab", 'pip install -e ".[lab,test]" (make install)')


# ----------------------------------------------------------------------------------------------------------------
# The JupyterLab server
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (its kernels), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _log_tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-chars:]


def _app_settings(root: Path) -> list[str]:
    """The options that give JupyterLab the defaults ``make install`` gives it.

    ``make install`` copies ``tools/jupyterlab-overrides.json`` (no news pop-up, no update check) to
    ``{sys.prefix}/share/jupyter/lab/settings/overrides.json``, JupyterLab's application settings directory. A venv
    that has it is used as it is. One installed before that step existed gets the same file through
    ``--LabApp.app_settings_dir`` (the option that names that directory), in a temporary copy of the directory.
    """
    installed = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    source = REPO / "tools" / "jupyterlab-overrides.json"
    if (installed / "overrides.json").exists() or not source.exists():
        return []
    settings = root / "app-settings"
    if installed.is_dir():
        shutil.copytree(installed, settings)
    settings.mkdir(exist_ok=True)
    shutil.copy(source, settings / "overrides.json")
    return [f"--LabApp.app_settings_dir={settings}"]


class Lab:
    def __init__(self, url: str, token: str, log: Path):
        self.url, self.token, self.log = url, token, log


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free local port, serving a temporary copy of notebooks/ in the smoke profile; stopped (with
    its kernels) at the end. Its own config, data, runtime, settings and workspace folders keep it apart from the
    user's, and autosave away from the repository's notebooks."""
    _check_tools()
    root = tmp_path_factory.mktemp("lab")
    notebooks = root / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    log = root / "jupyter-server.log"
    env = {
        **os.environ,
        "PEFTLAB_PROFILE": "smoke",
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
    }
    env.pop("MPLBACKEND", None)  # the kernel draws inline, as in a learner's JupyterLab
    command = [
        sys.executable,
        "-m",
        "jupyterlab",  # the server itself (python -m jupyter lab would run it as a child, out of our reach)
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={notebooks}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",  # as make lab starts it
        *_app_settings(root),
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=notebooks, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"JupyterLab exited with {server.returncode} before it answered. Its log:\n{_log_tail(log)}"
                )
            try:
                request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {url} within {SERVER_START_S} s. Its log:\n{_log_tail(log)}")
            time.sleep(0.5)
        yield Lab(url, token, log)
    finally:
        kernels = _descendants(server.pid)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # the server shuts its kernels down, then exits
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        for pid in kernels:  # any the server left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "jupyter-server.log")


# ----------------------------------------------------------------------------------------------------------------
# The browser and the notebook
# ----------------------------------------------------------------------------------------------------------------
def _prompts(page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                  .map(e => e.textContent.trim())"""
    )


def _run_all(page, code_cells: int) -> float:
    """Run > Run All Cells, then wait until every code cell has run (a fresh kernel counts them 1, 2, ... in order);
    fail at once when the run stops early (an error). Returns the seconds it took."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.get_by_text("Run All Cells", exact=True).click()
    start = time.monotonic()
    expected = [f"[{i}]:" for i in range(1, code_cells + 1)]
    prompts = _prompts(page)
    while time.monotonic() - start < RUN_ALL_S:
        prompts = _prompts(page)
        if prompts == expected:
            return time.monotonic() - start
        if len(prompts) == code_cells and "[*]:" not in prompts and time.monotonic() - start > 5:
            errors = page.locator(f".jp-Notebook {STDERR}").all_text_contents()
            pytest.fail(f"Run All stopped early (prompts {prompts}); error outputs:\n" + "\n---\n".join(errors))
        time.sleep(1)
    pytest.fail(f"Run All did not finish within {RUN_ALL_S} s; prompts: {prompts}")


class Session:
    """The page with the run notebook, what the browser printed, and the screenshots taken so far."""

    def __init__(self, page, console: list[str], run_s: float):
        self.page, self.console, self.run_s = page, console, run_s
        self.shots = 0

    def shoot(self, target, name: str) -> Path:
        self.shots += 1
        path = ARTIFACTS / f"{self.shots:02d}_{name}.png"
        target.screenshot(path=str(path))
        return path

    def cell(self, source: str):
        """The code cell whose whole source is ``source``, scrolled into view."""
        editors = self.page.locator(".jp-Notebook .jp-CodeCell .cm-content")
        sources = [text.strip() for text in editors.all_text_contents()]
        assert sources.count(source) == 1, f"no single code cell {source!r} in {NOTEBOOK}: {sources}"
        cell = self.page.locator(".jp-Notebook .jp-CodeCell").nth(sources.index(source))
        cell.scroll_into_view_if_needed()
        return cell


@pytest.fixture(scope="module")
def session(lab, tmp_path_factory):
    """Headless Chromium (a fresh profile) on the notebook, run once with Run All Cells."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    code_cells = sum(
        cell["cell_type"] == "code" for cell in json.loads((REPO / "notebooks" / NOTEBOOK).read_text())["cells"]
    )
    console: list[str] = []
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport=VIEWPORT,
                timeout=60_000,
            )
        except PlaywrightError as error:
            pytest.fail(f"Playwright could not start {CHROMIUM}: {error}")
        try:
            context.set_default_timeout(ACTION_MS)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda message: console.append(f"console.{message.type}: {message.text}"))
            page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}", timeout=PAGE_LOAD_MS)
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=PAGE_LOAD_MS)
            _kernel_idle(page)  # the kernel is up
            run_s = _run_all(page, code_cells)
            print(f"\nRun All Cells of {NOTEBOOK} in the browser: {run_s:.1f} s")
            yield Session(page, console, run_s)
        finally:
            try:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                (ARTIFACTS / "browser-console.log").write_text("\n".join(console) + "\n")
                context.close()
            except PlaywrightError:
                pass


# ----------------------------------------------------------------------------------------------------------------
# Helpers for one explorer
# ----------------------------------------------------------------------------------------------------------------
def _explorer(cell):
    """The explorer's widget box in its cell, once rendered: its summary line and its chart."""
    box = cell.locator(".jp-Cell-outputArea .widget-vbox").first
    expect(box).to_be_visible(timeout=UPDATE_MS)
    expect(box.locator(".widget-html-content").first).not_to_be_empty(timeout=UPDATE_MS)
    expect(box.locator(".widget-output img").first).to_be_visible(timeout=UPDATE_MS)
    return box


def _summary(box) -> str:
    return " ".join(box.locator(".widget-html-content").first.inner_text().split())


def _chart(box) -> str:
    return box.locator(".widget-output img").first.get_attribute("src")


def _dropdown(box, label: str):
    return box.locator(".widget-dropdown", has=box.page.locator("label", has_text=re.compile(f"^{label}$"))).locator(
        "select"
    )


def _slider(box, label: str):
    return box.locator(".widget-slider", has=box.page.locator("label", has_text=re.compile(f"^{label}$")))


def _step_slider(box, label: str, steps: int, value: str) -> None:
    """Focus the slider's handle and press the arrow key ``steps`` times (right if positive): what a keyboard user
    does. Then its readout must show ``value``."""
    slider = _slider(box, label)
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(abs(steps)):
        handle.press("ArrowRight" if steps > 0 else "ArrowLeft")
    expect(slider.locator(".widget-readout")).to_have_text(value, timeout=UPDATE_MS)


def _kernel_idle(page, timeout: float = PAGE_LOAD_MS):
    """Wait until the status bar says the kernel is idle."""
    page.get_by_text(KERNEL_IDLE).first.wait_for(timeout=timeout)


def _wait_for_new_chart(box, before: str) -> str:
    """The chart is drawn again after a change: once the kernel is idle again (the summary line is set before the
    figure is drawn), the image's data differs from ``before``."""
    _kernel_idle(box.page, UPDATE_MS)
    deadline = time.monotonic() + UPDATE_MS / 1000
    while time.monotonic() < deadline:
        images = box.locator(".widget-output img")
        if images.count() == 1:
            src = images.first.get_attribute("src") or ""
            if src.startswith("data:image/png;base64,") and src != before:
                assert base64.b64decode(src.split(",", 1)[1]) != base64.b64decode(before.split(",", 1)[1])
                return src
        time.sleep(0.25)
    pytest.fail("the explorer's chart was not redrawn after the change")


def _expect_summary(box, *parts: str) -> str:
    """Wait until the summary line holds every one of ``parts`` (each computed by the pure functions)."""
    summary = box.locator(".widget-html-content").first
    for part in parts:
        expect(summary).to_contain_text(part, timeout=UPDATE_MS)
    return _summary(box)


def _parameter_parts(architecture: str, method: str, **knobs) -> tuple[str, ...]:
    report = widgets.parameter_report(architecture, method, **knobs)
    return f"{method} on {architecture}", f"trainable {report.trainable:,} of {report.total:,} parameters"


def _vram_parts(architecture: str, method: str, batch_size: int, seq_len: int, **knobs) -> tuple[str, ...]:
    setup = memory.Setup(method=method, batch_size=batch_size, seq_len=seq_len)
    estimate = widgets.vram_report(architecture, setup, **knobs)
    counts = ParameterCount(estimate.trainable_parameters, estimate.total_parameters)
    return widgets.fit_summary(estimate), f"{method} on {architecture}: {counts}"


def _no_error_boxes(cell) -> None:
    errors = cell.locator(STDERR).all_text_contents()
    assert errors == [], "error output in the explorer's cell:\n" + "\n---\n".join(errors)
    assert cell.get_by_text("Error displaying widget").count() == 0


# ----------------------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------------------
def test_parameter_explorer_follows_its_slider_and_dropdown(session):
    cell = session.cell("widgets.parameter_explorer()")
    box = _explorer(cell)
    start = _expect_summary(box, *_parameter_parts("smollm2-135m", "lora", r=8))  # the explorer's defaults
    chart = _chart(box)
    session.shoot(cell, "parameter_explorer_before")

    _step_slider(box, "LoRA rank r", +1, "16")  # 8 -> 16
    rank_16 = _expect_summary(box, *_parameter_parts("smollm2-135m", "lora", r=16))
    assert "921,600" in rank_16 and rank_16 != start  # 30 layers x 16 x (q 576+576, v 576+192)
    chart = _wait_for_new_chart(box, chart)
    session.shoot(cell, "parameter_explorer_rank_16")

    _dropdown(box, "method").select_option("adapter")
    _expect_summary(box, *_parameter_parts("smollm2-135m", "adapter", bottleneck=64))
    expect(_slider(box, "adapter bottleneck")).to_be_visible()  # the knobs follow the method
    expect(_slider(box, "LoRA rank r")).to_be_hidden()
    _wait_for_new_chart(box, chart)
    session.shoot(cell, "parameter_explorer_adapter")
    _no_error_boxes(cell)


def test_vram_explorer_follows_its_slider_and_dropdown(session):
    cell = session.cell("widgets.vram_explorer()")
    box = _explorer(cell)
    start = _expect_summary(box, *_vram_parts("llama-3-8b", "lora", batch_size=4, seq_len=512, r=8))  # defaults
    chart = _chart(box)
    session.shoot(cell, "vram_explorer_before")

    _step_slider(box, "batch", +2, "16")  # 4 -> 8 -> 16
    batch_16 = _expect_summary(box, *_vram_parts("llama-3-8b", "lora", batch_size=16, seq_len=512, r=8))
    assert batch_16 != start
    chart = _wait_for_new_chart(box, chart)
    session.shoot(cell, "vram_explorer_batch_16")

    _dropdown(box, "architecture").select_option("llama-2-7b")
    architecture = _expect_summary(box, *_vram_parts("llama-2-7b", "lora", batch_size=16, seq_len=512, r=8))
    assert architecture != batch_16
    _wait_for_new_chart(box, chart)
    session.shoot(cell, "vram_explorer_llama_2_7b")
    _no_error_boxes(cell)


def test_what_a_learner_sees(session):
    """The page after the run and the changes: no news pop-up, no error box in either explorer."""
    page = session.page
    session.shoot(page, "page")
    for source in ("widgets.parameter_explorer()", "widgets.vram_explorer()"):
        _no_error_boxes(session.cell(source))
    assert page.get_by_text(NEWS).count() == 0, (
        "JupyterLab asks a learner about its news: {sys.prefix}/share/jupyter/lab/settings/overrides.json (make "
        "install copies tools/jupyterlab-overrides.json there) is missing or does not turn fetchNews off"
    )
    uncaught = [line for line in session.console if line.startswith("pageerror:")]
    assert uncaught == [], "uncaught errors in the page:\n" + "\n".join(uncaught)
