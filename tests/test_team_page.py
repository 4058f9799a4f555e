"""The Team page and the dataset panel through streamlit.testing, on a real workspace."""

from __future__ import annotations

import pytest

from store import db as storedb
from store import gold, labels, rounds
from store.adjudications import adjudications
from store.records import LabelRecord
from tests.fixtures_app import make_workspace, seed_round
from tests.test_app import click, element_values, open_app


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def frame_with(at, column: str):
    """The one table on the page that has this column."""
    [df] = [d.value for d in at.dataframe if column in d.value.columns]
    return df


def labelled(ws):
    """Three groups: ann and bob agree on group 1 and 2 and disagree completely on group 3."""
    seeded = seed_round(ws, n_groups=3, k=3)
    g, c = seeded.group_ids, seeded.candidate_ids
    fwd = [[[x] for x in cs] for cs in c]
    rev = [[[x] for x in reversed(cs)] for cs in c]
    with storedb.connect(ws) as con:
        labels.add_labels(
            con,
            [
                LabelRecord(g[0], "ann", fwd[0], seconds=10.0),
                LabelRecord(g[0], "bob", fwd[0], seconds=20.0),
                LabelRecord(g[1], "ann", fwd[1], seconds=30.0),
                LabelRecord(g[1], "bob", fwd[1], seconds=40.0),
                LabelRecord(g[2], "ann", fwd[2], seconds=50.0),
                LabelRecord(g[2], "bob", rev[2], seconds=60.0),
            ],
        )
    return seeded


def test_team_page_shows_agreement_and_adjudicates_a_dispute(ws):
    seeded = labelled(ws)
    at = open_app("Team")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Groups with 2+ annotators"] == "3"
    # pairwise agreement: groups 1 and 2 agree on 3 of 3 pairs, group 3 on 0 of 3 -> 6/9
    assert metrics["Mean pairwise agreement"] == "0.667"
    table = frame_with(at, "Kendall τ").set_index("annotator")
    assert table.loc["ann", "agreement with others"] == pytest.approx(6 / 9)
    assert table.loc["ann", "median s/label"] == 30.0
    assert table.loc["bob", "median s/label"] == 40.0
    disputes = frame_with(at, "disagreement")
    g3 = seeded.group_ids[2]
    assert list(disputes["group_id"]) == [g3]
    c3 = seeded.candidate_ids[2]
    at.text_input(key="adj_ranking").input(f"{c3[1]}>{c3[0]}={c3[2]}")
    at.text_input(key="adj_note").input("middle one is right")
    click(at, "adjudicate_submit")
    assert f"Saved the decision on group {g3}; training uses it." in element_values(at, "success")
    with storedb.connect(ws) as con:
        decided = adjudications(con)
    assert decided[g3]["ranking"] == [[c3[1]], [c3[0], c3[2]]]
    assert decided[g3]["author"] == "rita" and decided[g3]["note"] == "middle one is right"


def test_team_page_round_settings_and_gold(ws):
    seeded = seed_round(ws, n_groups=2, k=2)
    at = open_app("Team")
    at.number_input(key="set_overlap").set_value(3)
    at.checkbox(key="set_show").check()
    at.text_area(key="set_guidelines").input("Prefer **short** answers.")
    click(at, "save_settings")
    with storedb.connect(ws) as con:
        opts = rounds.round_options(con, seeded.round_id)
    assert (opts.overlap, opts.show_suggestions, opts.guidelines) == (
        3,
        True,
        "Prefer **short** answers.",
    )
    g, c = seeded.group_ids[1], seeded.candidate_ids[1]
    at.number_input(key="gold_group").set_value(g)
    at.text_input(key="gold_ranking").input(f"{c[1]}>{c[0]}")
    click(at, "gold_submit")
    with storedb.connect(ws) as con:
        assert gold.gold(con) == {g: [[c[1]], [c[0]]]}
    at.number_input(key="gold_group").set_value(g)
    at.text_input(key="gold_ranking").input("not a ranking")
    click(at, "gold_submit")
    assert any("cannot read the ranking" in e for e in element_values(at, "error"))


def test_freeze_form_builds_a_curated_version_with_a_card(ws):
    labelled(ws)
    at = open_app("Researcher")
    at.number_input(key="cur_min_agreement").set_value(0.5)
    click(at, "freeze_submit")
    assert "Froze dataset version d1." in element_values(at, "success")
    card = "\n".join(element_values(at, "markdown"))
    assert "## Dataset version `d1`" in card and "low_agreement 1" in card
    assert "groups: 2;" in card  # the disputed group fell under the agreement threshold
