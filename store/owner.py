"""One owner of a workspace database: the serving process keeps it open, others go through it.

While the web app runs, its process owns the database: one DuckDB instance, migrated once, and a
cursor (one transaction) per unit of work, so threads use DuckDB's own concurrency instead of
reopening the file. The owner also listens on a Unix socket (mode 0600) named in
`<workspace>/.prefloop-owner.json`; `store.db.connect` in any other process finds it there and
runs its unit of work through a `RemoteConnection`: the same store functions, each SQL statement
executed by the owner on a cursor of its own, inside one transaction per `connect` block. With no
owner (no file, or a server that is gone) `connect` opens the file itself.

Wire format: each message is a JSON header plus an optional binary part (Arrow IPC for data
frames); values in rows and parameters are tagged JSON, never pickle.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import io
import json
import os
import socket
import socketserver
import struct
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from store import db
from store.errors import PrefloopError

SERVE_ENV = "PREFLOOP_OWN_DATABASE"  # set by `prefloop serve` for the web app's process
OWNER_FILE = ".prefloop-owner.json"
SOCKET_NAME = ".prefloop.sock"
MAX_UNIX_PATH = 100  # sun_path holds 108 bytes on Linux; leave room
CONNECT_TIMEOUT_S = 5.0

_OWNED: dict[str, Owner] = {}
_OWNED_GUARD = threading.Lock()


# ---- values over the wire ---------------------------------------------------------------------

_TAG = "\x00t"


def _enc(value: Any) -> Any:
    """A JSON-safe form of a DuckDB / Python value (tagged where JSON has no type for it)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value is pd.NaT:
        return None
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if isinstance(value, dt.datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {_TAG: "time", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "v": str(value)}
    if isinstance(value, dict):
        return {_TAG: "dict", "v": [[_enc(k), _enc(v)] for k, v in value.items()]}
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _enc(value.tolist())
    raise TypeError(f"cannot send a {type(value).__name__} to the database owner")


def _dec(value: Any) -> Any:
    if isinstance(value, list):
        return [_dec(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag, v = value[_TAG], value["v"]
    if tag == "datetime":
        return dt.datetime.fromisoformat(v)
    if tag == "date":
        return dt.date.fromisoformat(v)
    if tag == "time":
        return dt.time.fromisoformat(v)
    if tag == "timedelta":
        return dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
    if tag == "decimal":
        return decimal.Decimal(v)
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "uuid":
        return uuid.UUID(v)
    if tag == "dict":
        return {_dec(k): _dec(x) for k, x in v}
    raise ValueError(f"unknown value tag {tag!r}")


def _params(params: Any) -> Any:
    if params is None:
        return None
    if isinstance(params, dict):
        return {_TAG: "dict", "v": [[k, _enc(v)] for k, v in params.items()]}
    return [_enc(p) for p in params]


# The owner sends a result as DuckDB's own Arrow form and the client turns it into a data frame
# with DuckDB too, so .df() gives the same dtypes in both places; that copy is the point here.
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)
_LOCAL = threading.local()


def _local() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB, for converting between data frames and Arrow."""
    con = getattr(_LOCAL, "con", None)
    if con is None:
        con = _LOCAL.con = duckdb.connect(":memory:")
    return con


def _to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()


def _send(sock: socket.socket, header: dict, blob: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("!II", len(head), len(blob)) + head + blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, bytes]:
    n_head, n_blob = struct.unpack("!II", _recv_exact(sock, 8))
    header = json.loads(_recv_exact(sock, n_head))
    return header, _recv_exact(sock, n_blob) if n_blob else b""


def _error_header(exc: BaseException) -> dict:
    return {"error": type(exc).__name__, "message": str(exc)}


def _rebuild_error(header: dict) -> BaseException:
    """The owner's exception as the same DuckDB class here (callers retry on its type)."""
    name, message = header["error"], header["message"]
    cls = getattr(duckdb, name, None)
    if isinstance(cls, type) and issubclass(cls, duckdb.Error):
        return cls(message)
    if name == "PrefloopError":
        return PrefloopError(message)
    return duckdb.Error(f"{name}: {message}")


# ---- the owner --------------------------------------------------------------------------------


class Owner:
    """The process's one open DuckDB instance for a workspace (and its socket server)."""

    def __init__(self, ws: db.Workspace) -> None:
        self.ws = ws
        self.con = db.with_lock_retry(
            ws, lambda: duckdb.connect(str(ws.db_path)), db.LOCK_TIMEOUT_S
        )
        db.migrate(self.con)
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self._turns: dict[str, threading.Lock] = {}
        self._turns_guard = threading.Lock()

    def turn(self, name: str) -> threading.Lock:
        """The lock that units of work asking for turns under name take, in every client."""
        with self._turns_guard:
            return self._turns.setdefault(name, threading.Lock())

    @contextmanager
    def session(
        self, transaction: bool = True, turns: str | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """One unit of work: a fresh cursor in one transaction (rolled back if work raises);
        without transaction, each statement commits on its own. Units with the same turns name
        run one at a time."""
        turn = self.turn(turns) if turns else contextlib.nullcontext()
        with turn, self._cursor_session(transaction) as cur:
            yield cur

    @contextmanager
    def _cursor_session(self, transaction: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.con.cursor()
        try:
            if not transaction:
                yield cur
                return
            with db.transaction(cur):
                yield cur
        finally:
            cur.close()

    def serve(self) -> None:
        """Listen on the workspace's socket for other processes' units of work."""
        path = _socket_path(self.ws)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = _Server(str(path), _Handler, bind_and_activate=False)
        server.owner = self
        server.server_bind()
        os.chmod(path, 0o600)  # before listen(): nobody can connect until it is private
        server.server_activate()
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever, name="prefloop-db-owner", daemon=True
        )
        self.thread.start()
        record = {"pid": os.getpid(), "socket": str(path)}
        tmp = self.ws.root / f".{OWNER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        os.chmod(tmp, 0o600)
        tmp.replace(self.ws.root / OWNER_FILE)

    def close(self) -> None:
        """Stop serving, remove the socket and owner file, close the database."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            _remove_owner_files(self.ws, os.getpid())
            self.server = None
        self.con.close()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    owner: Owner


class _Handler(socketserver.BaseRequestHandler):
    """One client connection = one unit of work: a cursor and its transaction."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        cur: duckdb.DuckDBPyConnection | None = None
        open_tx = False
        self.turn: threading.Lock | None = None
        try:
            while True:
                try:
                    header, blob = _recv(sock)
                except (ConnectionError, OSError):
                    return
                op = header["op"]
                try:
                    reply, out = self._do(op, header, blob, cur)
                except Exception as exc:  # reported to the client, which raises it
                    _send(sock, _error_header(exc))
                    continue
                if op == "begin":
                    cur, open_tx = reply.pop("_cursor"), reply.pop("_tx")
                elif op in ("commit", "rollback"):
                    open_tx = False
                _send(sock, reply, out)
                if op in ("commit", "rollback"):
                    return
        finally:
            if cur is not None:
                if open_tx:  # the client went away mid-transaction: nothing of it is kept
                    with contextlib.suppress(duckdb.Error):
                        cur.execute("ROLLBACK")
                cur.close()
            if self.turn is not None:
                self.turn.release()

    def _do(
        self, op: str, header: dict, blob: bytes, cur: duckdb.DuckDBPyConnection | None
    ) -> tuple[dict, bytes]:
        if op == "begin":
            owner: Owner = self.server.owner  # type: ignore[attr-defined]
            if header.get("turns"):
                self.turn = owner.turn(header["turns"])
                self.turn.acquire()
            new = owner.con.cursor()
            if header.get("transaction", True):
                new.execute("BEGIN")
            return {"ok": True, "_cursor": new, "_tx": header.get("transaction", True)}, b""
        if cur is None:
            raise PrefloopError(f"{op} before begin")
        if op == "execute":
            cur.execute(header["sql"], _dec_params(header.get("params")))
            return {"ok": True}, b""
        if op == "executemany":
            cur.executemany(header["sql"], [_dec_params(p) for p in header["params"]])
            return {"ok": True}, b""
        if op == "fetchone":
            row = cur.fetchone()
            return {"row": None if row is None else _enc(list(row))}, b""
        if op == "fetchall":
            return {"rows": [_enc(list(r)) for r in cur.fetchall()]}, b""
        if op == "fetchmany":
            return {"rows": [_enc(list(r)) for r in cur.fetchmany(header["n"])]}, b""
        if op == "df":
            return {"ok": True}, _to_ipc(cur.to_arrow_table())
        if op == "register":
            cur.register(header["name"], _from_ipc(blob))
            return {"ok": True}, b""
        if op == "unregister":
            cur.unregister(header["name"])
            return {"ok": True}, b""
        if op in ("commit", "rollback"):
            if header.get("transaction", True):
                cur.execute(op.upper())
            return {"ok": True}, b""
        raise PrefloopError(f"unknown operation {op!r}")


def _dec_params(params: Any) -> Any:
    if isinstance(params, dict) and _TAG in params:
        return {k: _dec(v) for k, v in params["v"]}
    return None if params is None else [_dec(p) for p in params]


def _socket_path(ws: db.Workspace) -> Path:
    path = ws.root / SOCKET_NAME
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    digest = hashlib.sha256(str(ws.root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"prefloop-{digest}.sock"


def _remove_owner_files(ws: db.Workspace, pid: int) -> None:
    """Remove the owner record of pid (and its socket), leaving a newer owner's alone."""
    record = _read_record(ws)
    if record is None or record.get("pid") != pid:
        return
    with contextlib.suppress(OSError):
        Path(record["socket"]).unlink()
    with contextlib.suppress(OSError):
        (ws.root / OWNER_FILE).unlink()


def _read_record(ws: db.Workspace) -> dict | None:
    try:
        return json.loads((ws.root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serving(ws: db.Workspace) -> bool:
    """Whether a live process (the web app, perhaps this one) owns ws's database."""
    record = _read_record(ws)
    pid = int(record.get("pid") or 0) if record else 0
    return pid > 0 and _alive(pid)


def own(ws: db.Workspace, *, serve: bool = True) -> Owner:
    """Make this process the owner of ws's database (once; later calls return the same owner)."""
    key = str(ws.db_path.resolve())
    with _OWNED_GUARD:
        owner = _OWNED.get(key)
        if owner is None:
            owner = Owner(ws)
            _OWNED[key] = owner
            atexit.register(release, ws)
        if serve and owner.server is None:
            owner.serve()
        return owner


def own_if_serving(ws: db.Workspace) -> None:
    """Own ws's database when this process is the web app started by `prefloop serve` (and
    no other process owns it already: a second web app on the workspace goes through it)."""
    if os.environ.get(SERVE_ENV) != "1" or owned(ws) is not None:
        return
    other = dial(ws)
    if other is not None:
        other.close()
        return
    own(ws)


def release(ws: db.Workspace) -> None:
    """Stop owning ws's database (the socket goes away; others open the file again)."""
    with _OWNED_GUARD:
        owner = _OWNED.pop(str(ws.db_path.resolve()), None)
    if owner is not None:
        owner.close()


def owned(ws: db.Workspace) -> Owner | None:
    """This process's owner of ws's database, if it is one."""
    return _OWNED.get(str(ws.db_path.resolve())) if _OWNED else None


# ---- the client -------------------------------------------------------------------------------


def dial(ws: db.Workspace) -> socket.socket | None:
    """A connection to the owner of ws's database, or None when no owner runs (a record left
    by a killed owner is removed)."""
    record = _read_record(ws)
    if record is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(record["socket"])
    except (FileNotFoundError, ConnectionRefusedError, OSError):
        sock.close()
        pid = int(record.get("pid") or 0)
        if pid and not _alive(pid):
            _remove_owner_files(ws, pid)
        return None
    sock.settimeout(None)
    return sock


class RemoteConnection:
    """The part of DuckDBPyConnection the store uses, run by the owner process."""

    def __init__(self, sock: socket.socket, ws: db.Workspace) -> None:
        self._sock = sock
        self._ws = ws

    def _call(self, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
        try:
            _send(self._sock, header, blob)
            reply, out = _recv(self._sock)
        except (ConnectionError, OSError) as exc:
            if header["op"] == "commit":
                outcome = "it stopped while committing: check whether the change was stored"
            else:
                outcome = "nothing of this unit of work was stored: run the command again"
            raise PrefloopError(
                f"lost the connection to the process that owns {self._ws.db_path} "
                f"(the web app stopped?); {outcome}"
            ) from exc
        if "error" in reply:
            raise _rebuild_error(reply)
        return reply, out

    def execute(self, sql: str, params: Any = None) -> RemoteConnection:
        self._call({"op": "execute", "sql": sql, "params": _params(params)})
        return self

    def executemany(self, sql: str, params: Any) -> RemoteConnection:
        self._call({"op": "executemany", "sql": sql, "params": [_params(p) for p in params]})
        return self

    def fetchone(self) -> tuple | None:
        row = self._call({"op": "fetchone"})[0]["row"]
        return None if row is None else tuple(_dec(row))

    def fetchall(self) -> list[tuple]:
        return [tuple(_dec(r)) for r in self._call({"op": "fetchall"})[0]["rows"]]

    def fetchmany(self, size: int = 1) -> list[tuple]:
        return [tuple(_dec(r)) for r in self._call({"op": "fetchmany", "n": size})[0]["rows"]]

    def df(self) -> pd.DataFrame:
        return _local().from_arrow(_from_ipc(self._call({"op": "df"})[1])).df()

    fetchdf = df

    def register(self, name: str, frame: pd.DataFrame) -> RemoteConnection:
        table = _local().from_df(frame).to_arrow_table()  # the types DuckDB reads from frame
        self._call({"op": "register", "name": name}, _to_ipc(table))
        return self

    def unregister(self, name: str) -> RemoteConnection:
        self._call({"op": "unregister", "name": name})
        return self


@contextmanager
def remote_session(
    ws: db.Workspace, sock: socket.socket, transaction: bool = True, turns: str | None = None
) -> Iterator[RemoteConnection]:
    """One unit of work run by the owner: BEGIN, the block's statements, COMMIT (or ROLLBACK
    when the block raises; a client that dies mid-way is rolled back by the owner). Without
    transaction, each statement commits on its own; see Owner.session for turns."""
    con = RemoteConnection(sock, ws)
    tx = {"transaction": transaction}
    try:
        con._call({"op": "begin", "turns": turns, **tx})
        try:
            yield con
        except BaseException:
            with contextlib.suppress(duckdb.Error, PrefloopError):
                con._call({"op": "rollback", **tx})
            raise
        con._call({"op": "commit", **tx})
    finally:
        sock.close()


def session(
    ws: db.Workspace, *, transaction: bool = True, turns: str | None = None
) -> AbstractContextManager | None:
    """A unit of work through the owner of ws's database (this process, or the one whose
    socket answers) as a context manager, or None when no process owns it."""
    mine = owned(ws)
    if mine is not None:
        return mine.session(transaction, turns)
    sock = dial(ws)
    if sock is not None:
        return remote_session(ws, sock, transaction, turns)
    return None
