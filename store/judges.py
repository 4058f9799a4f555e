"""The judge registry: programmatic judges the operator named, the only ones the web app runs."""

from __future__ import annotations

import re

import duckdb
import pandas as pd

from store.errors import PrefloopError

# Names the judge specs use for themselves: never a registered judge's name.
RESERVED = ("llm", "human")
RESERVED_PREFIXES = ("rm:",)
MAX_NAME = 32
_NAME = re.compile(rf"^[a-z0-9][a-z0-9_-]{{0,{MAX_NAME - 1}}}$")
_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def check_name(name: str) -> str:
    """The judge name, if valid: lower-case letters, digits, '_' or '-', not a reserved word."""
    name = (name or "").strip()
    if name in RESERVED or name.startswith(RESERVED_PREFIXES):
        raise PrefloopError(
            f"{name!r} is reserved for a built-in judge ({', '.join(RESERVED)}, rm:VERSION); "
            "pick another name"
        )
    if not _NAME.match(name):
        raise PrefloopError(
            f"invalid judge name {name!r}: use lower-case letters, digits, '_' or '-' "
            f"(starting with a letter or digit, at most {MAX_NAME} characters)"
        )
    return name


def check_spec(spec: str) -> str:
    """The spec, if it has the form package.module:function."""
    spec = (spec or "").strip()
    if not _SPEC.match(spec):
        raise PrefloopError(
            f"judge {spec!r} is not of the form module:function (e.g. mypkg.judges:shorter)"
        )
    return spec


def add_judge(
    con: duckdb.DuckDBPyConnection, name: str, spec: str, author: str | None = None
) -> None:
    """Register spec under name; a name registered already is refused."""
    name, spec = check_name(name), check_spec(spec)
    if get_judge(con, name) is not None:
        raise PrefloopError(
            f"judge {name!r} is registered already; `prefloop judges remove {name}` first"
        )
    con.execute("INSERT INTO judges (name, spec, author) VALUES (?, ?, ?)", [name, spec, author])


def get_judge(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """The module:function registered under name, or None."""
    row = con.execute("SELECT spec FROM judges WHERE name = ?", [name]).fetchone()
    return None if row is None else str(row[0])


def list_judges(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Registered judges: name, spec, author, created; by name."""
    return con.execute("SELECT name, spec, author, created FROM judges ORDER BY name").df()


def remove_judge(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Unregister a judge (what it stored stays); an unknown name is refused."""
    if get_judge(con, name) is None:
        raise PrefloopError(f"no judge named {name!r} is registered; see `prefloop judges list`")
    con.execute("DELETE FROM judges WHERE name = ?", [name])
