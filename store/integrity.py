"""Checking the workspace database file (a full scan and a cheap one) and consistent backups."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from store import db, owner
from store.errors import PrefloopError, storage_error

HEADER_BYTES = 3 * 4096  # DuckDB's file header plus its two database headers
RESTORE = (
    "restore the workspace from a backup made with `prefloop backup` (copy the backup folder "
    "in place of the workspace)"
)
# tables whose rows name files in the workspace: (table, key column, path column, what it is)
STORED_FILES = (
    ("datasets", "id", "path", "the snapshot of dataset"),
    ("model_versions", "id", "adapter_path", "the adapter of model version"),
    ("runs", "id", "log_path", "the log of run"),
)
QUICK_TABLES = ("meta", "users", "rounds", "model_versions", "datasets", "judges")


@dataclass
class TableCheck:
    """One table fully read: its rows, or the error reading it raised."""

    name: str
    rows: int | None = None
    error: str | None = None


@dataclass
class CheckReport:
    """What `prefloop check` found; ok when nothing is wrong."""

    path: Path
    file_problems: list[str] = field(default_factory=list)
    tables: list[TableCheck] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.file_problems or self.missing_files or any(t.error for t in self.tables))


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _open_read_only(ws: db.Workspace) -> duckdb.DuckDBPyConnection:
    return db.with_lock_retry(
        ws, lambda: duckdb.connect(str(ws.db_path), read_only=True), db.LOCK_TIMEOUT_S
    )


def _size_problem(ws: db.Workspace, con: duckdb.DuckDBPyConnection) -> str | None:
    """A file shorter than the blocks its header lists (a truncated copy), else None."""
    _, _, block_size, total_blocks, *_ = con.execute("PRAGMA database_size").fetchone()
    expected = HEADER_BYTES + int(block_size) * int(total_blocks)
    size = ws.db_path.stat().st_size
    if size < expected:
        return (
            f"the file is {size:,} bytes but its header lists {total_blocks} blocks "
            f"({expected:,} bytes): it was cut short"
        )
    return None


def _open_problem(ws: db.Workspace) -> tuple[duckdb.DuckDBPyConnection | None, str | None]:
    if not ws.db_path.exists():
        raise PrefloopError(f"no workspace database at {ws.db_path}; run `prefloop init` first")
    if ws.db_path.stat().st_size < HEADER_BYTES:
        return None, f"the file is {ws.db_path.stat().st_size} bytes, too short to hold a header"
    try:
        return _open_read_only(ws), None
    except PrefloopError as exc:
        cause = exc.__cause__
        if isinstance(cause, duckdb.Error) and not db.is_lock_error(cause):
            return None, f"it does not open: {_short(cause)}"
        raise  # held by another process, or not a database: the error says what to do


@contextmanager
def _opened(ws: db.Workspace) -> Iterator[tuple[duckdb.DuckDBPyConnection | None, str | None]]:
    """The database to check, or None and why it does not open. While a process owns it (the
    web app) the checks run there, each statement on its own (an error ends no transaction)."""
    through = owner.session(ws, transaction=False)
    if through is not None:
        with through as con:
            yield con, None
        return
    con, problem = _open_problem(ws)
    try:
        yield con, problem
    finally:
        if con is not None:
            con.close()


def quick_check(ws: db.Workspace) -> list[str]:
    """Problems a cheap look finds (header and size, opening, the schema version, the small
    tables read in full); empty when none."""
    with _opened(ws) as (con, problem):
        return [problem] if con is None else _quick_problems(ws, con)


def _quick_problems(ws: db.Workspace, con: duckdb.DuckDBPyConnection) -> list[str]:
    problems = []
    try:
        size = _size_problem(ws, con)
        if size:
            problems.append(size)
        db.schema_version(con)  # readable; a newer or older version is connect()'s to report
        present = _tables(con)
        for table in QUICK_TABLES:
            if table in present:
                try:
                    _scan(con, table)
                except duckdb.Error as exc:
                    problems.append(f"table {table} cannot be read: {_short(exc)}")
    except duckdb.Error as exc:
        problems.append(f"it cannot be read: {_short(exc)}")
    return problems


def _tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE' ORDER BY table_name"
        ).fetchall()
    ]


def _scan(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """Read every column of every row (so every data block's checksum is verified)."""
    # hashing the whole row makes DuckDB load each column's blocks; count(*) alone reads none
    return int(con.execute(f'SELECT count(*), max(hash(t)) FROM "{table}" AS t').fetchone()[0])


def full_check(ws: db.Workspace) -> CheckReport:
    """Verify the whole database file: its size against its header, every table read in full,
    and the files its rows name present inside the workspace."""
    report = CheckReport(ws.db_path)
    with _opened(ws) as (con, problem):
        if con is None:
            report.file_problems.append(problem)
        else:
            _check_all(ws, con, report)
    return report


def _check_all(ws: db.Workspace, con: duckdb.DuckDBPyConnection, report: CheckReport) -> None:
    try:
        size = _size_problem(ws, con)
        if size:
            report.file_problems.append(size)
        tables = _tables(con)
    except duckdb.Error as exc:
        report.file_problems.append(f"its catalog cannot be read: {_short(exc)}")
        return
    for table in tables:
        check = TableCheck(table)
        try:
            check.rows = _scan(con, table)
        except duckdb.Error as exc:
            check.error = _short(exc)
        report.tables.append(check)
    readable = {t.name for t in report.tables if t.error is None}
    for table, key, column, what in STORED_FILES:
        if table not in readable:
            continue
        rows = con.execute(
            f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL"
        ).fetchall()
        for name, stored in rows:
            try:
                path = ws.resolve_stored(stored, f"{what} {name}")
            except PrefloopError as exc:
                report.missing_files.append(str(exc))
                continue
            if not path.exists():
                report.missing_files.append(f"{what} {name}: {stored} is missing")


def backup(ws: db.Workspace, into: Path) -> Path:
    """Copy the workspace (a consistent copy of the database, then the artifacts) into
    into/<timestamp>; returns that folder. Works while other prefloop processes use it."""
    into = Path(into).expanduser().resolve()
    if into == ws.root.resolve() or into.is_relative_to(ws.root.resolve()):
        raise PrefloopError(
            f"back up into a folder outside the workspace (got {into}); a backup inside it "
            "would be copied into the next one"
        )
    if not ws.db_path.exists():
        raise PrefloopError(f"no workspace database at {ws.db_path}; run `prefloop init` first")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = into / stamp
    n = 1
    while final.exists():
        n += 1
        final = into / f"{stamp}-{n}"
    tmp = into / f".{final.name}.partial"
    try:
        tmp.mkdir(parents=True)
        _copy_database(ws, tmp / db.DB_NAME)
        # after the database: every file the copied rows name was complete before its row was
        # committed, so it is there to copy now
        if ws.artifacts.exists():
            shutil.copytree(
                ws.artifacts,
                tmp / "artifacts",
                ignore=shutil.ignore_patterns(".staging-*", "*.tmp", ".*.tmp"),
            )
        tmp.rename(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = storage_error(exc, tmp)
        if error is not None:
            raise error from exc
        if isinstance(exc, OSError):
            raise PrefloopError(f"cannot write the backup into {into}: {exc}") from exc
        raise
    return final


def _copy_database(ws: db.Workspace, target: Path) -> None:
    """A transactionally consistent copy of the workspace database into target."""
    through = owner.session(ws, transaction=False)
    if through is not None:  # the owner copies it (one statement: one consistent snapshot)
        with through as con:
            name = con.execute("SELECT current_database()").fetchone()[0]
            con.execute(f"ATTACH '{str(target).replace(chr(39), chr(39) * 2)}' AS backup_dst")
            try:
                con.execute(f'COPY FROM DATABASE "{name}" TO backup_dst')
            finally:
                con.execute("DETACH backup_dst")
        return
    con = duckdb.connect()  # in memory: the workspace file is attached read-only, briefly
    try:
        source = str(ws.db_path).replace("'", "''")
        db.with_lock_retry(
            ws, lambda: con.execute(f"ATTACH '{source}' AS src (READ_ONLY)"), db.LOCK_TIMEOUT_S
        )
        con.execute(f"ATTACH '{str(target).replace(chr(39), chr(39) * 2)}' AS dst")
        con.execute("COPY FROM DATABASE src TO dst")
        con.execute("DETACH dst")
        con.execute("DETACH src")
    finally:
        con.close()
