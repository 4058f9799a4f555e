"""The served web app in a real Chromium: rank a group by clicks, and untrusted text stays text."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from labeling import annotation
from store import db as storedb
from store import labels
from tests.fixtures_app import XSS, free_port, make_workspace, seed_round

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
START_TIMEOUT_S = 30
UI_TIMEOUT_MS = 15_000


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://localhost:{port}/_stcore/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefloop serve exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the app did not answer {url} in {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[storedb.Workspace, int]]:
    """`prefloop serve` on a free port over a workspace with one round; stopped afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium) for browser tests")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ws = make_workspace(tmp_path / "ws")
    seed_round(ws, n_groups=2, k=3, first_texts=[XSS])
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--workspace", str(ws.root)]
            + ["--port", str(port)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(port, proc, log)
        yield ws, port
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def test_rank_a_group_in_the_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ws, port = served
    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://localhost:{port}/")

            name = page.get_by_label("Annotator name")
            name.fill("pat")
            name.press("Enter")
            expect(page.locator(".st-key-cand_C")).to_be_visible()
            expect(page.get_by_text("Done 0 / left 2 in this round")).to_be_visible()

            # untrusted candidate text is shown literally, never as HTML or Markdown
            expect(page.get_by_text(XSS, exact=True)).to_be_visible()
            assert XSS in page.locator("body").inner_text()
            assert page.locator('img[src="x"]').count() == 0
            assert page.locator("strong", has_text="bold").count() == 0

            page.locator(".st-key-rank_C button").click()
            expect(page.get_by_text("1. C", exact=False)).to_be_visible()
            page.locator(".st-key-tie_A button").click()
            expect(page.get_by_text("1. C = A", exact=False)).to_be_visible()
            page.locator(".st-key-rank_B button").click()
            expect(page.get_by_text("1. C = A  2. B", exact=False)).to_be_visible()
            page.screenshot(path=str(tmp_path / "annotator.png"), full_page=True)
            page.locator(".st-key-submit button").click()
            expect(page.get_by_text("Done 1 / left 1 in this round")).to_be_visible()
            expect(page.get_by_text("Prompt number 2: say something nice.")).to_be_visible()

            page.get_by_text("Researcher", exact=True).click()
            expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "researcher.png"), full_page=True)
        finally:
            browser.close()
    assert dialogs == []

    with storedb.connect(ws) as con:
        df = labels.labels(con)
        group = labels.next_group(con, "nobody", 1)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row["group_id"], row["annotator"], row["flags"]) == (group.group_id, "pat", [])
    order = annotation.display_order("pat", group.group_id, len(group.candidate_ids))
    ids = {annotation.letter(i): group.candidate_ids[p] for i, p in enumerate(order)}
    assert row["ranking"] == [[ids["C"], ids["A"]], [ids["B"]]]
