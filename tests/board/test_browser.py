"""The board in headless Chromium: every tab opens, a tiny grid launched from the form finishes and shows up
in Results with the same rows as the CLI's run of it, Examples filters, the Playground answers, a reload
reattaches to the job, and no request leaves 127.0.0.1. A screenshot of each tab is saved as an artifact
(``$TUNELAB_BOARD_SCREENSHOTS``, default ``runs/board-screenshots``)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="tunelab board needs gradio: pip install 'tunelab[board]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright's Python package")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GRID = """name: tiny-ui
model: {name: tiny}
data: {max_eval: 4, max_train: 8}
train: {steps: 2, batch_size: 4}
eval: {batch_size: 8, max_new_tokens: 4}
methods: [{name: icl, k: 0, label: zero_shot}, {name: prompt_tuning, num_virtual_tokens: 4, label: pt}]
tasks: [date_format]
seeds: [0]
"""
SHOTS = Path(os.environ.get("TUNELAB_BOARD_SCREENSHOTS", "runs/board-screenshots"))


def _chromium() -> str:
    for name in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if name and Path(name).is_file():
            return name
    pytest.skip("needs Debian's chromium for the browser tests (apt-get install -y chromium; `make browser`)")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(base URL, runs folder) of a board served in this process on a free loopback port."""
    from tunelab.board.app import serve
    from tunelab.serve.local import free_port

    runs = tmp_path_factory.mktemp("board-runs")
    port = free_port()
    demo = serve(runs, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", runs
    demo.close()


@pytest.fixture(scope="module")
def page(board):
    executable = _chromium()
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
               else outside.append(r.url))
        tab.set_default_timeout(60_000)
        sync_api.expect.set_options(timeout=60_000)  # a loaded 2-core machine: UI updates can take seconds
        tab.goto(board[0])
        tab.wait_for_selector("#tab-results", state="attached")
        tab.outside = outside  # type: ignore[attr-defined]
        yield tab
        browser.close()


