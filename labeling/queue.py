"""The assignment queue: which group an annotator labels next, leases, submissions, gold.

Rules (a round's `overlap` is how many annotators each group should get; default 1):

- A group's slots are filled by its labels that are not skipped plus the unexpired leases of
  annotators who have not labelled it yet. A skip counts as done for the annotator who skipped
  (they never get the group again) but leaves the slot to someone else.
- `take` gives an annotator, in this order: the group they hold an unexpired lease on (a page
  reload gets the same group, and the lease is renewed); else a group whose lease of theirs ran
  out but which still has a free slot (they come back to what they were doing); else a group they
  have not labelled with a free slot, the fullest first (closest to the target), then in round
  order. Gold groups ignore the target: every annotator gets each gold group once, mixed in at
  random (seeded per annotator and count, so reproducible) with probability gold-left / all-left.
- A taken group is leased for `lease_s` seconds ($PREFLOOP_LEASE_S, default 15 min), so two
  annotators never both take its last slot; an expired lease frees the slot.
- `submit` stores the label and ends the lease in one transaction. Without an unexpired lease the
  label is accepted only while the group still has a free slot (or is gold, or it is a skip), so
  the overlap target is never exceeded.

Concurrency: every change to a round's queue first takes the round's write lock in the
database (store.assignment.lock_round: a real update of the round's row). DuckDB's optimistic
MVCC lets two transactions insert different lease rows without noticing each other, so a plain
check-then-insert in two threads of one process could fill a slot twice; with the row update
the second transaction fails with a write-write "Conflict" and the whole unit of work is retried
with a fresh snapshot. On top of that, threads of one process take turns on a per-workspace
lock, so they wait for each other instead of failing and retrying (the row lock still guards
anything that gets past it, e.g. a second copy of this module). Processes that reach the
database through its owner (the web app) take turns there too (connect's `turns`); with no
owner they cannot interleave at all: DuckDB lets one process at a time open the file, and
store.db.connect retries until it gets it.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import duckdb
import pandas as pd

from labeling.ranking import fractional_ranks, ordered_pairs
from store import assignment, labels, rounds
from store import db as storedb
from store import gold as storegold
from store import suggestions as storesuggestions
from store.assignment import Option
from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import GroupRecord

LEASE_ENV = "PREFLOOP_LEASE_S"
DEFAULT_LEASE_S = 15 * 60.0
RETRY_S = 30.0  # how long a unit of work retries write-write conflicts before giving up
SOURCE = "web"

T = TypeVar("T")


def lease_seconds() -> float:
    """The default lease: $PREFLOOP_LEASE_S seconds, else 15 minutes."""
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        raise PrefloopError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise PrefloopError(f"{LEASE_ENV} must be more than 0 seconds, got {raw}")
    return value


def utcnow() -> datetime:
    """The current time as naive UTC, the form leases are stored in."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _stable(*parts: object) -> int:
    """A hash of parts that is the same in every process (unlike hash())."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _is_conflict(exc: Exception) -> bool:
    """DuckDB's write-write conflict ("Conflict on update!", "write-write conflict", …)."""
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(ws: storedb.Workspace) -> threading.Lock:
    """This process's lock on a workspace's queue (threads wait here instead of conflicting)."""
    key = str(ws.db_path.resolve())
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


