"""`prefloop check` (verify the whole database file) and `prefloop backup DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_check(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import integrity

    ws = _ws(args)
    report = integrity.full_check(ws)
    print(f"checking {report.path}")
    for problem in report.file_problems:
        print(f"file: {problem}")
    for table in report.tables:
        state = f"ok, {table.rows} rows" if table.error is None else f"DAMAGED: {table.error}"
        print(f"table {table.name}: {state}")
    for missing in report.missing_files:
        print(f"file named in the database: {missing}")
    if report.ok:
        print("verdict: the database and the files it names are intact")
        return
    print(f"verdict: the workspace is damaged; {integrity.RESTORE}")
    raise SystemExit(1)


def cmd_backup(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import integrity

    ws = _ws(args)
    folder = integrity.backup(ws, Path(args.dir))
    print(
        f"backed up {ws.root} to {folder}; to restore, stop prefloop and copy that folder in "
        "place of the workspace (or open it with --workspace)"
    )


def register(sub, add) -> None:
    """Add `prefloop check` and `prefloop backup` to the parser."""
    add(
        "check",
        cmd_check,
        "verify the whole workspace database (every table read in full, block checksums) and "
        "the files it names; exits 1 when something is damaged",
    )
    p = add(
        "backup",
        cmd_backup,
        "copy the workspace (a consistent copy of the database, and the artifacts) into "
        "DIR/<timestamp>; safe while the web app or a job runs",
    )
    p.add_argument("dir", metavar="DIR", help="folder to put the backup in (outside the workspace)")
