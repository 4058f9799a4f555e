"""The served web app in a real Chromium: sign in and out, rank by clicks and by keyboard
shortcuts, skip and flag all bad by key, and untrusted text stays text."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labeling import annotation, safe_text
from store import db as storedb
from store import labels, users
from tests.fixtures_app import XSS, SeededRound, free_port, make_workspace, seed_round

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
PASSWORD = "correct horse battery"
EM_SPACES = "\u2003\u2003"  # what the page puts between places of "Your ranking: …"


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


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def add_account(ws: storedb.Workspace, name: str, role: str = "annotator") -> None:
    with storedb.connect(ws) as con:
        users.add_user(con, name, role, PASSWORD)


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[[storedb.Workspace], str]]:
    """serve(ws) starts `prefloop serve` on a free port over ws and returns its URL; every
    server started is stopped afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium) for browser tests")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    procs: list[subprocess.Popen] = []

    def start(ws: storedb.Workspace) -> str:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
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
        procs.append(proc)
        _wait_healthy(port, proc, log)
        return f"http://localhost:{port}/"

    try:
        yield start
    finally:
        for proc in procs:
            _stop(proc)


@pytest.fixture
def page(serve, tmp_path):
    """A fresh headless Chromium page; JavaScript dialogs are recorded (and must stay none)."""
    from playwright.sync_api import sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1500})
            pg.set_default_timeout(UI_TIMEOUT_MS)
            pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            yield pg
            if not pg.is_closed():
                pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        finally:
            browser.close()
    assert dialogs == [], f"the page opened JavaScript dialogs: {dialogs}"


# ----------------------------------------------------------------------------------------------
# page helpers


