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

from store.access import MAX_NAME, User, check_name, check_role
from store.errors import PrefloopError

# scrypt cost: ~50 ms and 16 MiB per hash on a laptop core; stored with each hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_HOURS = float(os.environ.get("PREFLOOP_SESSION_HOURS", "12"))
FREE_FAILURES = 3  # failed attempts for one name before its sign-in slows down
# Failures for one name after which its wait holds clients that have not failed too (below it,
# such a client may try the right password through the wait, so nobody locks a user out cheaply).
NAME_LOCK_ALL_FAILURES = 20
CLIENT_FREE_FAILURES = 10  # failed attempts from one client (any names) before it slows down
MAX_WAIT_S = 300.0  # the per-name and per-client waits double up to this
FAILURE_WINDOW = timedelta(minutes=15)  # the longest window: older attempts are pruned
GLOBAL_FREE_FAILURES = 30  # failed attempts server-wide per GLOBAL_WINDOW before everyone waits
GLOBAL_WINDOW = timedelta(minutes=1)
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
STORED_NAME_CHARS = 41  # an attempt stores an account's name, else '#' + 40 hex of its sha256
MAX_CLIENT = 64
TOKEN_BYTES = 32  # a session token is secrets.token_urlsafe(TOKEN_BYTES): 43 URL-safe characters
_TOKEN_FORMAT = re.compile(r"[A-Za-z0-9_-]{43}")
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


def _check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD:
        raise PrefloopError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PrefloopError(f"the password must have at most {MAX_PASSWORD} characters")


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


def check_sign_in_input(name: str, password: str) -> str:
    """The typed name, stripped, if name and password are short enough to check at all."""
    name = (name or "").strip()
    if not name:
        raise PrefloopError("type your account name and password")
    if len(name) > MAX_NAME:
        raise PrefloopError(
            f"account names have at most {MAX_NAME} characters; check the name and try again"
        )
    if len(password or "") > MAX_PASSWORD:
        raise PrefloopError(f"passwords have at most {MAX_PASSWORD} characters")
    return name


def _attempt_key(con: duckdb.DuckDBPyConnection, name: str) -> str:
    """What an attempt stores for the typed name: the account's name, or a hash when no such
    account exists (a password typed into the name field is not kept)."""
    if con.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
        return name
    return "#" + hashlib.sha256(name.encode()).hexdigest()[: STORED_NAME_CHARS - 1]


def _client_key(client: str | None) -> str | None:
    if client is None or len(client) <= MAX_CLIENT:
        return client
    return "#" + hashlib.sha256(client.encode()).hexdigest()[: MAX_CLIENT - 1]


def _doubling_wait(failures: int, free: int, last: datetime | None) -> float:
    """Seconds left of 1, 2, 4, ... MAX_WAIT_S s after the last failure, past `free` ones."""
    if failures < free or last is None:
        return 0.0
    wait = min(2.0 ** (failures - free), MAX_WAIT_S)
    return max(0.0, (last + timedelta(seconds=wait) - _now()).total_seconds())


def _name_failures(con: duckdb.DuckDBPyConnection, key: str) -> tuple[int, datetime | None]:
    rows = con.execute(
        "SELECT ok, created FROM login_attempts WHERE name = ? AND created > ? "
        "ORDER BY created DESC",
        [key, _now() - FAILURE_WINDOW],
    ).fetchall()
    failures, last = 0, None
    for ok, at in rows:
        if ok:  # a success resets the name's count
            break
        failures += 1
        last = last or at
    return failures, last


def _client_failures(con: duckdb.DuckDBPyConnection, client: str | None) -> tuple[int, datetime]:
    # No reset on success: an attacker with an account of their own could clear it otherwise.
    return con.execute(
        "SELECT count(*), max(created) FROM login_attempts WHERE NOT ok "
        "AND client IS NOT DISTINCT FROM ? AND created > ?",
        [client, _now() - FAILURE_WINDOW],
    ).fetchone()


