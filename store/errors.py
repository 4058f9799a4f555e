"""The one exception type for errors a user can cause and fix, and the classifier that turns
a failing disk or a damaged database file into one."""

from __future__ import annotations

import errno
import os
import re


class PrefloopError(Exception):
    """A user-facing error whose message says what to do."""


_DISK_FULL = ("no space left on device", "disk full", "not enough space on the disk")
_CORRUPT = (
    "could not read enough bytes",
    "corrupt database file",
    "does not match stored checksum",
    "not a valid duckdb database file",
)
_FILE_IN_MESSAGE = re.compile(r'file "([^"]+)"')


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_error(
    exc: BaseException, db_path: str | os.PathLike | None = None
) -> PrefloopError | None:
    """The one-line error for a full disk or a damaged database behind exc (or None when exc is
    neither); db_path names the workspace database where the message does not."""
    for err in _chain(exc):
        text = str(err)
        lower = text.lower()
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or any(
            s in lower for s in _DISK_FULL
        ):
            where = getattr(err, "filename", None) or _file_named(text) or db_path
            place = f"the disk holding {where}" if where else "the disk holding the workspace"
            return PrefloopError(
                f"{place} is full (no space left on device): nothing of this command was "
                "written (its database changes were rolled back and no file was left "
                "half-written); free space on that disk, then run the command again"
            )
        if any(s in lower for s in _CORRUPT):
            where = _file_named(text) or db_path or "the workspace database"
            reason = " ".join(text.split())[:160]
            return PrefloopError(
                f"the database file {where} is damaged ({reason}); run `prefloop check` to see "
                "what is affected and restore the workspace from a backup made with "
                "`prefloop backup`"
            )
    return None


def _file_named(text: str) -> str | None:
    match = _FILE_IN_MESSAGE.search(text)
    return match.group(1) if match else None
