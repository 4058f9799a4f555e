"""Labels: thumbs, ratings, time spent; revised by their author until a dataset freezes them."""

from __future__ import annotations

import pytest

from labeling import curation, queue
from store import datasets, labels, rounds
from store import db as storedb
from store.errors import PrefloopError
from store.records import LabelRecord
from tests.test_queue import group_ids, make_round


@pytest.fixture
def setup(tmp_path):
    """A rank round of two groups (3 candidates each) and a thumbs round of one group."""
    ws, rid, cids = make_round(tmp_path / "ws", 2)
    _, thumbs_rid, thumbs_cids = make_round(tmp_path / "ws", 1, ws=ws)
    with storedb.connect(ws) as con:
        rounds.set_round_options(con, thumbs_rid, mode="thumbs")
    gids = group_ids(ws, rid) + group_ids(ws, thumbs_rid)
    return ws, rid, thumbs_rid, gids, cids + thumbs_cids


def add(ws, *records: LabelRecord) -> None:
    with storedb.connect(ws) as con:
        labels.add_labels(con, list(records))


def current(ws, group_id: int, annotator: str) -> dict:
    with storedb.connect(ws) as con:
        df = labels.labels(con, annotator=annotator)
    return df[df["group_id"] == group_id].iloc[0].to_dict()


def test_a_revision_keeps_the_earlier_label(setup):
    ws, _, _, gids, cids = setup
    a, b, c = cids[0]
    add(ws, LabelRecord(gids[0], "ann", [[a], [b], [c]], ratings={a: 5, b: 3}, seconds=12.5))
    first = current(ws, gids[0], "ann")
    assert (first["revision"], first["ratings"], first["seconds"]) == (1, {a: 5, b: 3}, 12.5)
    with storedb.connect(ws) as con:
        rev = labels.revise_label(
            con, LabelRecord(gids[0], " ann ", [[c], [a, b]], comment="c is better", seconds=3)
        )
    assert rev == 2
    now = current(ws, gids[0], "ann")
    assert (now["ranking"], now["comment"], now["revision"]) == ([[c], [a, b]], "c is better", 2)
    assert now["ratings"] is None and now["updated"] >= first["updated"]
    assert now["label_id"] == first["label_id"]  # the same label, revised in place
    with storedb.connect(ws) as con:
        history = labels.label_history(con, gids[0], "ann")
    assert list(history["revision"]) == [1, 2] and list(history["current"]) == [False, True]
    assert history.iloc[0]["ranking"] == [[a], [b], [c]]
    assert history.iloc[0]["ratings"] == {a: 5, b: 3} and history.iloc[0]["seconds"] == 12.5
    assert history.iloc[0]["replaced"] is not None and history.iloc[0]["made"] == first["created"]
    with storedb.connect(ws) as con:
        mine = labels.my_labels(con, "ann")
    assert list(mine["group_id"]) == [gids[0]] and not mine.iloc[0]["frozen"]
    assert mine.iloc[0]["prompt"].startswith("round 1 prompt 0")


def test_only_the_author_can_revise(setup):
    ws, _, _, gids, cids = setup
    a, b, c = cids[0]
    add(ws, LabelRecord(gids[0], "ann", [[a], [b], [c]]))
    with (
        storedb.connect(ws) as con,
        pytest.raises(PrefloopError, match="'bob' has no label on group .* revised by the"),
    ):
        labels.revise_label(con, LabelRecord(gids[0], "bob", [[c], [b], [a]]))
    assert current(ws, gids[0], "ann")["ranking"] == [[a], [b], [c]]
    with storedb.connect(ws) as con, pytest.raises(PrefloopError, match="says the same"):
        labels.revise_label(con, LabelRecord(gids[0], "ann", [[a], [b], [c]]))


def test_a_frozen_label_cannot_be_revised(setup):
    ws, rid, _, gids, cids = setup
    a, b, c = cids[0]
    add(ws, LabelRecord(gids[0], "ann", [[a], [b], [c]]))
    add(ws, LabelRecord(gids[1], "ann", None, ["skipped"]))  # not in the dataset: stays open
    dataset_id = curation.freeze_dataset(ws, round_ids=[rid])
    with storedb.connect(ws) as con:
        frozen_id = current(ws, gids[0], "ann")["label_id"]
        assert datasets.frozen_labels(con, dataset_id) == [frozen_id]
        assert labels.frozen_in(con, frozen_id) == [dataset_id]
        mine = labels.my_labels(con, "ann").set_index("group_id")
    assert bool(mine.loc[gids[0], "frozen"]) and not bool(mine.loc[gids[1], "frozen"])
    with pytest.raises(PrefloopError, match=f"frozen in dataset version.*{dataset_id}"):
        queue.revise(ws, LabelRecord(gids[0], "ann", [[c], [b], [a]]))
    row = current(ws, gids[0], "ann")
    assert (row["ranking"], row["revision"]) == ([[a], [b], [c]], 1)
    with storedb.connect(ws) as con:
        assert len(labels.label_history(con, gids[0], "ann")) == 1
    # freezing the same content again reuses the version and records nothing twice
    assert curation.freeze_dataset(ws, round_ids=[rid]) == dataset_id
    with storedb.connect(ws) as con:
        assert datasets.frozen_labels(con, dataset_id) == [frozen_id]
    # the skipped group was not frozen, so its skip can still become a ranking
    x, y, z = cids[1]
    assert queue.revise(ws, LabelRecord(gids[1], "ann", [[z], [y], [x]])) == 2
    newer = curation.freeze_dataset(ws, round_ids=[rid])
    with storedb.connect(ws) as con:
        other_id = current(ws, gids[1], "ann")["label_id"]
        assert newer != dataset_id
        assert datasets.frozen_labels(con, newer) == sorted([frozen_id, other_id])


