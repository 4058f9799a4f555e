"""The sign-in cookie glue through streamlit.testing: which cookie a page adopts, what the
cookie writer is told to write or clear, and the account commands that end a session."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from app import actions, session_cookie
from store import db as storedb
from store import users
from tests.cli_helpers import cli
from tests.fixtures_app import make_workspace
from tests.test_app import APP

PASSWORD = "correct horse battery"


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    with storedb.connect(workspace) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    return workspace


@pytest.fixture
def cookies(monkeypatch) -> dict[str, str]:
    """The cookies the next page load is opened with (AppTest cannot send any)."""
    jar: dict[str, str] = {}
    monkeypatch.setattr(session_cookie, "browser_cookies", lambda: jar)
    return jar


def load(ws: storedb.Workspace) -> AppTest:
    """A fresh page load (a new browser tab or a reload)."""
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def writer(at: AppTest) -> dict | None:
    """What the page's cookie writer was told (None: no writer on the page)."""
    found = [
        e.proto
        for e in [*at.main, *at.sidebar]
        if getattr(e.proto, "component_name", "") == "prefloop_session_cookie"
    ]
    if not found:
        return None
    (proto,) = found
    return json.loads(proto.json)


def signed_in_as(at: AppTest) -> str | None:
    texts = [c.value for c in at.sidebar.caption]
    return next((t for t in texts if t.startswith("Signed in as")), None)


def session_count(ws: storedb.Workspace) -> int:
    with storedb.connect(ws) as con:
        return int(con.execute("SELECT count(*) FROM sessions").fetchone()[0])


def test_tokens_have_one_strict_form(ws):
    with storedb.connect(ws) as con:
        issued = {users.start_session(con, users.User("ann", "annotator")) for _ in range(20)}
    assert len(issued) == 20 and all(users.is_session_token(t) for t in issued)
    assert users.is_session_token("A" * 43) and users.is_session_token("a-_9" * 10 + "abc")
    for bad in ["A" * 42, "A" * 44, "A" * 42 + "=", "A" * 42 + "<", "A" * 42 + ";", None, 7, ""]:
        assert not users.is_session_token(bad), bad


def test_signing_in_writes_the_cookie_until_the_session_expires(ws, cookies):
    at = load(ws)
    assert writer(at) is None  # nothing to write or clear
    at.text_input(key="login_name").input("ann")
    at.text_input(key="login_password").input(PASSWORD)
    at.button(key="sign_in").click().run()
    assert signed_in_as(at) == "Signed in as **ann** (annotator)"
    data = writer(at)
    token = at.session_state["session_token"]
    assert data["set"] == token and users.is_session_token(token)
    assert data["name"] == session_cookie.cookie_name(ws)
    assert users.SESSION_HOURS * 3600 - 60 < data["max_age"] <= users.SESSION_HOURS * 3600

    cookies[data["name"]] = token  # what the browser now sends: a reload is signed in
    again = load(ws)
    assert signed_in_as(again) == "Signed in as **ann** (annotator)"
    assert session_count(ws) == 1
    assert writer(again) is None  # the cookie is there already; no second expiry is written


def test_cookie_names_differ_per_workspace(tmp_path, ws):
    other = make_workspace(tmp_path / "other")
    name = session_cookie.cookie_name(ws)
    assert name != session_cookie.cookie_name(other)
    assert name.startswith(session_cookie.PREFIX) and len(name) == len(session_cookie.PREFIX) + 12


def test_sign_out_ends_the_session_and_clears_the_cookie(ws, cookies):
    with storedb.connect(ws) as con:
        token = users.start_session(con, users.User("ann", "annotator"))
    cookies[session_cookie.cookie_name(ws)] = token
    at = load(ws)
    assert signed_in_as(at)
    at.sidebar.button(key="sign_out").click().run()
    assert session_count(ws) == 0
    assert [i.value for i in at.info] == ["Signed out."]  # not "your session ended"
    assert writer(at) == {
        "clear": True,
        "only_if": token,
        "name": session_cookie.cookie_name(ws),
    }
    at.run()  # the connection's (stale) cookie is not looked at again
    assert signed_in_as(at) is None and "session_token" not in at.session_state


@pytest.mark.parametrize(
    "change",
    [
        lambda con: users.set_role(con, "ann", "researcher"),
        lambda con: users.set_password(con, "ann", "another good password"),
        lambda con: users.set_active(con, "ann", False),
    ],
    ids=["role", "password", "disabled"],
)
def test_an_account_change_sends_the_cookie_to_the_login_page(ws, cookies, change):
    with storedb.connect(ws) as con:
        token = users.start_session(con, users.User("ann", "annotator"))
    cookies[session_cookie.cookie_name(ws)] = token
    assert signed_in_as(load(ws))
    with storedb.connect(ws) as con:
        change(con)
    at = load(ws)
    assert signed_in_as(at) is None
    assert [i.value for i in at.info] == ["Your session ended; sign in again."]
    assert writer(at)["only_if"] == token  # cleared, unless another tab signed in since


def test_a_malformed_cookie_is_cleared_and_never_looked_up(ws, cookies, monkeypatch):
    looked_up: list = []
    real = actions.current_user
    monkeypatch.setattr(actions, "current_user", lambda w, t: looked_up.append(t) or real(w, t))
    cookies[session_cookie.cookie_name(ws)] = '"><script>alert(1)</script>'
    at = load(ws)
    assert signed_in_as(at) is None and [i.value for i in at.info] == []
    assert looked_up == [None]
    data = writer(at)
    assert data == {"clear": True, "only_if": None, "name": session_cookie.cookie_name(ws)}
    assert "script" not in json.dumps(data)


def test_users_disable_and_enable_from_the_cli(ws, capsys):
    with storedb.connect(ws) as con:
        token = users.start_session(con, users.User("ann", "annotator"))
    assert cli(capsys, "users", "disable", "ann", "--workspace", ws.root) == "ann disabled\n"
    with storedb.connect(ws) as con:
        assert not bool(users.list_users(con).set_index("name").loc["ann", "active"])
        assert users.session_user(con, token) is None
    cli(capsys, "users", "disable", "ann", "--enable", "--workspace", ws.root)
    with pytest.raises(Exception, match="wrong name or password"):
        actions.sign_in(ws, "ann", PASSWORD + "x")
    assert actions.sign_in(ws, "ann", PASSWORD)[0].name == "ann"


def test_the_first_admin_is_kept_signed_in_too(tmp_path, monkeypatch, cookies):
    fresh = make_workspace(tmp_path / "fresh")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(fresh.root))
    at = load(fresh)
    at.text_input(key="setup_name").input("ada")
    at.text_input(key="setup_password").input(PASSWORD)
    at.text_input(key="setup_repeat").input(PASSWORD)
    at.button(key="setup_submit").click().run()
    assert signed_in_as(at) == "Signed in as **ada** (admin)"
    assert writer(at)["set"] == at.session_state["session_token"]
