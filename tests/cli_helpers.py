"""Running the prefloop CLI from tests, in-process or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run prefloop in-process; return stdout; fail the test on a non-zero exit."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, f"prefloop {' '.join(map(str, args))} exited {code}: {err}"
    return out


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run prefloop in-process expecting a user error; return its stderr."""
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, f"expected a user error, got exit {code}"
    assert "Traceback" not in err
    return err


def run_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run prefloop as a separate process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def rank_by_length(groups: list[dict], annotator: str = "script") -> list[dict]:
    """A scripted annotator who prefers shorter completions (ties broken by id)."""
    return [
        {
            "group_id": g["group_id"],
            "annotator": annotator,
            "ranking": [
                [c["id"]] for c in sorted(g["candidates"], key=lambda c: (len(c["text"]), c["id"]))
            ],
        }
        for g in groups
    ]
