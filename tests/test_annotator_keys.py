"""The annotator page through streamlit.testing: keyboard shortcuts, ratings, thumbs, revising."""

from __future__ import annotations

import pytest

from store import db as storedb
from store import labels, rounds
from tests.fixtures_app import make_workspace, seed_round
from tests.test_app import click, element_values, letter_ids, open_app, shown_text


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def stored(ws):
    with storedb.connect(ws) as con:
        return labels.labels(con).set_index("group_id")


def type_keys(at, *keys: str, nonce: str = "page-1"):
    """Type keys as the page's key catcher reports them: every key so far, cumulatively."""
    typed = [*getattr(at, "typed_so_far", []), *keys]
    at.typed_so_far = typed
    at.session_state["annot_keys"] = {"typed": {"nonce": nonce, "keys": typed}}
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_key_catcher_is_on_the_page_and_the_keys_are_listed(ws):
    seed_round(ws, n_groups=1, k=4)
    at = open_app(annotator="kim")
    [catcher] = [
        e
        for e in at.main
        if getattr(e, "proto", None) is not None
        and getattr(e.proto, "component_name", "") == "prefloop_keys"
    ]
    assert "keydown" in catcher.proto.js_content
    assert any(
        "1..K rank next · t tie next with last · u undo" in c
        for c in element_values(at.sidebar, "caption")
    )


def test_keyboard_sequence_rank_tie_undo_submit(ws):
    seeded = seed_round(ws, n_groups=2, k=4)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    at = open_app(annotator="kim")
    type_keys(at, "2", "t")
    assert "Tie armed: the next key ties with your last pick." in element_values(at, "caption")
    type_keys(at, "3", "1", "u", "4")  # 3 ties with B; 1 ranks A; u takes A back; 4 ranks D
    assert "**Your ranking:** 1. B = C\u2003\u20032. D" in element_values(at, "markdown")
    type_keys(at, "Enter")  # unfinished: refused, nothing stored
    assert any("rank every candidate first" in e for e in element_values(at, "error"))
    assert stored(ws).empty
    type_keys(at, "1", "Enter", "2")  # typed ahead: 2 is the first pick of the next group
    ids = letter_ids("kim", gid, cids)
    row = stored(ws).loc[gid]
    assert row["ranking"] == [[ids["B"], ids["C"]], [ids["D"]], [ids["A"]]]
    assert row["seconds"] is not None and row["seconds"] >= 0
    assert seeded.prompts[1] in shown_text(at)
    assert "**Your ranking:** 1. B" in element_values(at, "markdown")


def test_skip_and_all_bad_keys_and_a_reload(ws):
    seeded = seed_round(ws, n_groups=3, k=3)
    g1, g2, g3 = seeded.group_ids
    at = open_app(annotator="kim")
    type_keys(at, "s", "1", "b")  # skip group 1; rank one candidate of group 2, flag all bad
    df = stored(ws)
    assert df.loc[g1, "flags"] == ["skipped"] and df.loc[g1, "ranking"] is None
    assert df.loc[g2, "flags"] == ["all_bad"]
    # a page reload starts a new key list: its keys are not mistaken for ones already applied
    at.typed_so_far = []
    type_keys(at, "3", "t", "9", nonce="page-2")
    assert any("there is no candidate 9" in e for e in element_values(at, "error"))
    # a mistyped key does not cancel the armed tie
    assert "Tie armed: the next key ties with your last pick." in element_values(at, "caption")
    assert "**Your ranking:** 1. C" in element_values(at, "markdown")
    assert g3 not in stored(ws).index


def test_tie_key_needs_a_pick_first(ws):
    seed_round(ws, n_groups=1, k=3)
    at = open_app(annotator="kim")
    assert at.button(key="arm_tie").disabled
    type_keys(at, "t")
    assert any("rank a candidate first" in e for e in element_values(at, "error"))


def test_optional_ratings_are_stored_with_the_ranking(ws):
    seeded = seed_round(ws, n_groups=1, k=3)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    at = open_app(annotator="lea")
    at.segmented_control(key=f"rate_{gid}_A").set_value(5).run()
    at.segmented_control(key=f"rate_{gid}_C").set_value(1).run()
    for name in "ABC":
        click(at, f"rank_{name}")
    click(at, "submit")
    ids = letter_ids("lea", gid, cids)
    assert stored(ws).loc[gid, "ratings"] == {ids["A"]: 5, ids["C"]: 1}