def wait_idle(page) -> None:
    """Wait until the app's script has finished its run (Streamlit marks the app root)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stApp")).to_have_attribute("data-test-script-state", "notRunning")


def sign_in(page, name: str, password: str = PASSWORD, *, with_enter: bool = False) -> None:
    """Fill in the sign-in form and submit it (button, or Enter in the password field)."""
    page.locator(".st-key-login_name input").fill(name)
    password_box = page.locator(".st-key-login_password input")
    password_box.fill(password)
    if with_enter:
        password_box.press("Enter")
    else:
        page.get_by_role("button", name="Sign in").click()


def summary(page, *, fresh: bool = True):
    """The "Your ranking: …" line of the annotator page (fresh: not a faded element left over
    from the previous run while the script reruns, which can be drawn next to the new one)."""
    boxes = page.get_by_test_id("stElementContainer")
    if fresh:
        boxes = boxes.and_(page.locator('[data-stale="false"]'))
    return boxes.filter(has=page.get_by_text("Your ranking:"))


def expect_ranking(page, places: str) -> None:
    """The summary shows these places ("1. B = C  2. A"; "" for none) and the run is over."""
    from playwright.sync_api import expect

    shown = places.replace("  ", EM_SPACES) if places else "(empty)"
    expect(summary(page)).to_have_text(f"Your ranking: {shown}")
    wait_idle(page)
    expect(summary(page, fresh=False)).to_have_count(1)  # no stale copy left behind


def focus_page(page) -> None:
    """Move the keyboard focus out of any input (where Streamlit ignores shortcuts)."""
    page.get_by_role("heading", name="Label candidates").click()
    wait_idle(page)
    tag = page.evaluate("document.activeElement ? document.activeElement.tagName : 'BODY'")
    assert tag not in ("INPUT", "TEXTAREA", "SELECT"), tag


def letter_ids(annotator: str, group_id: int, candidate_ids: list[int]) -> dict[str, int]:
    """Which candidate id the page shows under each letter for this annotator."""
    order = annotation.display_order(annotator, group_id, len(candidate_ids))
    return {annotation.letter(i): candidate_ids[p] for i, p in enumerate(order)}


def stored_labels(ws: storedb.Workspace, annotator: str):
    with storedb.connect(ws) as con:
        return labels.labels(con, annotator=annotator).set_index("group_id")


# ----------------------------------------------------------------------------------------------
# tests


def test_sign_in_wrong_password_and_sign_out(serve, page, tmp_path):
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    seed_round(ws, n_groups=1, k=2)
    add_account(ws, "ann")
    page.goto(serve(ws))

    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator(".st-key-login_name input")).to_be_visible()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    wait_idle(page)
    body = page.locator("body").inner_text()
    assert "Prompt number" not in body and "Signed in as" not in body

    sign_in(page, "ann", "not the password")
    expect(page.get_by_test_id("stAlertContentError")).to_contain_text("wrong name or password")
    wait_idle(page)
    expect(page.locator(".st-key-login_password input")).to_have_value("")
    assert "Prompt number" not in page.locator("body").inner_text()

    sign_in(page, "ann", with_enter=True)
    expect(page.get_by_text("Prompt number 1: say something nice.", exact=True)).to_be_visible()
    expect(page.get_by_text("Signed in as ann (annotator)")).to_be_visible()
    expect(page.get_by_role("heading", name="Label candidates")).to_be_visible()
    expect(page.get_by_role("heading", name="Sign in")).to_have_count(0)
    wait_idle(page)

    page.locator(".st-key-sign_out button").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("Signed out.")).to_be_visible()
    wait_idle(page)
    body = page.locator("body").inner_text()
    assert "Prompt number" not in body and "Signed in as" not in body


def test_rank_by_clicks_and_untrusted_text_stays_text(serve, page, tmp_path):
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    seeded = seed_round(ws, n_groups=2, k=3, first_texts=[XSS])
    add_account(ws, "pat", "researcher")  # a researcher labels too, and sees the Researcher page
    page.goto(serve(ws))
    sign_in(page, "pat")
    expect(page.locator(".st-key-cand_C")).to_be_visible()
    expect(page.get_by_text("Done 0 / left 2 in this round")).to_be_visible()
    wait_idle(page)

    # untrusted candidate text: its HTML is shown literally, its Markdown emphasis kept
    expect(page.get_by_text("<img src=x onerror=alert(1)>")).to_be_visible()
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator("strong", has_text="bold").count() == 1

    page.locator(".st-key-rank_C button").click()
    expect_ranking(page, "1. C")
    page.locator(".st-key-tie_A button").click()
    expect_ranking(page, "1. C = A")
    page.locator(".st-key-rank_B button").click()
    expect_ranking(page, "1. C = A  2. B")
    page.screenshot(path=str(tmp_path / "annotator.png"), full_page=True)
    page.locator(".st-key-submit button").click()
    expect(page.get_by_text("Done 1 / left 1 in this round")).to_be_visible()
    expect(page.get_by_text("Prompt number 2: say something nice.")).to_be_visible()
    wait_idle(page)

    page.get_by_text("Researcher", exact=True).click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    wait_idle(page)

    df = stored_labels(ws, "pat")
    group_id, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    assert list(df.index) == [group_id]
    row = df.loc[group_id]
    ids = letter_ids("pat", group_id, cids)
    assert row["flags"] == []
    assert row["ranking"] == [[ids["C"], ids["A"]], [ids["B"]]]


def _expect_group(page, seeded: SeededRound, index: int, done: int) -> None:
    from playwright.sync_api import expect

    left = len(seeded.group_ids) - done
    expect(page.get_by_text(f"Done {done} / left {left} in this round")).to_be_visible()
    expect(page.get_by_text(seeded.prompts[index], exact=True)).to_be_visible()
    expect_ranking(page, "")
    # the key-catching component mounts after the text is drawn; keys typed before are not seen
    expect(page.locator("html")).to_have_attribute("data-prefloop-keys", "on")


def test_keyboard_ranking_skip_and_all_bad(serve, page, tmp_path):
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    seeded = seed_round(ws, n_groups=3, k=4)
    add_account(ws, "kim")
    page.goto(serve(ws))
    sign_in(page, "kim")
    _expect_group(page, seeded, 0, done=0)

    # keys typed into the comment box are text, not shortcuts
    comment = "keys 1 2 t u s b typed here stay text"
    page.get_by_label("Comment (optional)").click()
    page.keyboard.type(comment)
    page.keyboard.press("Enter")  # a new line in the text area, not Submit
    wait_idle(page)
    expect_ranking(page, "")
    expect(page.get_by_text("Done 0 / left 3 in this round")).to_be_visible()
    focus_page(page)  # (Escape does not leave a Streamlit text area; a click elsewhere does)

    tie_armed = page.get_by_text("Tie armed: the next key ties with your last pick.")
    steps = [  # key, places shown afterwards, whether tie is armed
        ("2", "1. B", False),
        ("t", "1. B", True),
        ("3", "1. B = C", False),
        ("1", "1. B = C  2. A", False),
        ("u", "1. B = C", False),
        ("4", "1. B = C  2. D", False),
        ("t", "1. B = C  2. D", True),
        ("u", "1. B = C", False),  # undo disarms the tie and takes back D
        ("4", "1. B = C  2. D", False),
        ("t", "1. B = C  2. D", True),
        ("1", "1. B = C  2. D = A", False),
    ]
    for i, (key, places, armed) in enumerate(steps):
        if i == 5:  # Enter on an unfinished ranking does nothing (Submit is disabled)
            expect(page.locator(".st-key-submit button")).to_be_disabled()
            page.keyboard.press("Enter")
        page.keyboard.press(key)
        if armed:
            expect(tie_armed).to_be_visible()
        else:
            expect(tie_armed).to_have_count(0)
        expect_ranking(page, places)
    assert stored_labels(ws, "kim").empty
    expect(page.get_by_text("Done 0 / left 3 in this round")).to_be_visible()
    expect(page.locator(".st-key-submit button")).to_be_enabled()
    page.keyboard.press("Enter")
    expect(page.get_by_text("Saved your ranking.")).to_be_visible()
    _expect_group(page, seeded, 1, done=1)

    df = stored_labels(ws, "kim")
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    ids = letter_ids("kim", gid, cids)
    assert list(df.index) == [gid]
    assert df.loc[gid, "ranking"] == [[ids["B"], ids["C"]], [ids["D"], ids["A"]]]
    assert df.loc[gid, "flags"] == []
    assert df.loc[gid, "comment"] == comment

    # s skips the next group
    page.keyboard.press("s")
    expect(page.get_by_text("Skipped that group.")).to_be_visible()
    _expect_group(page, seeded, 2, done=2)
    gid = seeded.group_ids[1]
    df = stored_labels(ws, "kim")
    assert list(df.index) == [seeded.group_ids[0], gid]
    assert df.loc[gid, "flags"] == ["skipped"]
    assert df.loc[gid, "ranking"] is None

    # b flags the last one all bad, also with a ranking begun
    page.keyboard.press("3")
    expect_ranking(page, "1. C")
    page.keyboard.press("b")
    expect(page.get_by_text("Flagged all bad and saved.")).to_be_visible()
    expect(page.get_by_text(re.compile(r"No groups left for you in round \d+"))).to_be_visible()
    expect(page.get_by_text("Done 3 / left 0 in this round")).to_be_visible()
    wait_idle(page)
    gid = seeded.group_ids[2]
    df = stored_labels(ws, "kim")
    assert list(df.index) == seeded.group_ids
    assert df.loc[gid, "flags"] == ["all_bad"]
    assert df.loc[gid, "ranking"] == [sorted(seeded.candidate_ids[2])]


def test_keys_typed_ahead_are_not_lost(serve, page, tmp_path):
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    seeded = seed_round(ws, n_groups=2, k=4)
    add_account(ws, "kim")
    page.goto(serve(ws))
    sign_in(page, "kim")
    _expect_group(page, seeded, 0, done=0)

    page.keyboard.type("2t314")  # as a practised annotator types: no pause between keys
    page.keyboard.press("Enter")
    expect(page.get_by_text("Saved your ranking.")).to_be_visible(timeout=10_000)
    _expect_group(page, seeded, 1, done=1)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    ids = letter_ids("kim", gid, cids)
    ranking = stored_labels(ws, "kim").loc[gid, "ranking"]
    assert ranking == [[ids["B"], ids["C"]], [ids["A"]], [ids["D"]]]


class _Sink:
    """A local HTTP server that counts every request it gets (an image or link that loads)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.paths: list[str] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _count(self) -> None:
                sink.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_GET = do_HEAD = do_POST = _count

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _shown(locator) -> str:
    """The text a reader sees (the invisible word joiners that keep text inert left out)."""
    return locator.inner_text().replace(safe_text.WORD_JOINER, "")


