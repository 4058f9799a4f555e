"""Background jobs (sampling, tuning): status, heartbeat and metrics rows."""

from __future__ import annotations

import json
import os
import socket

import duckdb
import pandas as pd

from store.errors import PrefloopError

STALE_AFTER_S = 120
# a running job with no heartbeat for STALE_AFTER_S, or whose process is gone, as list_runs shows it
STOPPED_SILENTLY = "the job stopped without reporting (killed or crashed)"


def start_run(
    con: duckdb.DuckDBPyConnection, kind: str, config: dict, log_path: str | None = None
) -> int:
    """Record a job as running in this process; returns its id."""
    return int(
        con.execute(
            "INSERT INTO runs (kind, status, config, pid, host, log_path) "
            "VALUES (?, 'running', ?, ?, ?, ?) RETURNING id",
            [
                kind,
                json.dumps(config, sort_keys=True, default=str),
                os.getpid(),
                socket.gethostname(),
                log_path,
            ],
        ).fetchone()[0]
    )


def heartbeat(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    metrics: dict | None = None,
    step: int | None = None,
) -> None:
    """Mark the job alive and optionally append one step's metrics."""
    con.execute("UPDATE runs SET heartbeat = current_timestamp WHERE id = ?", [run_id])
    if metrics:
        con.executemany(
            "INSERT INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
            [[run_id, step or 0, k, float(v)] for k, v in metrics.items()],
        )


def finish_run(con: duckdb.DuckDBPyConnection, run_id: int, result: str | None) -> None:
    """Mark a job completed with its result (e.g. the new round or version id)."""
    con.execute(
        "UPDATE runs SET status = 'completed', finished = current_timestamp, result = ?, "
        "heartbeat = current_timestamp WHERE id = ?",
        [result, run_id],
    )


def fail_run(con: duckdb.DuckDBPyConnection, run_id: int, error: str) -> None:
    """Mark a job failed with the error message."""
    con.execute(
        "UPDATE runs SET status = 'failed', finished = current_timestamp, error = ? WHERE id = ?",
        [error[:2000], run_id],
    )


def process_alive(pid: int | None, host: str | None) -> bool:
    """Whether a job's process may still run (one on another host is assumed to)."""
    if pid is None or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_dead(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Record as failed the running jobs whose process is gone (killed or crashed); returns
    their ids."""
    rows = con.execute("SELECT id, pid, host FROM runs WHERE status = 'running'").fetchall()
    dead = []
    for run_id, pid, host in rows:
        if process_alive(pid, host):
            continue
        con.execute(
            "UPDATE runs SET status = 'failed', finished = current_timestamp, error = ? "
            "WHERE id = ?",
            [f"the job's process {pid} is gone: it was killed or crashed", run_id],
        )
        dead.append(int(run_id))
    return dead


def list_runs(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Jobs, newest first; a running job whose process died is reported failed."""
    df = con.execute(
        "SELECT id, kind, status, config, pid, host, started, heartbeat, finished, error, result, "
        "log_path, epoch(current_timestamp::TIMESTAMP - heartbeat) AS idle_s "
        "FROM runs ORDER BY id DESC"
    ).df()
    for i, row in df.iterrows():
        if row["status"] == "running" and (
            not process_alive(row["pid"], row["host"]) or row["idle_s"] > STALE_AFTER_S
        ):
            df.at[i, "status"] = "failed"
            df.at[i, "error"] = STOPPED_SILENTLY
    df["config"] = df["config"].map(json.loads)
    return df.drop(columns=["idle_s"])


def get_run(con: duckdb.DuckDBPyConnection, run_id: int) -> dict:
    """One job's row; unknown ids raise."""
    df = list_runs(con)
    match = df[df["id"] == int(run_id)]
    if match.empty:
        raise PrefloopError(f"unknown run {run_id}")
    return match.iloc[0].to_dict()


def run_metrics(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """A job's metrics, one row per step, one column per metric name."""
    df = con.execute(
        "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step", [int(run_id)]
    ).df()
    if df.empty:
        return pd.DataFrame()
    return df.pivot_table(index="step", columns="name", values="value", aggfunc="last")


def metric_timeline(con: duckdb.DuckDBPyConnection, run_id: int, name: str) -> pd.DataFrame:
    """One metric of a job in the order it was logged: step, value and seconds since the job
    started (at_s)."""
    return con.execute(
        "SELECT m.step, m.value, epoch(m.created - r.started) AS at_s "
        "FROM metrics m JOIN runs r ON r.id = m.run_id "
        "WHERE m.run_id = ? AND m.name = ? ORDER BY m.created, m.step",
        [int(run_id), name],
    ).df()


def elapsed_s(con: duckdb.DuckDBPyConnection, run_id: int) -> float:
    """Seconds since a job started (until it finished, for a finished one); unknown ids raise."""
    row = con.execute(
        "SELECT epoch(coalesce(finished, current_timestamp::TIMESTAMP) - started) "
        "FROM runs WHERE id = ?",
        [int(run_id)],
    ).fetchone()
    if row is None:
        raise PrefloopError(f"unknown run {run_id}")
    return float(row[0])


def resume_run(con: duckdb.DuckDBPyConnection, run_id: int, after_step: int) -> None:
    """Mark a failed job running again in this process, its metrics past `after_step` (the
    step it resumes after) dropped, so its steps continue from there."""
    con.execute(
        "UPDATE runs SET status = 'running', finished = NULL, error = NULL, result = NULL, "
        "pid = ?, host = ?, heartbeat = current_timestamp WHERE id = ?",
        [os.getpid(), socket.gethostname(), int(run_id)],
    )
    con.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [int(run_id), int(after_step)])
