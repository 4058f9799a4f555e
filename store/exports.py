"""Writing export files (JSONL or Parquet) and their dataset cards, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from store.errors import PrefloopError


def write_rows(rows: list[dict], out: Path) -> Path:
    """Write rows to out (.jsonl or .parquet) through a temp file."""
    out = Path(out)
    suffix = "".join(out.suffixes[-1:]).lower()
    if suffix not in (".jsonl", ".parquet"):
        raise PrefloopError(f"cannot export to {out}: use a .jsonl or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if suffix == ".jsonl":
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, out)
    return out


def write_card(out: Path, text: str) -> Path:
    """Write the dataset card README.md beside an export file."""
    card = Path(out).parent / "README.md"
    tmp = card.with_name(".README.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, card)
    return card
