"""JSON for `--json` output: always valid JSON (missing numbers as null), whatever the data."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """value as JSON-able Python: NaN, ±inf, NaT and NA -> None, numpy and pandas types to
    Python ones, tables to lists of records, dataclasses to dicts, sets to sorted lists."""
    import numpy as np  # here, not at the top: the CLI starts without numpy and pandas
    import pandas as pd

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, pd.DataFrame):
        return [plain(r) for r in value.to_dict("records")]
    if isinstance(value, pd.Series):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [plain(v) for v in sorted(value, key=str)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (pd.Timedelta, dt.timedelta)):
        return value.total_seconds()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    """value as strict JSON text (json.dumps keywords such as indent pass through)."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)