def _open(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _pick(page, elem: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown (nothing to do when it is already chosen)."""
    if page.locator(f"#{elem} input").input_value() == option:
        return
    page.locator(f"#{elem} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_launch_a_grid_from_the_form_and_watch_it_finish(page, board):
    _open(page, "Launch")
    editor = page.locator("#launch-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(GRID)
    sync_api.expect(page.locator("#launch-field-train-steps input, #launch-field-train-steps textarea")
                    ).to_have_value("2")  # the fields re-read the YAML
    sync_api.expect(page.locator("#launch-preview textarea")).to_have_value(re.compile("tunelab compare --config"))
    time.sleep(2)  # let the editor's last input events re-read the fields before one is edited
    steps = page.locator("#launch-field-train-steps input, #launch-field-train-steps textarea")
    steps.fill("")
    steps.press_sequentially("3")  # typed, as a user would: an override of the YAML's 2
    sync_api.expect(page.locator("#launch-preview textarea")).to_have_value(re.compile("train.steps=3"))
    page.locator("#launch-start").click()
    sync_api.expect(page.locator("#launch-message")).to_contain_text("started")
    sync_api.expect(page.locator("#launch-status")).to_contain_text("finished", timeout=240_000)
    sync_api.expect(page.locator("#launch-cells")).to_contain_text("done")
    _shot(page, "launch")


def test_a_grid_from_the_ui_writes_the_cli_rows(board, page):
    """The same grid (the job's saved YAML) run by `tunelab compare` gives the same cells and results."""
    from rich.console import Console

    from tunelab.board import jobs
    from tunelab.compare import compare
    from tunelab.compare.store import Store

    _, runs = board
    job = jobs.list_jobs(runs)[0]
    outcome = compare(job.config, runs.parent / "cli-out", progress=False, console=Console(quiet=True))
    columns = ("key", "method", "task", "seed", "status", "quality", "metrics", "trainable_params", "n_eval")
    with Store(job.store) as ui, Store(outcome.store) as cli:
        got = sorted(tuple(str(r.data[c]) for c in columns) for r in ui.rows())
        want = sorted(tuple(str(r.data[c]) for c in columns) for r in cli.rows())
        assert got == want and len(got) == 2
        assert {r.data["config"]["train"]["steps"] for r in ui.rows()} == {3}  # the form's override was applied
        ui_pred = {r.data["key"]: Path(r.data["predictions"]).read_text() for r in ui.rows()}
        cli_pred = {r.data["key"]: Path(r.data["predictions"]).read_text() for r in cli.rows()}
        assert ui_pred == cli_pred


def test_results_show_the_new_store(page):
    _open(page, "Results")
    page.get_by_role("button", name="refresh list").click()
    _pick(page, "results-store", "tiny-ui/results.sqlite")
    sync_api.expect(page.locator("#results-summary")).to_contain_text("2 cells done")
    sync_api.expect(page.locator("#results-quality")).to_contain_text("zero_shot")
    sync_api.expect(page.locator("#results-claims")).to_contain_text("not measured")
    time.sleep(1)  # plots draw after their data arrives
    _shot(page, "results")


def test_examples_filter(page):
    _open(page, "Examples")
    page.reload()  # a new page: the store list includes the new store, and the job is reattached below
    page.wait_for_selector("#tab-results", state="attached")
    _open(page, "Examples")
    _pick(page, "examples-store", "tiny-ui/results.sqlite")
    count = page.locator("#examples-count")
    sync_api.expect(count).to_contain_text("of 4 examples")
    sync_api.expect(page.locator("#examples-table")).to_contain_text("date_format-eval-0000")
    before = count.inner_text()
    page.get_by_label("A better than B").check()
    sync_api.expect(count).not_to_have_text(before)
    shown = int(re.search(r"(\d+) of 4", count.inner_text()).group(1))
    page.get_by_label("methods disagree").check()
    sync_api.expect(count).to_contain_text("of 4 examples")
    assert 0 <= shown <= 4
    _shot(page, "examples")


def test_launch_tab_reattaches_after_reload(page):
    page.reload()
    page.wait_for_selector("#tab-results", state="attached")
    _open(page, "Launch")
    sync_api.expect(page.locator("#launch-status")).to_contain_text("tiny-ui")
    sync_api.expect(page.locator("#launch-status")).to_contain_text("finished")


def test_playground_answers_side_by_side(page):
    _open(page, "Playground")
    _pick(page, "play-folder", "tiny-ui/cells")
    sync_api.expect(page.locator("#play-model input, #play-model textarea")).to_have_value("tiny")
    page.get_by_label("(base model)").check()
    page.locator("#play-adapters label", has_text="prompt_tuning").first.click()
    page.locator("#play-input textarea").fill("2031-04-20")
    page.locator("#play-send").click()
    sync_api.expect(page.locator("#play-message")).to_contain_text("2 answers")
    sync_api.expect(page.locator("#play-answers")).to_contain_text("prompt_tuning")
    _shot(page, "playground")


def test_no_request_left_loopback(page):
    assert page.outside == []  # type: ignore[attr-defined]


HEADER_SPLITS = """(sel) => {
  const split = [];
  for (const cell of document.querySelectorAll(`${sel} .header-cell`)) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set(Array.from(range.getClientRects()).filter(r => r.width > 0).map(r => Math.round(r.top)));
        if (lines.size > 1) split.push(m[0]);
      }
    }
  }
  return split;
}"""


def test_table_headers_wrap_between_words_only(runs, page):
    """At a narrow width, no header word of the Results tables is split across lines (Gradio's wrapped
    cells break anywhere: "trainab|le_params"). A board over conftest's hand-written store, in a new tab
    of the module's browser."""
    from tunelab.board.app import serve
    from tunelab.serve.local import free_port

    port = free_port()
    demo = serve(runs, port=port, block=False)
    tab = page.context.browser.new_page(viewport={"width": 640, "height": 900})
    try:
        tab.goto(f"http://127.0.0.1:{port}/")
        sync_api.expect(tab.locator("#results-quality")).to_contain_text("zero_shot", timeout=60_000)
        tab.get_by_text("claims: every group measured").click()
        sync_api.expect(tab.locator("#results-claims-detail .header-cell").first).to_be_visible(timeout=60_000)
        time.sleep(1)  # column widths settle after the data arrives
        for table in ("#results-quality", "#results-claims", "#results-claims-detail"):
            assert tab.locator(f"{table} .header-cell").count() >= 3
            assert tab.evaluate(HEADER_SPLITS, table) == [], table
    finally:
        tab.close()
        demo.close()
