"""Where candidates differ: labeling.differences by hand, and the annotator page's view."""

from __future__ import annotations

import html
import random

import pytest

from app.differences_view import DEPARTS, ONLY_A, ONLY_B
from labeling import differences as d
from labeling.annotation import RankingState
from store import db as storedb
from store.errors import PrefloopError
from tests.fixtures_app import XSS, make_workspace, seed_round
from tests.test_app import element_values, letter_ids, open_app

# ----------------------------------------------------------------------------------------------
# shared opening and ending


def test_shared_opening_and_ending_are_cut_at_word_boundaries():
    texts = [
        "The answer is 4 because two plus two is four.",
        "The answer is 5 because two plus two is four.",
        "The answer is four because two plus two is four.",
    ]
    parts = d.shared_parts(texts)
    assert parts.prefix == "The answer is "
    assert parts.suffix == " because two plus two is four."
    assert parts.middles == ["4", "5", "four"]
    assert (parts.prefix_words, parts.suffix_words) == (3, 6)
    # "cats." and "cars." share "ca" and "." but not a whole word
    cats = d.shared_parts(["I like cats.", "I like cars."])
    assert (cats.prefix, cats.suffix, cats.middles) == ("I like ", "", ["cats.", "cars."])


def test_shared_parts_never_overlap_and_rebuild_every_text():
    parts = d.shared_parts(["a b a", "a b a b a"])  # one text is the other's opening
    assert (parts.prefix, parts.suffix, parts.middles) == ("a b a", "", ["", " b a"])
    same = d.shared_parts(["x  y\n", "x  y\n"])
    assert (same.prefix, same.suffix, same.middles) == ("x  y\n", "", ["", ""])
    assert d.shared_parts(["alone"]).prefix == ""  # one candidate shares nothing
    texts = ["Hi there.\n\nfoo bar baz", "Hi there.\n\nfoo qux baz", "Hi there. baz"]
    parts = d.shared_parts(texts)
    assert parts.prefix == "Hi there." and parts.suffix == " baz"
    for text, middle in zip(texts, parts.middles, strict=True):
        assert parts.prefix + middle + parts.suffix == text


# ----------------------------------------------------------------------------------------------
# word diff


def test_word_diff_of_two_candidates():
    segments = d.word_diff("the quick brown fox", "the slow brown dog")
    assert [(s.kind, s.text) for s in segments] == [
        ("equal", "the "),
        ("a", "quick"),
        ("b", "slow"),
        ("equal", " brown "),
        ("a", "fox"),
        ("b", "dog"),
    ]
    # a space between two changed words does not cut the change in two
    replaced = d.word_diff("one two three four", "one x y four")
    assert [(s.kind, s.text) for s in replaced] == [
        ("equal", "one "),
        ("a", "two three"),
        ("b", "x y"),
        ("equal", " four"),
    ]
    inserted = d.word_diff("a c", "a b c")
    assert [(s.kind, s.text) for s in inserted] == [("equal", "a "), ("b", "b "), ("equal", "c")]
    a, b = "line one\n  indented\tx", "line two\n  indented y"
    segments = d.word_diff(a, b)
    assert "".join(s.text for s in d.side(segments, "a")) == a
    assert "".join(s.text for s in d.side(segments, "b")) == b
    assert d.word_diff("same", "same") == [d.Segment("equal", "same")]


# ----------------------------------------------------------------------------------------------
# near-identical


def words(n: int, start: int = 0) -> list[str]:
    return [f"w{i}" for i in range(start, start + n)]


