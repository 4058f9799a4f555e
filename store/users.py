"""Accounts, password hashes, sign-in with slow-down after failures, and expiring sessions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from datetime import datetime, timedelta

import duckdb
import pandas as pd

from store.access import User, check_role
from store.errors import PrefloopError

# scrypt cost: ~50 ms and 16 MiB per hash on a laptop core; stored with each hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_HOURS = float(os.environ.get("PREFLOOP_SESSION_HOURS", "12"))
FREE_FAILURES = 3  # failed attempts before sign-in slows down
MAX_WAIT_S = 300.0
FAILURE_WINDOW = timedelta(minutes=15)
MIN_PASSWORD = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# Checked against for unknown names, so a wrong name costs as much time as a wrong password.
_NO_SUCH_USER = (
    "scrypt$16384$8$1$FtWvqwDQLl5KMS/g34I2YQ==$6CdsQOLF0kire4f+LmegnUGA+uogI/wtmGByaSg7q/Y="
)


def _now() -> datetime:
    return datetime.now()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A salted scrypt hash in the form scrypt$N$r$p$salt$hash (base64)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    enc = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${enc(salt).decode()}${enc(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether password matches a hash made by hash_password (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=2**26,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def check_name(name: str) -> str:
    """The account name, if valid (letters, digits, _ . @ -; up to 64)."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise PrefloopError(
            f"invalid account name {name!r}: use letters, digits, '_', '.', '@' or '-' "
            "(starting with a letter or digit, at most 64 characters)"
        )
    return name


def _check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD:
        raise PrefloopError(f"the password must have at least {MIN_PASSWORD} characters")


def add_user(con: duckdb.DuckDBPyConnection, name: str, role: str, password: str) -> User:
    """Create an account; the name must be new."""
    name = check_name(name)
    check_role(role)
    _check_password(password)
    if con.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
        raise PrefloopError(
            f"an account named {name!r} exists; use `prefloop users set-role` or "
            "`prefloop users set-password` to change it"
        )
    con.execute(
        "INSERT INTO users (name, role, password_hash) VALUES (?, ?, ?)",
        [name, role, hash_password(password)],
    )
    return User(name, role)


def _existing(con: duckdb.DuckDBPyConnection, name: str) -> tuple:
    row = con.execute("SELECT name, role, active FROM users WHERE name = ?", [name]).fetchone()
    if row is None:
        raise PrefloopError(f"no account named {name!r}; `prefloop users list` shows them")
    return row


def set_role(con: duckdb.DuckDBPyConnection, name: str, role: str) -> None:
    """Change an account's role (its open sessions end)."""
    _existing(con, name)
    check_role(role)
    con.execute("UPDATE users SET role = ? WHERE name = ?", [role, name])
    con.execute("DELETE FROM sessions WHERE user_name = ?", [name])


def set_password(con: duckdb.DuckDBPyConnection, name: str, password: str) -> None:
    """Replace an account's password (its open sessions end)."""
    _existing(con, name)
    _check_password(password)
    con.execute(
        "UPDATE users SET password_hash = ? WHERE name = ?", [hash_password(password), name]
    )
    con.execute("DELETE FROM sessions WHERE user_name = ?", [name])


def set_active(con: duckdb.DuckDBPyConnection, name: str, active: bool) -> None:
    """Disable or re-enable an account; disabling ends its sessions. Its labels stay."""
    _existing(con, name)
    con.execute("UPDATE users SET active = ? WHERE name = ?", [active, name])
    if not active:
        con.execute("DELETE FROM sessions WHERE user_name = ?", [name])


def list_users(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Accounts (name, role, active, created), without their hashes."""
    return con.execute("SELECT name, role, active, created FROM users ORDER BY name").df()


def count_users(con: duckdb.DuckDBPyConnection) -> int:
    """How many accounts exist."""
    return int(con.execute("SELECT count(*) FROM users").fetchone()[0])


def wait_before_login(con: duckdb.DuckDBPyConnection, name: str) -> float:
    """Seconds this name must wait before the next attempt (0 when it may try now)."""
    since = _now() - FAILURE_WINDOW
    rows = con.execute(
        "SELECT ok, created FROM login_attempts WHERE name = ? AND created > ? "
        "ORDER BY created DESC",
        [name, since],
    ).fetchall()
    failures, last = 0, None
    for ok, at in rows:
        if ok:
            break
        failures += 1
        last = last or at
    if failures < FREE_FAILURES or last is None:
        return 0.0
    wait = min(2.0 ** (failures - FREE_FAILURES), MAX_WAIT_S)
    left = (last + timedelta(seconds=wait) - _now()).total_seconds()
    return max(0.0, left)


def authenticate(con: duckdb.DuckDBPyConnection, name: str, password: str) -> User | None:
    """The account if name and password match, else None; failures are recorded (so commit
    the transaction either way) and slow down the next attempts."""
    name = (name or "").strip()
    wait = wait_before_login(con, name)
    if wait > 0:
        raise PrefloopError(
            f"too many failed sign-ins for {name!r}: wait {wait:.0f} s and try again"
        )
    row = con.execute(
        "SELECT name, role, password_hash, active FROM users WHERE name = ?", [name]
    ).fetchone()
    ok = verify_password(password, row[2] if row else _NO_SUCH_USER) and bool(row and row[3])
    con.execute(
        "INSERT INTO login_attempts (name, ok, created) VALUES (?, ?, ?)", [name, ok, _now()]
    )
    return User(row[0], row[1]) if ok else None


def start_session(con: duckdb.DuckDBPyConnection, user: User, hours: float | None = None) -> str:
    """A new session token for the user (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    expires = _now() + timedelta(hours=SESSION_HOURS if hours is None else hours)
    con.execute(
        "INSERT INTO sessions (token_hash, user_name, expires) VALUES (?, ?, ?)",
        [_token_hash(token), user.name, expires],
    )
    con.execute("DELETE FROM sessions WHERE expires < ?", [_now()])
    return token


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_user(con: duckdb.DuckDBPyConnection, token: str | None) -> User | None:
    """The signed-in user for a session token; None when unknown, expired or disabled."""
    if not token:
        return None
    row = con.execute(
        "SELECT u.name, u.role FROM sessions s JOIN users u ON u.name = s.user_name "
        "WHERE s.token_hash = ? AND s.expires > ? AND u.active",
        [_token_hash(token), _now()],
    ).fetchone()
    return User(row[0], row[1]) if row else None


def end_session(con: duckdb.DuckDBPyConnection, token: str | None) -> None:
    """Sign out: forget the session."""
    if token:
        con.execute("DELETE FROM sessions WHERE token_hash = ?", [_token_hash(token)])
