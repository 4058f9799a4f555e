"""Sign-in an attacker cannot use: slowed by name, by client and server-wide; capped storage."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import actions
from store import db as storedb
from store import users
from store.errors import PrefloopError
from tests.cli_helpers import cli
from tests.fixtures_app import make_workspace

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
PASSWORD = "correct horse battery"
WRONG = "wrong name or password"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    with storedb.connect(workspace) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    return workspace


@pytest.fixture
def clock(monkeypatch):
    now = [datetime(2026, 1, 1, 12, 0, 0)]
    monkeypatch.setattr(users, "_now", lambda: now[0])
    return now


def attempt(ws, name: str, password: str, client: str, clock) -> str:
    """The message of a failed sign-in ('ok' on success); the clock moves on 10 ms."""
    clock[0] += timedelta(milliseconds=10)
    try:
        actions.sign_in(ws, name, password, client=client)
    except PrefloopError as exc:
        return str(exc)
    return "ok"


def test_spraying_names_from_one_client_is_slowed_but_other_clients_are_not(ws, clock):
    messages = [attempt(ws, f"user{i}", "Winter2026!", "203.0.113.9", clock) for i in range(50)]
    refused = [i for i, m in enumerate(messages) if "from this address: wait" in m]
    assert refused, messages[-1]  # before: all 50 names answered "wrong name or password"
    assert refused[0] == users.CLIENT_FREE_FAILURES
    assert all(WRONG in m for m in messages[: refused[0]])
    # a colleague on another address is not slowed by the sprayer's failures
    assert attempt(ws, "user0", "Winter2026!", "198.51.100.7", clock).startswith(WRONG)
    assert attempt(ws, "ann", PASSWORD, "198.51.100.7", clock) == "ok"
    # the sprayer keeps waiting, even for a name it has not tried
    assert "from this address: wait" in attempt(ws, "fresh", "x", "203.0.113.9", clock)


def test_a_burst_of_failures_across_clients_slows_everyone_for_a_while(ws, clock):
    for i in range(users.GLOBAL_FREE_FAILURES):  # one guess each from many addresses
        assert WRONG in attempt(ws, f"name{i}", "guess", f"10.0.{i // 250}.{i % 250}", clock)
    late = attempt(ws, "another", "guess", "192.0.2.1", clock)
    assert "too many failed sign-ins on this server" in late and "wait" in late
    clock[0] += users.GLOBAL_WINDOW
    assert WRONG in attempt(ws, "another", "guess", "192.0.2.1", clock)


def test_over_long_names_are_refused_before_any_work_and_nothing_big_is_stored(ws, clock):
    with storedb.connect(ws) as con:
        con.execute("CHECKPOINT")
    before = ws.db_path.stat().st_size
    for i in range(10):
        message = attempt(ws, chr(97 + i) * 2**20, "guess", "203.0.113.9", clock)
        assert "at most 64 characters" in message
    # a password typed into the name field is not kept in the file either
    assert WRONG in attempt(ws, "Tr0ub4dor-and-3", "guess", "203.0.113.9", clock)
    with storedb.connect(ws) as con:
        names = [r[0] for r in con.execute("SELECT name FROM login_attempts").fetchall()]
        con.execute("CHECKPOINT")
    assert len(names) == 1 and len(names[0]) <= users.STORED_NAME_CHARS
    assert names[0] != "Tr0ub4dor-and-3"
    assert b"Tr0ub4dor-and-3" not in ws.db_path.read_bytes()
    assert ws.db_path.stat().st_size - before < 2**20  # was 10 MiB


def test_the_sign_in_form_caps_the_name_it_sends(ws):
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    name = at.text_input(key="login_name")
    assert name.max_chars == users.MAX_NAME  # the browser lets no more be typed
    name.set_value("x" * 512 * 1024)  # as a client that skips the browser's limit would
    at.text_input(key="login_password").input("guess")
    at.button(key="sign_in").click().run()
    assert not at.exception, at.exception
    assert any(WRONG in e.value for e in at.error)
    with storedb.connect(ws) as con:
        stored = con.execute("SELECT max(length(name)) FROM login_attempts").fetchone()[0]
    assert stored <= users.STORED_NAME_CHARS  # before: all 512 KiB of it
    at.text_input(key="login_name").set_value("   ")
    at.button(key="sign_in").click().run()
    assert any("type your account name" in e.value for e in at.error)


def test_a_locked_out_name_still_signs_in_from_a_client_that_has_not_failed(ws, clock):
    for _ in range(users.FREE_FAILURES + 2):  # an attacker locks ann out
        message = attempt(ws, "ann", "guess", "203.0.113.9", clock)
        if "wait" in message:
            with storedb.connect(ws) as con:
                clock[0] += timedelta(seconds=users.wait_before_login(con, "ann", "203.0.113.9"))
            message = attempt(ws, "ann", "guess", "203.0.113.9", clock)
        assert WRONG in message
    assert "for 'ann': wait" in attempt(ws, "ann", PASSWORD, "203.0.113.9", clock)
    # a client that has not failed gets one guess; after a failure the lock-out holds it too
    assert WRONG in attempt(ws, "ann", "guess", "192.0.2.44", clock)
    assert "for 'ann': wait" in attempt(ws, "ann", PASSWORD, "192.0.2.44", clock)
    assert attempt(ws, "ann", PASSWORD, "198.51.100.7", clock) == "ok"  # ann, elsewhere


def test_many_failures_for_a_name_from_many_clients_hold_every_client(ws, clock):
    for i in range(users.NAME_LOCK_ALL_FAILURES):  # one guess each from many addresses
        assert WRONG in attempt(ws, "ann", "guess", f"10.1.0.{i}", clock)
    assert "for 'ann': wait" in attempt(ws, "ann", PASSWORD, "198.51.100.7", clock)
    clock[0] += timedelta(seconds=users.MAX_WAIT_S)
    assert attempt(ws, "ann", PASSWORD, "198.51.100.7", clock) == "ok"


def test_two_browser_sessions_are_two_clients(ws):
    attacker = AppTest.from_file(str(APP), default_timeout=60).run()
    for _ in range(users.FREE_FAILURES + 1):
        attacker.text_input(key="login_name").input("ann")
        attacker.text_input(key="login_password").input("guess")
        attacker.button(key="sign_in").click().run()
    assert any("too many failed sign-ins for 'ann'" in e.value for e in attacker.error)
    ann = AppTest.from_file(str(APP), default_timeout=60).run()
    ann.text_input(key="login_name").input("ann")
    ann.text_input(key="login_password").input(PASSWORD)
    ann.button(key="sign_in").click().run()
    assert not ann.exception, ann.exception
    assert ann.sidebar.radio(key="page").value == "Annotator"
    with storedb.connect(ws) as con:
        clients = con.execute("SELECT DISTINCT client FROM login_attempts").fetchall()
    assert len(clients) == 2 and all(c[0] for c in clients)


def test_old_attempts_are_pruned(ws, clock):
    for i in range(5):
        attempt(ws, f"old{i}", "guess", "203.0.113.9", clock)
    clock[0] += users.FAILURE_WINDOW + timedelta(seconds=1)
    attempt(ws, "new", "guess", "198.51.100.7", clock)
    with storedb.connect(ws) as con:
        rows = con.execute("SELECT client FROM login_attempts").fetchall()
    assert rows == [("198.51.100.7",)]


def test_admins_see_recent_failed_sign_ins(ws, clock, capsys):
    for _ in range(2):
        attempt(ws, "ann", "guess", "203.0.113.9", clock)
    attempt(ws, "nobody", "guess", "203.0.113.9", clock)
    attempt(ws, "ann", PASSWORD, "198.51.100.7", clock)
    out = cli(capsys, "users", "failed-sign-ins", "--workspace", ws.root)
    lines = out.splitlines()
    assert any("ann" in line and "203.0.113.9" in line and " 2 " in f" {line} " for line in lines)
    assert any("(no such account)" in line for line in lines)
    assert "nobody" not in out and "198.51.100.7" not in out
    with storedb.connect(ws) as con:
        users.add_user(con, "ada", "admin", PASSWORD)
    admin = AppTest.from_file(str(APP), default_timeout=60).run()
    admin.text_input(key="login_name").input("ada")
    admin.text_input(key="login_password").input(PASSWORD)
    admin.button(key="sign_in").click().run()
    admin.sidebar.radio(key="page").set_value("Admin").run()
    assert not admin.exception, admin.exception
    table = admin.dataframe[-1].value
    assert set(table["client"]) == {"203.0.113.9"}
    assert sorted(table["name"]) == ["(no such account)", "ann"]