def test_near_identical_threshold_both_sides():
    assert d.NEAR_IDENTICAL_MAX_DIFFERENCE == 0.05
    base = words(20)
    one_changed = " ".join(["CHANGED", *base[1:]])
    two_changed = " ".join(["CHANGED", *base[1:10], "ALSO", *base[11:]])
    assert d.similarity(" ".join(base), one_changed) == pytest.approx(0.95)  # 1/20: at the line
    assert d.similarity(" ".join(base), two_changed) is None  # 2/20 = 10%: over it
    # one word inserted into 20: distance 1 over the longer (21 words)
    inserted = " ".join([*base[:5], "extra", *base[5:]])
    assert d.similarity(" ".join(base), inserted) == pytest.approx(1 - 1 / 21)
    # 40 words: two changes are 5% (near-identical), three are not
    long = words(40)
    two = " ".join(["X", *long[1:20], "Y", *long[21:]])
    three = " ".join(["X", *long[1:20], "Y", *long[21:39], "Z"])
    assert d.similarity(" ".join(long), two) == pytest.approx(0.95)
    assert d.similarity(" ".join(long), three) is None
    # short answers: one word of two is half the text
    assert d.similarity("answer 1.1", "answer 1.2") is None
    assert d.similarity("", "") == 1.0
    assert d.similarity("a  b\n", "a b") == 1.0  # spacing alone is no difference


def reference_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row = row, [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
    return row[-1]


def test_bit_parallel_distance_agrees_with_the_plain_edit_distance():
    rng = random.Random(7)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 70))]
        limit = rng.randint(0, 40)
        want = reference_distance(a, b)
        assert d.edit_distance(a, b) == want, (a, b)
        got = d._edit_distance_within(a, b, limit)
        assert got == (want if want <= limit else None), (a, b, limit)
    long_a = [rng.choice("abcdefgh") for _ in range(150)]  # more than one machine word of bits
    long_b = [rng.choice("abcdefgh") for _ in range(140)]
    assert d.edit_distance(long_a, long_b) == reference_distance(long_a, long_b)


def test_near_identical_groups_and_hints():
    base = " ".join(words(30))
    twin = base.replace("w7", "seven")  # 1 of 30 words: 96.7% alike
    other = " ".join(words(30, start=100))
    texts = [other, base, other + " and more", twin, base]
    groups = d.near_identical_groups(texts)
    assert [g.members for g in groups] == [[1, 3, 4]]
    [pair] = [p for p in d.near_identical_pairs(texts) if (p.i, p.j) == (1, 3)]
    assert pair.similarity == pytest.approx(29 / 30)
    names = list("ABCDE")
    assert d.near_identical_hint(names, groups[0]) == "B, D and E are near-identical (≥ 96%)"
    two = d.near_identical_groups([base, other, twin])
    assert d.near_identical_hint(names, two[0]) == "A and C are near-identical (96%)"
    same = d.near_identical_groups(["same words", "other text here", "same words"])
    assert d.near_identical_hint(names, same[0]) == "A and C are identical"
    spaced = d.near_identical_groups(["same words", "same  words"])
    assert d.near_identical_hint(names, spaced[0]) == "A and B differ only in spacing"
    assert d.percent(0.999) == "99%"  # never rounded up to look identical


# ----------------------------------------------------------------------------------------------
# the tie: "=" ties the last pick with its near-identical candidates


def test_tie_near_identical_joins_the_last_picks_place():
    base = " ".join(words(30))
    texts = [base.replace("w3", "x"), "something else entirely", base, base.replace("w9", "y")]
    state = RankingState(1, "kim", [10, 11, 12, 13], texts)
    with pytest.raises(PrefloopError, match="rank one of the near-identical candidates first"):
        state.tie_near_identical()
    state.rank_next("B")
    with pytest.raises(PrefloopError, match=r"last pick \(B\) has no unranked near-identical"):
        state.tie_near_identical()
    state.rank_next("C")
    assert state.tie_near_identical() == ["A", "D"]
    assert state.summary() == "1. B  2. C = A = D"
    assert state.undo() == "D"  # undo takes back one tied twin at a time
    lone = RankingState(2, "kim", [1, 2], ["one text", "another"])
    lone.rank_next("A")
    with pytest.raises(PrefloopError, match="no candidates in this group are near-identical"):
        lone.tie_near_identical()