def test_turning_a_skip_into_a_label_needs_a_free_slot(setup):
    ws, _, _, gids, cids = setup
    a, b, c = cids[0]
    queue.submit(ws, LabelRecord(gids[0], "ann", None, ["skipped"]))
    queue.submit(ws, LabelRecord(gids[0], "bob", [[a], [b], [c]]))  # overlap 1: now full
    with pytest.raises(PrefloopError, match="skipped group .* your skip stays"):
        queue.revise(ws, LabelRecord(gids[0], "ann", [[a], [b], [c]]))


@pytest.mark.parametrize(
    ("thumbs", "ratings", "seconds", "message"),
    [
        ({"x": True}, None, None, "thumbs: 'x' is not a candidate id"),
        ({999: True}, None, None, "thumbs name candidate(s) [999] that do not belong"),
        ("up", None, None, "thumbs must map candidate ids"),
        ({0: "yes"}, None, None, "thumbs must be true (up) or false (down)"),
        (None, {0: 6}, None, "ratings must be whole numbers from 1 to 5"),
        (None, {0: 2.5}, None, "ratings must be whole numbers from 1 to 5"),
        (None, {0: True}, None, "ratings must be whole numbers from 1 to 5"),
        (None, {999: 3}, None, "ratings name candidate(s) [999]"),
        (None, None, -1, "seconds spent must be zero or more"),
        (None, None, float("nan"), "seconds spent must be zero or more"),
        (None, None, "10", "seconds must be a number"),
    ],
)
def test_thumbs_ratings_and_seconds_are_validated(setup, thumbs, ratings, seconds, message):
    ws, _, _, gids, cids = setup
    a, b, c = cids[0]

    def real(mapping):  # candidate 0 stands for the group's first candidate
        if not isinstance(mapping, dict):
            return mapping
        return {a if k == 0 else k: v for k, v in mapping.items()}

    record = LabelRecord(
        gids[0], "ann", [[a], [b], [c]], thumbs=real(thumbs), ratings=real(ratings)
    )
    record.seconds = seconds
    with pytest.raises(PrefloopError) as info:
        add(ws, record)
    assert message in str(info.value)
    with storedb.connect(ws) as con:
        assert labels.labels(con).empty


def test_a_thumbs_round_needs_every_thumb_and_stores_the_derived_ranking(setup):
    ws, _, thumbs_rid, gids, cids = setup
    a, b, c = cids[2]
    needs = rf"thumbs round: every candidate needs a thumb .*\[{c}\]"
    with pytest.raises(PrefloopError, match=needs):
        add(ws, LabelRecord(gids[2], "ann", None, thumbs={a: True, b: False}))
    with pytest.raises(PrefloopError, match="ranking comes from the thumbs"):
        add(ws, LabelRecord(gids[2], "ann", [[a], [b], [c]], thumbs={a: True, b: False, c: False}))
    add(
        ws,
        LabelRecord(gids[2], "ann", None, thumbs={c: True, a: False, b: True}, seconds=4),
        LabelRecord(gids[2], "bob", None, thumbs={a: False, b: False, c: False}),
        LabelRecord(gids[2], "cat", None, ["skipped"]),  # a skip needs no thumbs
        LabelRecord(gids[2], "dan", [[b, c], [a]], thumbs={a: False, b: True, c: True}),
    )
    with storedb.connect(ws) as con:
        df = labels.labels(con, [thumbs_rid]).set_index("annotator")
    assert df.loc["ann", "ranking"] == [[b, c], [a]]  # ups, then downs
    assert df.loc["ann", "thumbs"] == {a: False, b: True, c: True}
    assert df.loc["bob", "ranking"] == [[a, b, c]]  # all the same: one tier
    assert df.loc["cat", "ranking"] is None and df.loc["cat", "thumbs"] is None
    assert df.loc["dan", "ranking"] == [[b, c], [a]]


def test_a_rank_round_accepts_thumbs_as_an_extra(setup):
    ws, rid, _, gids, cids = setup
    a, b, c = cids[0]
    with pytest.raises(PrefloopError, match="a ranking is required .* thumb for every"):
        add(ws, LabelRecord(gids[0], "ann", None, thumbs={a: True}))
    add(
        ws,
        LabelRecord(gids[0], "ann", [[b], [a], [c]], thumbs={a: True}),
        LabelRecord(gids[0], "bob", None, thumbs={a: True, b: False, c: True}),
    )
    with storedb.connect(ws) as con:
        df = labels.labels(con, [rid]).set_index("annotator")
    assert df.loc["ann", "ranking"] == [[b], [a], [c]] and df.loc["ann", "thumbs"] == {a: True}
    assert df.loc["bob", "ranking"] == [[a, c], [b]]
