"""Workspace layout, connections with lock retry, and schema migrations."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from store.errors import PrefloopError, storage_error

DB_NAME = "prefloop.duckdb"
T = TypeVar("T")
U = TypeVar("U")
LOCK_TIMEOUT_S = float(os.environ.get("PREFLOOP_LOCK_TIMEOUT", "60"))

MIGRATIONS: list[str] = [
    # 1: prompts, rounds of groups, candidates, labels, model versions, dataset versions
    """
    CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
    CREATE SEQUENCE seq_prompts START 1;
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_prompts'),
        text VARCHAR NOT NULL,
        messages VARCHAR,
        norm_key VARCHAR NOT NULL UNIQUE,
        split VARCHAR NOT NULL,
        source VARCHAR,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE model_versions (
        id VARCHAR PRIMARY KEY,
        parent VARCHAR,
        base_model VARCHAR NOT NULL,
        adapter_path VARCHAR NOT NULL,
        dataset_id VARCHAR,
        method VARCHAR NOT NULL,
        config VARCHAR NOT NULL,
        run_id INTEGER,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE SEQUENCE seq_rounds START 1;
    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_rounds'),
        model_version VARCHAR,
        split VARCHAR NOT NULL,
        k INTEGER NOT NULL,
        settings VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE SEQUENCE seq_groups START 1;
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_groups'),
        round_id INTEGER NOT NULL,
        prompt_id INTEGER NOT NULL
    );
    CREATE SEQUENCE seq_candidates START 1;
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_candidates'),
        group_id INTEGER NOT NULL,
        position INTEGER NOT NULL,
        text VARCHAR NOT NULL,
        n_tokens INTEGER,
        finish_reason VARCHAR,
        logprob DOUBLE
    );
    CREATE INDEX idx_candidates_group ON candidates(group_id);
    CREATE SEQUENCE seq_labels START 1;
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_labels'),
        group_id INTEGER NOT NULL,
        annotator VARCHAR NOT NULL,
        ranking VARCHAR,
        flags VARCHAR NOT NULL,
        comment VARCHAR,
        created TIMESTAMP DEFAULT current_timestamp,
        UNIQUE (group_id, annotator)
    );
    CREATE TABLE datasets (
        id VARCHAR PRIMARY KEY,
        content_hash VARCHAR NOT NULL UNIQUE,
        path VARCHAR NOT NULL,
        n_groups INTEGER NOT NULL,
        n_pairs INTEGER NOT NULL,
        rounds VARCHAR NOT NULL,
        filters VARCHAR NOT NULL,
        created TIMESTAMP DEFAULT current_timestamp
    );
    """,
    # 2: background jobs and their metrics
    """
    CREATE SEQUENCE seq_runs START 1;
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_runs'),
        kind VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        config VARCHAR NOT NULL,
        pid INTEGER,
        host VARCHAR,
        started TIMESTAMP DEFAULT current_timestamp,
        heartbeat TIMESTAMP DEFAULT current_timestamp,
        finished TIMESTAMP,
        error VARCHAR,
        result VARCHAR,
        log_path VARCHAR
    );
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL,
        step INTEGER NOT NULL,
        name VARCHAR NOT NULL,
        value DOUBLE,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE INDEX idx_metrics_run ON metrics(run_id);
    """,
    # 3: which model version wrote each candidate (A/B evaluation rounds mix two), evaluations
    """
    DROP INDEX idx_candidates_group;
    ALTER TABLE candidates ADD COLUMN origin VARCHAR;
    CREATE INDEX idx_candidates_group ON candidates(group_id);
    UPDATE candidates SET origin = r.model_version
        FROM groups g JOIN rounds r ON r.id = g.round_id
        WHERE g.id = candidates.group_id;
    CREATE SEQUENCE seq_evals START 1;
    CREATE TABLE evals (
        id INTEGER PRIMARY KEY DEFAULT nextval('seq_evals'),
        kind VARCHAR NOT NULL,
        version VARCHAR NOT NULL,
        against VARCHAR,
        judge VARCHAR,
        round_ids VARCHAR NOT NULL,
        metrics VARCHAR NOT NULL,
        details VARCHAR,
        run_id INTEGER,
        created TIMESTAMP DEFAULT current_timestamp
    );
    """,
    # 4: a team: accounts and sessions, assignment (overlap, leases, gold), judge suggestions,
    # label revisions, thumbs and 1-5 ratings, adjudicated disputes, dataset label membership
    """
    CREATE TABLE users (
        name VARCHAR PRIMARY KEY,
        role VARCHAR NOT NULL,
        password_hash VARCHAR NOT NULL,
        active BOOLEAN NOT NULL DEFAULT TRUE,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE sessions (
        token_hash VARCHAR PRIMARY KEY,
        user_name VARCHAR NOT NULL,
        created TIMESTAMP DEFAULT current_timestamp,
        expires TIMESTAMP NOT NULL
    );
    CREATE TABLE login_attempts (
        name VARCHAR NOT NULL,
        ok BOOLEAN NOT NULL,
        created TIMESTAMP DEFAULT current_timestamp
    );
    ALTER TABLE rounds ADD COLUMN overlap INTEGER DEFAULT 1;
    ALTER TABLE rounds ADD COLUMN mode VARCHAR DEFAULT 'rank';
    ALTER TABLE rounds ADD COLUMN show_suggestions BOOLEAN DEFAULT FALSE;
    ALTER TABLE rounds ADD COLUMN guidelines VARCHAR;
    UPDATE rounds SET overlap = 1, mode = 'rank', show_suggestions = FALSE;
    ALTER TABLE labels ADD COLUMN thumbs VARCHAR;
    ALTER TABLE labels ADD COLUMN ratings VARCHAR;
    ALTER TABLE labels ADD COLUMN seconds DOUBLE;
    ALTER TABLE labels ADD COLUMN revision INTEGER DEFAULT 1;
    ALTER TABLE labels ADD COLUMN updated TIMESTAMP;
    UPDATE labels SET revision = 1, updated = created;
    CREATE TABLE label_revisions (
        label_id INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        ranking VARCHAR,
        flags VARCHAR NOT NULL,
        comment VARCHAR,
        thumbs VARCHAR,
        ratings VARCHAR,
        seconds DOUBLE,
        created TIMESTAMP NOT NULL,
        replaced TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE dataset_labels (dataset_id VARCHAR NOT NULL, label_id INTEGER NOT NULL);
    CREATE TABLE leases (
        group_id INTEGER NOT NULL,
        annotator VARCHAR NOT NULL,
        expires TIMESTAMP NOT NULL,
        PRIMARY KEY (group_id, annotator)
    );
    CREATE TABLE gold (
        group_id INTEGER PRIMARY KEY,
        ranking VARCHAR NOT NULL,
        author VARCHAR,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE suggestions (
        group_id INTEGER PRIMARY KEY,
        judge VARCHAR NOT NULL,
        ranking VARCHAR NOT NULL,
        created TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE adjudications (
        group_id INTEGER PRIMARY KEY,
        ranking VARCHAR,
        flags VARCHAR NOT NULL,
        author VARCHAR NOT NULL,
        note VARCHAR,
        created TIMESTAMP DEFAULT current_timestamp
    );
    ALTER TABLE datasets ADD COLUMN stats VARCHAR;
    """,
    # 5: the promotion gate. Versions made before it count as promoted.
    """
    ALTER TABLE model_versions ADD COLUMN gate VARCHAR;
    ALTER TABLE model_versions ADD COLUMN promoted BOOLEAN DEFAULT true;
    ALTER TABLE model_versions ADD COLUMN kind VARCHAR DEFAULT 'policy';
    """,
    # 6: judges the operator registered (the only ones the web app may run), and the client a
    # sign-in attempt came from (throttling by client as well as by name).
    """
    CREATE TABLE judges (
        name VARCHAR PRIMARY KEY,
        spec VARCHAR NOT NULL,
        author VARCHAR,
        created TIMESTAMP DEFAULT current_timestamp
    );
    ALTER TABLE login_attempts ADD COLUMN client VARCHAR;
    """,
    # 7: which rendering of the candidates a label was given on (NULL: imported or older)
    """
    ALTER TABLE labels ADD COLUMN render_version VARCHAR;
    ALTER TABLE labels ADD COLUMN render_hash VARCHAR;
    ALTER TABLE label_revisions ADD COLUMN render_version VARCHAR;
    ALTER TABLE label_revisions ADD COLUMN render_hash VARCHAR;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Workspace:
    """A project folder: the database plus artifacts (adapters, snapshots, runs)."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def resolve_stored(self, stored: str, record: str) -> Path:
        """Absolute path of a path stored in the database (record names its owner, e.g. "the
        snapshot of dataset d1"); one that leads outside the workspace is refused."""
        root = self.root.resolve()
        # resolve() follows symbolic links, so a link inside the workspace to a file outside it
        # is refused like an absolute or ../ path
        resolved = (root / stored).resolve()
        if not resolved.is_relative_to(root):
            raise PrefloopError(
                f"{record} is stored as {stored!r}, which is {resolved}, outside the workspace "
                f"{root}; prefloop reads and writes only inside its workspace, so the database "
                "was changed outside prefloop: restore the workspace from a backup"
            )
        return resolved

    def relative(self, path: Path) -> str:
        """Workspace-relative form of an absolute path, for storing."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()


def workspace(path: str | os.PathLike | None = None, *, must_exist: bool = True) -> Workspace:
    """The workspace at path, $PREFLOOP_WORKSPACE or the current folder."""
    root = Path(path or os.environ.get("PREFLOOP_WORKSPACE") or ".").expanduser().resolve()
    ws = Workspace(root)
    if must_exist and not ws.db_path.exists():
        raise PrefloopError(
            f"no prefloop workspace at {root} (no {DB_NAME}); "
            f"create one with `prefloop init --workspace {root}` or pass --workspace DIR"
        )
    return ws


def is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def _open(
    ws: Workspace,
    read_only: bool,
    timeout_s: float,
    give_way: Callable[[], T | None] | None = None,
) -> duckdb.DuckDBPyConnection | T:
    return with_lock_retry(
        ws, lambda: duckdb.connect(str(ws.db_path), read_only=read_only), timeout_s, give_way
    )


def with_lock_retry(
    ws: Workspace,
    open_file: Callable[[], T],
    timeout_s: float,
    give_way: Callable[[], U | None] | None = None,
) -> T | U:
    """open_file() (which opens the workspace database), retried with backoff while another
    process holds the file, for at most timeout_s; between tries, what give_way() returns
    instead once that is not None (a process that started owning the database meanwhile)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return open_file()
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise storage_error(exc, ws.db_path) or PrefloopError(
                    f"cannot open {ws.db_path}: {exc}"
                ) from exc
            instead = give_way() if give_way is not None else None
            if instead is not None:
                return instead
            if time.monotonic() >= deadline:
                raise PrefloopError(
                    f"the workspace database {ws.db_path} is held by another process "
                    f"(gave up after {timeout_s:.0f} s). Stop the process that keeps it open "
                    "or retry; prefloop's own commands open it only briefly."
                ) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.6, 1.0)


def migrate(con: duckdb.DuckDBPyConnection, upto: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to version upto; return the version found before."""
    has_meta = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
    ).fetchone()[0]
    found = 0
    if has_meta:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise PrefloopError(
            f"this workspace has schema version {found}, newer than this prefloop "
            f"understands ({SCHEMA_VERSION}); upgrade prefloop to open it"
        )
    for version in range(found + 1, upto + 1):
        with transaction(con):
            con.execute(MIGRATIONS[version - 1])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(version)])
    return found


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on con: committed when the work ends, rolled back if it raises."""
    con.execute("BEGIN")
    try:
        yield con
    except BaseException:
        # a failed write (full disk) may have ended the transaction already
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextmanager
def connect(
    ws: Workspace,
    *,
    read_only: bool = False,
    timeout_s: float | None = None,
    turns: str | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """One unit of work on the workspace database, in one transaction: on this process's own
    instance when it owns the database, through the owner when another process does (the web
    app), else on the file, opened for this unit of work and closed after it. On an owner,
    units of work with the same turns name run one at a time, whichever process sent them
    (without an owner, processes take turns on the file anyway)."""
    if not ws.db_path.exists():
        raise PrefloopError(f"no workspace database at {ws.db_path}; run `prefloop init` first")
    from store import owner as db_owner  # it builds on this module

    through = db_owner.session(ws, turns=turns)
    if through is not None:
        with _storage_errors(ws), through as con:
            yield con  # on the owner: a cursor, or the part of a connection the store uses
        return
    # the web app may start owning the database while this waits for the file
    con = _open(
        ws,
        read_only,
        LOCK_TIMEOUT_S if timeout_s is None else timeout_s,
        lambda: db_owner.session(ws, turns=turns),
    )
    if not isinstance(con, duckdb.DuckDBPyConnection):
        with _storage_errors(ws), con as through_owner:
            yield through_owner
        return
    try:
        if not read_only:
            migrate(con)
        else:
            version = schema_version(con)
            if version != SCHEMA_VERSION:
                raise PrefloopError(
                    f"workspace schema is version {version}, expected {SCHEMA_VERSION}; "
                    "open it once read-write (any prefloop command) to migrate"
                )
        with transaction(con):
            yield con
    except (duckdb.Error, OSError) as exc:
        error = storage_error(exc, ws.db_path)  # a full disk or a damaged file: one line
        if error is None:
            raise
        raise error from exc
    finally:
        con.close()


@contextmanager
def _storage_errors(ws: Workspace) -> Iterator[None]:
    """A full disk or a damaged file as one line (PrefloopError), other errors unchanged."""
    try:
        yield
    except (duckdb.Error, OSError) as exc:
        error = storage_error(exc, ws.db_path)
        if error is None:
            raise
        raise error from exc


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the database."""
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def create(root: str | os.PathLike, base_model: str, upto: int = SCHEMA_VERSION) -> Workspace:
    """Create a workspace folder with an empty, current database."""
    ws = Workspace(Path(root).expanduser().resolve())
    if ws.db_path.exists():
        raise PrefloopError(f"a workspace already exists at {ws.root}")
    for sub in ("adapters", "snapshots", "runs", "exports"):
        (ws.artifacts / sub).mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(ws.db_path))
    try:
        migrate(con, upto)
        con.execute("INSERT INTO meta VALUES ('base_model', ?)", [base_model])
    finally:
        con.close()
    return ws


def get_meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """A value from the meta table."""
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


TABLES = ("prompts", "rounds", "groups", "candidates", "labels", "model_versions", "datasets")


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row counts of the main tables (what `prefloop status` shows)."""
    return {t: int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}