# ----------------------------------------------------------------------------------------------
# the annotator page (AppTest on the real script and a real DuckDB file)

OPENING = "Sure! Here is a short answer to your question about the weather today. "
ENDING = " Hope this helps, and have a nice day!"
RAIN = "It will rain in the afternoon, so take an umbrella when you go out to the shops later."
HOSTILE = f"{XSS} :red[verified] $5 and $10 [x](javascript:alert(1))"


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def diff_texts() -> list[str]:
    return [
        OPENING + RAIN + ENDING,
        OPENING + RAIN.replace("umbrella", "raincoat") + ENDING,
        OPENING + HOSTILE + ENDING,
        OPENING + "Expect snow." + ENDING,
    ]


def test_differences_view_collapses_shared_text_and_flags_near_twins(ws):
    texts = diff_texts()
    seeded = seed_round(ws, n_groups=1, k=4, first_texts=texts)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    by_letter = {name: texts[cids.index(cid)] for name, cid in letter_ids("kim", gid, cids).items()}
    rain, coat = (n for n in sorted(by_letter) if "take an" in by_letter[n])
    hostile = next(n for n in by_letter if "javascript" in by_letter[n])
    n_words = len(texts[0].split())
    at = open_app(annotator="kim")
    hint = f"{rain} and {coat} are near-identical ({int(100 * (1 - 1 / n_words))}%)"
    assert any(v.startswith(hint) and "press =" in v for v in element_values(at, "info"))
    assert not at.html  # the view itself waits behind its toggle

    at.toggle(key="diff_on").set_value(True).run()
    assert not at.exception, at.exception
    labels = [e.label for e in at.expander]
    n_open, n_end = len(OPENING.split()), len(ENDING.split())
    assert (
        f"Shared opening: {n_open} words, {len(OPENING)} characters, the same in every one"
        in labels
    )
    assert any(label.startswith(f"Shared ending: {n_end} words") for label in labels)
    bodies = [h.value for h in at.html]
    departures = {b.split("</b>")[0].split("<b>")[1]: b for b in bodies if "<b>" in b}
    assert set(departures) == set(by_letter)
    for name, body in departures.items():
        # the shared text is shown once, collapsed; each line shows only where its candidate departs
        assert "weather today" not in body and "nice day" not in body
        assert f"[shared opening: {n_open} words]" in body
        middle = by_letter[name][len(OPENING) : -len(ENDING)]
        assert f'<span style="{DEPARTS}">{html.escape(middle)}</span>' in body
    assert sum("weather today" in b for b in bodies if "<b>" not in b) >= 1
    # hostile candidate text stays literal: escaped before any markup, no live element from it
    assert html.escape(HOSTILE) in departures[hostile]
    assert not any("<img" in b or 'href="javascript' in b for b in bodies)

    # side by side: the near-identical pair first, the one changed word highlighted on each side
    assert at.selectbox(key=f"diff_a_{gid}").value == rain
    assert at.selectbox(key=f"diff_b_{gid}").value == coat
    a_word, b_word = (
        ("umbrella", "raincoat") if "umbrella" in by_letter[rain] else ("raincoat", "umbrella")
    )
    assert any(f'<span style="{ONLY_A}">{a_word}</span>' in b for b in bodies)
    assert any(f'<span style="{ONLY_B}">{b_word}</span>' in b for b in bodies)
    assert f"1 word only in {rain} (red), 1 word only in {coat} (green)" in element_values(
        at, "caption"
    )
    at.selectbox(key=f"diff_b_{gid}").set_value(hostile).run()
    assert not at.exception, at.exception
    side_b = [h.value for h in at.html if f'<span style="{ONLY_B}">' in h.value]
    assert len(side_b) == 1 and html.escape(XSS) in side_b[0] and "<img" not in side_b[0]
