"""Writing export files (JSONL or Parquet) and their dataset cards, atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from store.errors import PrefloopError, storage_error


def write_rows(rows: list[dict], out: Path) -> Path:
    """Write rows to out (.jsonl or .parquet) through a temp file."""
    out = Path(out)
    suffix = "".join(out.suffixes[-1:]).lower()
    if suffix not in (".jsonl", ".parquet"):
        raise PrefloopError(f"cannot export to {out}: use a .jsonl or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        if suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            pd.DataFrame(rows).to_parquet(tmp, index=False)

    return write_atomic(out, write)


def write_card(out: Path, text: str) -> Path:
    """Write the dataset card README.md beside an export file."""
    card = Path(out).parent / "README.md"
    return write_atomic(card, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_atomic(target: Path, write: Callable[[Path], object]) -> Path:
    """Write target through write(temp file) and a rename: a failure (a full disk) leaves the
    old file or none, never a half-written one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = storage_error(exc, target)
        if error is None:
            raise
        raise error from exc
    return target