def _assert_nothing_rendered(page, sink: _Sink) -> None:
    """No image or link to the sink, no coloured text, no typeset math on the page."""
    port = sink.url.rsplit(":", 1)[1]
    assert page.locator(f'img[src*=":{port}"], a[href*=":{port}"]').count() == 0
    assert page.locator(".stMarkdownColoredText, [class*=ColoredText]").count() == 0
    assert page.locator(".katex, math").count() == 0


def test_hostile_guidelines_names_and_filters_load_nothing_and_stay_text(serve, page, tmp_path):
    from playwright.sync_api import expect

    from store import rounds
    from store.records import LabelRecord

    sink = _Sink()
    try:
        ws = make_workspace(tmp_path / "ws")
        seeded = seed_round(ws, n_groups=3, k=3)
        name = f"![a]({sink.url}/name.png) :red[EVIL]"
        guide = f"Prefer **short** answers. ![g]({sink.url}/guide.png) :red[EXPIRED] $x^2$"
        typed = f"![f]({sink.url}/filter.png) :red[FILTER] $y$"
        records = []  # ann, bob and cy agree; the hostile name (stored before names were
        for g, c in zip(seeded.group_ids, seeded.candidate_ids, strict=True):  # checked) not
            records += [LabelRecord(g, who, [[x] for x in c]) for who in ("ann", "bob", "cy")]
            records.append(LabelRecord(g, name, [[x] for x in reversed(c)]))
        with storedb.connect(ws) as con:
            labels.add_labels(con, records)
            rounds.set_round_options(con, seeded.round_id, guidelines=guide)
        add_account(ws, "pat", "researcher")
        page.goto(serve(ws))
        sign_in(page, "pat")

        # Annotator page: the guidelines keep their bold, the rest shows as typed
        side = page.get_by_test_id("stSidebar")
        expect(side.locator("strong", has_text="short")).to_be_visible()
        expect(side).to_contain_text("answers. g :red[EXPIRED] $x^2$")  # g: the image's alt
        wait_idle(page)
        _assert_nothing_rendered(page, sink)

        # Researcher page: a filter typed into the freeze form, and the name, in the card
        page.get_by_text("Researcher", exact=True).click()
        page.get_by_text("Freeze a curated dataset version").click()
        page.locator(".st-key-cur_exclude input").fill(typed)
        page.locator(".st-key-freeze_submit button").click()
        expect(page.get_by_text("Froze dataset version d1.")).to_be_visible()
        expect(page.get_by_role("heading", name="Dataset version d1")).to_be_visible()
        wait_idle(page)
        shown = _shown(page.locator("body"))
        assert f"excluded: {typed}" in shown
        assert f"annotators (4): {name}, ann, bob, cy" in shown
        _assert_nothing_rendered(page, sink)

        # Team page: the name in the agreement warning
        page.get_by_text("Team", exact=True).click()
        warning = page.get_by_test_id("stAlertContentWarning")
        expect(warning).to_contain_text("Below the agreement threshold")
        wait_idle(page)
        assert f"their peers): {name}." in _shown(warning)
        _assert_nothing_rendered(page, sink)
        page.wait_for_timeout(500)  # a request started by the last page would have landed
        assert sink.paths == []
    finally:
        sink.close()