def _global_wait(con: duckdb.DuckDBPyConnection) -> float:
    """Seconds until fewer than GLOBAL_FREE_FAILURES failures lie in the last GLOBAL_WINDOW."""
    row = con.execute(
        "SELECT created FROM login_attempts WHERE NOT ok AND created > ? "
        "ORDER BY created DESC LIMIT 1 OFFSET ?",
        [_now() - GLOBAL_WINDOW, GLOBAL_FREE_FAILURES - 1],
    ).fetchone()
    if row is None:
        return 0.0
    return max(0.0, (row[0] + GLOBAL_WINDOW - _now()).total_seconds())


def _waits(
    con: duckdb.DuckDBPyConnection, name: str, client: str | None
) -> list[tuple[float, str]]:
    client = _client_key(client)
    failures, last = _client_failures(con, client)
    here = "browser session" if (client or "").startswith("session:") else "address"
    name_failures, name_last = _name_failures(con, _attempt_key(con, name))
    waits = [
        (_doubling_wait(failures, CLIENT_FREE_FAILURES, last), f"from this {here}"),
        (_global_wait(con), "on this server just now"),
    ]
    if failures or name_failures >= NAME_LOCK_ALL_FAILURES:
        waits.append((_doubling_wait(name_failures, FREE_FAILURES, name_last), f"for {name!r}"))
    return waits


def wait_before_login(
    con: duckdb.DuckDBPyConnection, name: str, client: str | None = None
) -> float:
    """Seconds this name must wait before its next attempt from this client (0: try now)."""
    return max(wait for wait, _ in _waits(con, name, client))


def authenticate(
    con: duckdb.DuckDBPyConnection, name: str, password: str, client: str | None = None
) -> User | None:
    """The account if name and password match, else None; failures are recorded (so commit
    the transaction either way) and slow down the next attempts for the name, from the client
    and, in a burst, from everyone."""
    name = check_sign_in_input(name, password)
    con.execute("DELETE FROM login_attempts WHERE created < ?", [_now() - FAILURE_WINDOW])
    wait, why = max(_waits(con, name, client))
    if wait > 0:
        raise PrefloopError(f"too many failed sign-ins {why}: wait {wait:.0f} s and try again")
    row = con.execute(
        "SELECT name, role, password_hash, active FROM users WHERE name = ?", [name]
    ).fetchone()
    ok = verify_password(password, row[2] if row else _NO_SUCH_USER) and bool(row and row[3])
    con.execute(
        "INSERT INTO login_attempts (name, ok, created, client) VALUES (?, ?, ?, ?)",
        [_attempt_key(con, name), ok, _now(), _client_key(client)],
    )
    return User(row[0], row[1]) if ok else None


def failed_sign_ins(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Failed sign-ins of the last FAILURE_WINDOW per name and client, most recent first;
    names without an account show as '(no such account)'."""
    return con.execute(
        "SELECT CASE WHEN starts_with(name, '#') THEN '(no such account)' ELSE name END AS name, "
        "coalesce(client, '-') AS client, count(*) AS failures, max(created) AS last "
        "FROM login_attempts WHERE NOT ok AND created > ? "
        "GROUP BY ALL ORDER BY last DESC",
        [_now() - FAILURE_WINDOW],
    ).df()


def start_session(con: duckdb.DuckDBPyConnection, user: User, hours: float | None = None) -> str:
    """A new session token for the user (only its hash is stored)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expires = _now() + timedelta(hours=SESSION_HOURS if hours is None else hours)
    con.execute(
        "INSERT INTO sessions (token_hash, user_name, expires) VALUES (?, ?, ?)",
        [_token_hash(token), user.name, expires],
    )
    con.execute("DELETE FROM sessions WHERE expires < ?", [_now()])
    return token


def is_session_token(value: object) -> bool:
    """Whether value has the exact form of a token made by start_session (nothing else is
    looked up, stored or sent back to a browser)."""
    return isinstance(value, str) and _TOKEN_FORMAT.fullmatch(value) is not None


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