def _unit(ws: storedb.Workspace, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run work in one transaction, again from the start after a write-write conflict."""
    deadline = time.monotonic() + RETRY_S
    delay = 0.002
    while True:
        try:
            with _process_lock(ws), storedb.connect(ws, turns="queue") as con:
                return work(con)
        except duckdb.Error as exc:
            if not _is_conflict(exc):
                raise
            if time.monotonic() >= deadline:
                raise PrefloopError(
                    f"the assignment queue stayed busy for {RETRY_S:.0f} s; try again"
                ) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)


def _annotator(name: str | None) -> str:
    name = (name or "").strip()
    if not name:
        raise PrefloopError("enter your annotator name first")
    return name


@dataclass
class Ticket:
    """What `take` hands out: a group (None when nothing is left) and the annotator's counts."""

    round_id: int
    group: GroupRecord | None
    done: int  # groups of the round this annotator has labelled or skipped
    left: int  # groups this annotator could still get (the one handed out included)
    expires: datetime | None = None  # when the lease on group ends (naive UTC)
    hint: list[list[int]] | None = None  # the judge's ranking of group, if the round shows it


def choose(
    options: list[Option],
    annotator: str,
    round_id: int,
    done: int,
    now: datetime,
    total: int | None = None,
) -> Option | None:
    """The queue's policy: which of the available groups an annotator gets (see module doc).

    options may be a subset of the open groups (store.assignment.offer's) as long as it holds
    the own leases, the gold groups and the best regular group; total counts all open groups."""
    if not options:
        return None
    total = len(options) if total is None else total
    own = [o for o in options if o.own_expires is not None]
    live = [o for o in own if o.own_expires > now]
    if live or own:
        return max(live or own, key=lambda o: (o.own_expires, -o.group_id))
    gold = [o for o in options if o.gold]
    regular = [o for o in options if not o.gold]
    rng = random.Random(_stable("gold", annotator, round_id, done))
    if gold and (not regular or rng.random() < len(gold) / total):
        return min(gold, key=lambda o: _stable(annotator, o.group_id))
    return min(regular, key=lambda o: (-o.filled, o.group_id))


def take(
    ws: storedb.Workspace,
    annotator: str,
    round_id: int,
    lease_s: float | None = None,
    *,
    now: datetime | None = None,
) -> Ticket:
    """Lease the annotator's next group of a round (the same one again while they hold it)."""
    annotator = _annotator(annotator)
    lease = lease_seconds() if lease_s is None else float(lease_s)
    if not lease > 0:
        raise PrefloopError(f"a lease must last more than 0 seconds, got {lease_s}")

    def work(con: duckdb.DuckDBPyConnection) -> Ticket:
        assignment.lock_round(con, round_id)
        at = now or utcnow()
        found = assignment.offer(con, annotator, round_id, at)
        done = found.done
        pick = choose(found.options, annotator, int(round_id), done, at, found.total)
        if pick is None:
            return Ticket(int(round_id), None, done, 0)
        expires = at + timedelta(seconds=lease)
        assignment.hold(con, pick.group_id, annotator, expires)
        group = rounds.groups(con, group_ids=[pick.group_id])[0]
        hint = None
        if found.show_suggestions:
            suggested = storesuggestions.suggestion(con, pick.group_id)
            hint = suggested[1] if suggested else None
        return Ticket(int(round_id), group, done, found.total, expires, hint)

    return _unit(ws, work)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _submit(
    con: duckdb.DuckDBPyConnection,
    record: LabelRecord,
    at: datetime,
    source: str,
    *,
    outside_queue_ok: bool = False,
    expires: datetime | None = None,
) -> int:
    """Store a new label under the round's lock, refusing one that would exceed the target.

    expires: the annotator's lease on the group (store.assignment.standing), which the caller
    looked up after checking that they have no label on it yet."""
    gid, annotator = int(record.group_id), record.annotator
    skipped = "skipped" in record.flags
    if not (expires is not None and expires > at) and not skipped:
        slot = assignment.slot(con, gid, annotator, at)
        if not slot.free and not (outside_queue_ok and expires is None):
            target = f"round {slot.round_id} asks for {slot.overlap} annotator(s) per group"
            if expires is None:
                why = f"you do not hold group {gid} and its slots are taken ({target})"
            else:
                ago = _ago((at - expires).total_seconds())
                why = (
                    f"your hold on group {gid} ran out {ago} ago and its slots went to other "
                    f"annotators meanwhile ({target})"
                )
            raise PrefloopError(
                f"{why}; your label was not stored. Take the next group from the queue."
            )
    label = labels.add_label(con, record, source=source)
    if expires is not None:
        assignment.drop(con, gid, annotator)
    return label


def _already(gid: int, annotator: str) -> PrefloopError:
    return PrefloopError(
        f"group {gid} already has a label from {annotator!r}; each annotator labels a group "
        "once (revise it instead)"
    )


def submit(
    ws: storedb.Workspace,
    record: LabelRecord,
    *,
    now: datetime | None = None,
    source: str = SOURCE,
) -> int:
    """Store a new label from the queue and end its lease; returns the label id.

    Refused (nothing stored) when the annotator holds no unexpired lease on the group and the
    group has no free slot left, unless the label is a skip or the group is gold.
    """
    record = replace(record, annotator=_annotator(record.annotator))

    def work(con: duckdb.DuckDBPyConnection) -> int:
        assignment.lock_group_round(con, record.group_id)
        label, expires = assignment.standing(con, record.group_id, record.annotator)
        if label is not None:
            raise _already(int(record.group_id), record.annotator)
        return _submit(con, record, now or utcnow(), source, expires=expires)

    return _unit(ws, work)


def _revise(con: duckdb.DuckDBPyConnection, record: LabelRecord, at: datetime) -> int:
    """Revise the author's label; a skip turned into a label needs a free slot."""
    gid, annotator = int(record.group_id), record.annotator
    old = labels.labels(con, [assignment.round_of_group(con, gid)], annotator)
    old = old[old["group_id"] == gid]
    was_skipped = not old.empty and "skipped" in old.iloc[0]["flags"]
    if was_skipped and "skipped" not in record.flags:
        slot = assignment.slot(con, gid, annotator, at)
        if not slot.free:
            raise PrefloopError(
                f"you skipped group {gid} and other annotators have filled its "
                f"{slot.overlap} slot(s) since; your skip stays"
            )
    return labels.revise_label(con, record, source=SOURCE)


def revise(ws: storedb.Workspace, record: LabelRecord, *, now: datetime | None = None) -> int:
    """Revise the annotator's own label on a group (kept in its history); returns the revision."""
    record = replace(record, annotator=_annotator(record.annotator))

    def work(con: duckdb.DuckDBPyConnection) -> int:
        assignment.lock_group_round(con, record.group_id)
        return _revise(con, record, now or utcnow())

    return _unit(ws, work)


@dataclass
class Saved:
    """What `save` did: the label's id and revision (1: a new label)."""

    label_id: int
    revision: int


def save(ws: storedb.Workspace, record: LabelRecord, *, now: datetime | None = None) -> Saved:
    """Store a label from the annotator page: a revision if the annotator labelled the group,
    else a queue submission.

    A label for a group the annotator never took from the queue (no lease, live or expired, e.g.
    a researcher labelling directly) is stored like an import, without the overlap check.
    """
    record = replace(record, annotator=_annotator(record.annotator))

    def work(con: duckdb.DuckDBPyConnection) -> Saved:
        assignment.lock_group_round(con, record.group_id)
        at = now or utcnow()
        lid, expires = assignment.standing(con, record.group_id, record.annotator)
        if lid is not None:
            return Saved(lid, _revise(con, record, at))
        label = _submit(con, record, at, SOURCE, outside_queue_ok=True, expires=expires)
        return Saved(label, 1)

    return _unit(ws, work)


def release(
    ws: storedb.Workspace, group_id: int, annotator: str, *, now: datetime | None = None
) -> bool:
    """Give a leased group back to the queue now; False if the annotator held no live lease."""
    annotator = _annotator(annotator)

    def work(con: duckdb.DuckDBPyConnection) -> bool:
        assignment.lock_group_round(con, group_id)
        return assignment.expire(con, group_id, annotator, now or utcnow())

    return _unit(ws, work)


# ---------------------------------------------------------------------------------------- gold


_RANKING_TEXT = re.compile(r"^\s*\d+(\s*[>=]\s*\d+)*\s*$")


def parse_ranking(text: str) -> list[list[int]]:
    """A ranking written as candidate ids, '>' between places and '=' for ties: "12>13=14>15"."""
    if not _RANKING_TEXT.match(text or ""):
        raise PrefloopError(
            f"cannot read the ranking {text!r}: write candidate ids best first, '>' between "
            "places and '=' between tied candidates, e.g. 12>13=14>15"
        )
    return [[int(c) for c in place.split("=")] for place in text.replace(" ", "").split(">")]


def format_ranking(ranking: list[list[int]]) -> str:
    """The text form of a ranking, as parse_ranking reads it."""
    return ">".join("=".join(str(c) for c in tier) for tier in ranking)


def score_against_gold(
    gold_rankings: dict[int, list[list[int]]], label_rows: pd.DataFrame
) -> pd.DataFrame:
    """Per annotator on gold groups: labelled, skipped, exact (share of identical rankings) and
    pair_accuracy (share of gold's ordered pairs they order the same way; a tie counts half)."""
    stats: dict[str, dict[str, float]] = {}
    for row in label_rows.itertuples():
        truth = gold_rankings.get(int(row.group_id))
        if truth is None:
            continue
        s = stats.setdefault(
            row.annotator, {"labelled": 0, "skipped": 0, "exact": 0, "agree": 0.0, "pairs": 0}
        )
        if row.ranking is None or "skipped" in row.flags:
            s["skipped"] += 1
            continue
        s["labelled"] += 1
        s["exact"] += [sorted(t) for t in row.ranking] == [sorted(t) for t in truth]
        ranks = fractional_ranks(row.ranking)
        for better, worse in ordered_pairs(truth):
            a, b = ranks.get(better), ranks.get(worse)
            if a is None or b is None:
                continue
            s["pairs"] += 1
            s["agree"] += 1.0 if a < b else 0.5 if a == b else 0.0
    out = [
        {
            "annotator": who,
            "gold_labelled": int(s["labelled"]),
            "gold_skipped": int(s["skipped"]),
            "exact": s["exact"] / s["labelled"] if s["labelled"] else None,
            "pair_accuracy": s["agree"] / s["pairs"] if s["pairs"] else None,
        }
        for who, s in sorted(stats.items())
    ]
    columns = ["annotator", "gold_labelled", "gold_skipped", "exact", "pair_accuracy"]
    return pd.DataFrame(out, columns=columns)


def gold_accuracy(ws: storedb.Workspace, round_ids: list[int] | None = None) -> pd.DataFrame:
    """Each annotator's accuracy on the gold groups (of some rounds)."""
    with storedb.connect(ws) as con:
        truth = storegold.gold(con, round_ids)
        rows = labels.labels(con, round_ids)
    return score_against_gold(truth, rows[rows["group_id"].isin(list(truth))])
