"""Staying signed in, in a real Chromium: the sign-in cookie survives a reload and reaches a new
tab, another browser is not signed in, and signing out or an account change ends it."""

from __future__ import annotations

import time

import pytest

from app import session_cookie
from store import db as storedb
from store import users
from tests import test_browser
from tests.cli_helpers import run_cli
from tests.fixtures_app import make_workspace, seed_round
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    UI_TIMEOUT_MS,
    add_account,
    sign_in,
    wait_idle,
)

pytestmark = pytest.mark.browser

PROMPT = "Prompt number 1: say something nice."
serve = test_browser.serve  # the fixture that starts `prefloop serve`


@pytest.fixture
def new_browser(serve):
    """new_browser() opens a separate browser (a Chromium context with its own cookies) whose
    pages are tabs; JavaScript dialogs are recorded (and must stay none)."""
    from playwright.sync_api import sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)

        def new_context():
            ctx = chromium.new_context(viewport={"width": 1400, "height": 1200})
            ctx.set_default_timeout(UI_TIMEOUT_MS)
            ctx.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            return ctx

        try:
            yield new_context
        finally:
            chromium.close()
    assert dialogs == [], f"the page opened JavaScript dialogs: {dialogs}"


@pytest.fixture
def page(new_browser):
    """The first tab of one browser."""
    return new_browser().new_page()


def expect_signed_in(pg, who: str) -> None:
    from playwright.sync_api import expect

    expect(pg.get_by_text(f"Signed in as {who}")).to_be_visible()
    expect(pg.get_by_text(PROMPT, exact=True)).to_be_visible()
    expect(pg.get_by_role("heading", name="Sign in")).to_have_count(0)
    wait_idle(pg)


def expect_login_page(pg) -> None:
    from playwright.sync_api import expect

    expect(pg.get_by_role("heading", name="Sign in")).to_be_visible()
    wait_idle(pg)
    body = pg.locator("body").inner_text()
    assert "Signed in as" not in body and PROMPT not in body


def session_cookies(pg, ws: storedb.Workspace) -> list[dict]:
    name = session_cookie.cookie_name(ws)
    return [c for c in pg.context.cookies() if c["name"] == name]


def wait_cookie(pg, ws: storedb.Workspace, present: bool) -> list[dict]:
    """The page's sign-in cookies once one is there (present) or none is (the writer runs in
    the browser after the script's run)."""
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        found = session_cookies(pg, ws)
        if bool(found) == present or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def sessions_of(ws: storedb.Workspace, name: str) -> int:
    with storedb.connect(ws) as con:
        return int(
            con.execute("SELECT count(*) FROM sessions WHERE user_name = ?", [name]).fetchone()[0]
        )


@pytest.fixture
def app_ws(tmp_path) -> storedb.Workspace:
    ws = make_workspace(tmp_path / "ws")
    seed_round(ws, n_groups=1, k=2)
    add_account(ws, "ann")
    return ws


def test_reload_and_new_tab_stay_signed_in_another_browser_does_not(
    serve, new_browser, page, app_ws
):
    url = serve(app_ws)
    page.goto(url)
    expect_login_page(page)
    assert session_cookies(page, app_ws) == []

    sign_in(page, "ann")
    expect_signed_in(page, "ann (annotator)")
    (cookie,) = wait_cookie(page, app_ws, present=True)
    assert users.is_session_token(cookie["value"])
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain http on localhost
    lifetime_h = (cookie["expires"] - time.time()) / 3600  # ends with the server-side session
    assert users.SESSION_HOURS - 0.1 < lifetime_h <= users.SESSION_HOURS
    assert sessions_of(app_ws, "ann") == 1  # the server knows the token only by its hash
    with storedb.connect(app_ws) as con:
        stored = con.execute("SELECT token_hash FROM sessions").fetchone()[0]
    assert stored != cookie["value"] and cookie["value"].encode() not in app_ws.db_path.read_bytes()

    page.reload()
    expect_signed_in(page, "ann (annotator)")

    tab = page.context.new_page()  # a second tab of the same browser
    tab.goto(url + "?page=annotator")
    expect_signed_in(tab, "ann (annotator)")
    tab.close()
    assert sessions_of(app_ws, "ann") == 1  # the same session, not a new sign-in

    stranger = new_browser().new_page()  # another browser: no cookie, no sign-in
    stranger.goto(url)
    expect_login_page(stranger)


def test_sign_out_clears_the_cookie_and_ends_the_session(serve, page, app_ws):
    from playwright.sync_api import expect

    url = serve(app_ws)
    page.goto(url)
    sign_in(page, "ann")
    expect_signed_in(page, "ann (annotator)")
    (cookie,) = wait_cookie(page, app_ws, present=True)
    tab = page.context.new_page()
    tab.goto(url)
    expect_signed_in(tab, "ann (annotator)")

    page.locator(".st-key-sign_out button").click()
    expect(page.get_by_text("Signed out.")).to_be_visible()
    expect_login_page(page)
    assert wait_cookie(page, app_ws, present=False) == []
    assert sessions_of(app_ws, "ann") == 0

    page.reload()
    expect_login_page(page)
    tab.reload()  # every tab of the browser shared the cookie
    expect_login_page(tab)

    # a stolen copy of the old cookie signs nobody in
    page.context.add_cookies([{**cookie, "expires": time.time() + 3600}])
    page.reload()
    expect_login_page(page)
    expect(page.get_by_text("Your session ended; sign in again.")).to_be_visible()
    assert wait_cookie(page, app_ws, present=False) == []


@pytest.mark.parametrize(
    "change", [["set-role", "ann", "--role", "researcher"], ["disable", "ann"]]
)
def test_account_change_ends_the_cookie_session(serve, page, app_ws, change):
    from playwright.sync_api import expect

    page.goto(serve(app_ws))
    sign_in(page, "ann")
    expect_signed_in(page, "ann (annotator)")
    wait_cookie(page, app_ws, present=True)

    run_cli("users", *change, "--workspace", app_ws.root)  # through the app's database owner
    page.reload()
    expect_login_page(page)
    expect(page.get_by_text("Your session ended; sign in again.")).to_be_visible()
    assert wait_cookie(page, app_ws, present=False) == []
    if change[0] == "set-role":  # signing in again shows the new role
        sign_in(page, "ann")
        expect(page.get_by_text("Signed in as ann (researcher)")).to_be_visible()


def test_a_forged_cookie_is_never_used_or_shown(serve, page, app_ws):
    from playwright.sync_api import expect

    url = serve(app_ws)
    name = session_cookie.cookie_name(app_ws)
    forged = "<img src=x onerror=alert(1)>"
    page.context.add_cookies([{"name": name, "value": forged.replace(" ", "_"), "url": url}])
    page.goto(url)
    expect_login_page(page)
    assert wait_cookie(page, app_ws, present=False) == []  # cleared, not looked up
    assert page.locator("img").count() == 0
    assert "onerror" not in page.content()
    expect(page.get_by_text("Your session ended")).to_have_count(0)