def test_thumbs_round(ws):
    seeded = seed_round(ws, n_groups=2, k=3)
    with storedb.connect(ws) as con:
        rounds.set_round_options(con, seeded.round_id, mode="thumbs", guidelines="# Be **kind**")
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    at = open_app(annotator="max")
    assert at.selectbox(key="round").options == ["Thumbs round 1 (model version base)"]
    assert not [b for b in at.button if b.key.startswith("rank_")]  # no ranking in this mode
    # the guidelines render through the safe renderer: a heading is shown as a bold line
    assert "**Be kind**" in element_values(at.sidebar, "markdown")
    assert at.button(key="submit").disabled
    at.segmented_control(key=f"thumb_{gid}_A").set_value("up").run()
    at.segmented_control(key=f"thumb_{gid}_B").set_value("down").run()
    assert at.button(key="submit").disabled  # C has no thumb yet
    at.segmented_control(key=f"thumb_{gid}_C").set_value("up").run()
    click(at, "submit")
    ids = letter_ids("max", gid, cids)
    row = stored(ws).loc[gid]
    assert row["thumbs"] == {ids["A"]: True, ids["B"]: False, ids["C"]: True}
    assert row["ranking"] == [sorted([ids["A"], ids["C"]]), [ids["B"]]]  # bootstrapped pairs
    assert seeded.prompts[1] in shown_text(at)


def test_an_annotator_revises_their_own_label_and_history_is_kept(ws):
    seeded = seed_round(ws, n_groups=1, k=2)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    at = open_app(annotator="ned")
    click(at, "rank_A")
    click(at, "rank_B")
    click(at, "submit")
    assert any("No groups left" in v for v in element_values(at, "success"))
    at.selectbox(key="revise_pick").set_value(gid).run()
    click(at, "revise_start")
    assert any("Revising your label of group" in v for v in element_values(at, "warning"))
    click(at, "rank_B")
    click(at, "rank_A")
    click(at, "submit")
    ids = letter_ids("ned", gid, cids)
    row = stored(ws).loc[gid]
    assert row["ranking"] == [[ids["B"]], [ids["A"]]] and row["revision"] == 2
    with storedb.connect(ws) as con:
        history = labels.label_history(con, gid, "ned")
    assert [h["ranking"] for h in history.to_dict("records")][0] == [[ids["A"]], [ids["B"]]]


def test_judge_suggestion_shows_only_when_the_round_allows(ws):
    from store import suggestions

    seeded = seed_round(ws, n_groups=1, k=2)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    with storedb.connect(ws) as con:
        suggestions.set_suggestions(
            con, "tests.judges.length:shorter", {gid: [[cids[1]], [cids[0]]]}
        )
    at = open_app(annotator="ola")
    assert not any("Judge suggestion" in v for v in element_values(at, "info"))
    with storedb.connect(ws) as con:
        rounds.set_round_options(con, seeded.round_id, show_suggestions=True)
    at.run()
    ids = letter_ids("ola", gid, cids)
    by_id = {v: k for k, v in ids.items()}
    want = f"Judge suggestion: {by_id[cids[1]]}  >  {by_id[cids[0]]}"
    assert want in element_values(at, "info")


def test_equals_key_ties_the_last_pick_with_its_near_identical_candidates(ws):
    base = " ".join(f"word{i}" for i in range(30))
    texts = [base, "a different answer", base.replace("word5", "five"), "yet another one"]
    seeded = seed_round(ws, n_groups=2, k=4, first_texts=texts)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    ids = letter_ids("kim", gid, cids)
    twin_a, twin_b = sorted(name for name, cid in ids.items() if cids.index(cid) in (0, 2))
    others = sorted(name for name in ids if name not in (twin_a, twin_b))
    key = {name: str(" ABCD".index(name)) for name in ids}
    at = open_app(annotator="kim")
    [catcher] = [
        e
        for e in at.main
        if getattr(e, "proto", None) is not None
        and getattr(e.proto, "component_name", "") == "prefloop_keys"
    ]
    assert "[1-9tusb=]" in catcher.proto.js_content  # the browser passes "=" on
    assert any(
        "= tie last pick with its near-identical candidates" in c
        for c in element_values(at.sidebar, "caption")
    )
    type_keys(at, "=")  # nothing ranked yet: says what to do
    assert any(
        "rank one of the near-identical candidates first" in e for e in element_values(at, "error")
    )
    type_keys(at, key[others[0]], key[twin_b], "=")
    assert f"**Your ranking:** 1. {others[0]}\u2003\u20032. {twin_b} = {twin_a}" in element_values(
        at, "markdown"
    )
    type_keys(at, key[others[1]], "Enter")
    row = stored(ws).loc[gid]
    assert row["ranking"] == [[ids[others[0]]], [ids[twin_b], ids[twin_a]], [ids[others[1]]]]
    type_keys(at, "1", "=")  # the next group has no near-identical candidates
    assert any(
        "no candidates in this group are near-identical" in e for e in element_values(at, "error")
    )
