"""Accounts: scrypt hashes, sign-in slow-down, expiring sessions, the login page, the CLI."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import actions
from store import db as storedb
from store import users
from store.errors import PrefloopError
from tests.fixtures_app import make_workspace, seed_round

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "streamlit_app.py"
PASSWORD = "correct horse battery"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def test_passwords_are_stored_only_as_salted_scrypt_hashes(ws):
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
        users.add_user(con, "bob", "annotator", PASSWORD)
        hashes = [r[0] for r in con.execute("SELECT password_hash FROM users").fetchall()]
    assert all(h.startswith("scrypt$16384$8$1$") for h in hashes)
    assert hashes[0] != hashes[1]  # same password, different salts
    assert not any(PASSWORD in h for h in hashes)
    assert PASSWORD.encode() not in ws.db_path.read_bytes()
    assert users.verify_password(PASSWORD, hashes[0])
    assert not users.verify_password(PASSWORD + "x", hashes[0])


def test_account_rules(ws):
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    for name, role, pw, msg in [
        ("ann", "annotator", PASSWORD, "exists"),
        ("bo b", "annotator", PASSWORD, "invalid account name"),
        ("cy", "boss", PASSWORD, "unknown role"),
        ("cy", "admin", "short", "at least 8"),
    ]:
        with pytest.raises(PrefloopError, match=msg), storedb.connect(ws) as con:
            users.add_user(con, name, role, pw)


def test_failed_sign_ins_slow_down_and_a_success_resets(ws, monkeypatch):
    clock = [datetime(2026, 1, 1, 12, 0, 0)]
    monkeypatch.setattr(users, "_now", lambda: clock[0])
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    for _ in range(users.FREE_FAILURES):  # the first failures cost nothing extra
        with pytest.raises(PrefloopError, match="wrong name or password"):
            actions.sign_in(ws, "ann", "guess")
        clock[0] += timedelta(milliseconds=10)
    waits = []
    for _ in range(4):
        with pytest.raises(PrefloopError, match="too many failed sign-ins for 'ann': wait"):
            actions.sign_in(ws, "ann", PASSWORD)  # the right password from the same client
        with storedb.connect(ws) as con:
            waits.append(users.wait_before_login(con, "ann"))
        clock[0] += timedelta(seconds=waits[-1] + 0.01)
        with pytest.raises(PrefloopError, match="wrong name or password"):
            actions.sign_in(ws, "ann", "guess again")
    assert waits == sorted(waits) and waits[-1] > waits[0] * 4  # doubling
    clock[0] += timedelta(seconds=users.MAX_WAIT_S + 1)
    user, token = actions.sign_in(ws, "ann", PASSWORD)
    assert user.name == "ann" and actions.current_user(ws, token) == user
    with storedb.connect(ws) as con:
        assert users.wait_before_login(con, "ann") == 0  # success resets the count
    # failures of unknown names are slowed down too (no free probing of names)
    for _ in range(users.FREE_FAILURES):
        with pytest.raises(PrefloopError, match="wrong name"):
            actions.sign_in(ws, "nobody", "x")
    with pytest.raises(PrefloopError, match="too many failed"):
        actions.sign_in(ws, "nobody", "x")


def test_sessions_expire_and_end(ws, monkeypatch):
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    user, token = actions.sign_in(ws, "ann", PASSWORD)
    assert actions.current_user(ws, token) == user
    later = datetime.now() + timedelta(hours=users.SESSION_HOURS + 0.1)
    monkeypatch.setattr(users, "_now", lambda: later)
    assert actions.current_user(ws, token) is None
    monkeypatch.undo()
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    actions.sign_out(ws, token)
    assert actions.current_user(ws, token) is None
    _, token = actions.sign_in(ws, "ann", PASSWORD)
    with storedb.connect(ws) as con:
        users.set_active(con, "ann", False)  # disabling ends the session
    assert actions.current_user(ws, token) is None
    with pytest.raises(PrefloopError, match="wrong name or password"):
        actions.sign_in(ws, "ann", PASSWORD)


def login(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    at.button(key="sign_in").click().run()
    assert not at.exception, at.exception
    return at


def test_the_login_page_guards_the_app(ws):
    seed_round(ws, n_groups=1, k=2)
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert [s.value for s in at.subheader] == ["Sign in"]
    assert not at.sidebar.radio  # no page before signing in
    assert not [m for m in at.markdown if "Prompt number" in m.value]
    login(at, "ann", "wrong password")
    assert any("wrong name or password" in e.value for e in at.error)
    assert at.text_input(key="login_password").value == ""
    login(at, "ann", PASSWORD)
    assert at.sidebar.radio(key="page").value == "Annotator"
    assert "Prompt number 1\\: say something nice." in [m.value for m in at.markdown]
    at.sidebar.button(key="sign_out").click().run()
    assert [s.value for s in at.subheader] == ["Sign in"]
    assert "Signed out." in [i.value for i in at.info]


def test_an_expired_session_returns_to_the_login_page(ws, monkeypatch):
    with storedb.connect(ws) as con:
        users.add_user(con, "ann", "annotator", PASSWORD)
    at = login(AppTest.from_file(str(APP), default_timeout=60).run(), "ann", PASSWORD)
    assert at.sidebar.radio(key="page")
    later = datetime.now() + timedelta(hours=users.SESSION_HOURS + 1)
    monkeypatch.setattr(users, "_now", lambda: later)
    at.run()
    assert [s.value for s in at.subheader] == ["Sign in"]
    assert "Your session ended; sign in again." in [i.value for i in at.info]


def test_the_first_visitor_of_an_empty_workspace_creates_the_admin(ws):
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert "Create the first admin account" in [s.value for s in at.subheader]
    at.text_input(key="setup_name").input("ada")
    at.text_input(key="setup_password").input(PASSWORD)
    at.text_input(key="setup_repeat").input(PASSWORD)
    at.button(key="setup_submit").click().run()
    assert not at.exception
    assert "Admin" in at.sidebar.radio(key="page").options
    with storedb.connect(ws) as con:
        assert list(users.list_users(con)["role"]) == ["admin"]
    with pytest.raises(PrefloopError, match="has accounts already"):
        actions.create_first_admin(ws, "mallory", PASSWORD)


def cli(*args: str, stdin: str | None = None, ws=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--workspace", str(ws.root)],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
    )


def test_users_cli(ws):
    out = cli(
        "users",
        "add",
        "ann",
        "--role",
        "annotator",
        "--password-stdin",
        stdin=PASSWORD + "\n",
        ws=ws,
    )
    assert out.returncode == 0 and "added ann (annotator)" in out.stdout
    out = cli("users", "add", "bob", "--role", "annotator", ws=ws, stdin="")
    assert out.returncode == 2 and "--password-stdin" in out.stderr
    out = cli("users", "set-role", "ann", "--role", "researcher", ws=ws)
    assert out.returncode == 0
    out = cli("users", "list", "--json", ws=ws)
    assert '"name":"ann","role":"researcher"' in out.stdout and "scrypt" not in out.stdout
    out = cli("users", "set-role", "zed", "--role", "admin", ws=ws)
    assert out.returncode == 2 and "no account named 'zed'" in out.stderr
    user, _ = actions.sign_in(ws, "ann", PASSWORD)
    assert user.role == "researcher"
