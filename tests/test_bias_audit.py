"""The annotator bias audit against hand-computed examples, on the Team page, in
`prefloop agreement`, and in curation's down-weighted consensus."""

from __future__ import annotations

import json
import math
from itertools import permutations

import pytest

from labeling.annotation import display_order
from labeling.bias_audit import (
    AuditGroup,
    audit,
    feature_tau,
    markdown_density,
    two_sided_p,
    wilson,
)
from labeling.ranking import consensus


def shown_best(annotator: str, gid: int, ids: list[int], slot: int) -> list[list[int]]:
    """A ranking whose best candidate is the one this annotator was shown in display slot
    `slot` (the rest in stored order)."""
    order = display_order(annotator, gid, len(ids))
    best = ids[order[slot]]
    return [[best]] + [[c] for c in ids if c != best]


def position_groups(n: int = 30, k: int = 3) -> list[AuditGroup]:
    """n groups of k equally long candidates: "first" always picks the candidate shown first,
    "even" picks the one shown in slot g % k, so first and last are best n/k times each."""
    groups = []
    for g in range(n):
        gid = 100 + g
        ids = [gid * 10 + c for c in range(k)]
        rankings = {
            "first": shown_best("first", gid, ids, 0),
            "even": shown_best("even", gid, ids, g % k),
        }
        groups.append(AuditGroup(gid, ids, [f"text {c}" for c in range(k)], rankings))
    return groups


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq) do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# Pure statistics


def test_markdown_density_counts_only_syntax() -> None:
    assert markdown_density("") == 0.0
    assert markdown_density("plain words, snake_case_name and 2*3*4") == 0.0
    assert markdown_density("# Hi") == pytest.approx(2 / 4)  # "# "
    assert markdown_density("**bold**") == pytest.approx(4 / 8)
    assert markdown_density("- a\n- b") == pytest.approx(4 / 7)  # two "- ", 7 characters
    assert markdown_density("use `x` now") == pytest.approx(2 / 11)
    # fence lines count whole; the code between them does not, even if it looks like Markdown
    text = "```py\n# not a heading\n```"
    assert markdown_density(text) == pytest.approx((5 + 3) / len(text))
    table = "| a | b |\n|---|---|"
    assert markdown_density(table) == pytest.approx((3 + 9) / len(table))


def test_exact_p_values_and_wilson_interval() -> None:
    # 30 of 30 hits at chance 1/3: every other count is more likely, so p = P(X = 30)
    assert two_sided_p(30, [1 / 3] * 30) == pytest.approx(3.0**-30, rel=1e-6)
    assert two_sided_p(10, [1 / 3] * 30) == pytest.approx(1.0)  # the mode
    # binomial(4, 1/2): P(0) = P(4) = 1/16, so p(4 hits) = 2/16
    assert two_sided_p(4, [0.5] * 4) == pytest.approx(2 / 16)
    # mixed K: one K=2 and one K=4 group, both hit: P = 1/2 * 1/4 = 1/8, the least likely count
    assert two_sided_p(2, [0.5, 0.25]) == pytest.approx(1 / 8)
    low, high = wilson(30, 30)
    assert low == pytest.approx(30 / (30 + 1.959963984540054**2))
    assert high == pytest.approx(1.0)
    assert wilson(0, 0) == (None, None)


def test_length_tau_sign_and_value_by_hand() -> None:
    lengths = {1: 1.0, 2: 2.0, 3: 3.0}
    assert feature_tau([[3], [2], [1]], lengths) == pytest.approx(1.0)  # longest first
    assert feature_tau([[1], [2], [3]], lengths) == pytest.approx(-1.0)
    # 3 > 1 > 2: (3,1) and (3,2) concordant, (1,2) discordant -> (2 - 1) / 3
    assert feature_tau([[3], [1], [2]], lengths) == pytest.approx(1 / 3)
    assert feature_tau([[1, 2, 3]], lengths) is None  # an all-tied ranking says nothing


def test_weighted_consensus() -> None:
    a_first, b_first = [[0], [1]], [[1], [0]]
    assert consensus([a_first, b_first]) == [[0, 1]]  # a tie
    assert consensus([a_first, b_first], [1.0, 0.5]) == [[0], [1]]
    assert consensus([a_first, b_first], [1.0, 0.0]) == [[0], [1]]
    assert consensus([a_first, b_first], [1.0, 1.0]) == consensus([a_first, b_first])


# ---------------------------------------------------------------------------------------------
# The audit


def test_an_annotator_who_always_picks_the_first_shown_is_flagged() -> None:
    report = audit(position_groups())
    rows = {a.annotator: a for a in report.annotators}
    first, even = rows["first"], rows["even"]
    assert first.position_groups == 30 and first.chance_rate == pytest.approx(1 / 3)
    assert first.first_best == 1.0 and first.last_best == 0.0
    assert first.first_p == pytest.approx(3.0**-30, rel=1e-6)
    assert first.first_low == pytest.approx(30 / (30 + 1.959963984540054**2))
    assert first.position_bias and not first.length_bias
    # the balanced annotator: first and last best in exactly 10 of 30 groups, the chance rate
    assert even.first_best == pytest.approx(1 / 3) and even.last_best == pytest.approx(1 / 3)
    assert even.first_p == pytest.approx(1.0) and not even.position_bias
    assert even.first_low < 1 / 3 < even.first_high
    assert report.flagged() == {"first": ["position"]}
    # equal lengths and no Markdown: τ is undefined everywhere
    assert first.length_tau is None and report.consensus_length_tau is None


def test_too_few_groups_are_never_flagged() -> None:
    report = audit(position_groups(n=12))
    first = {a.annotator: a for a in report.annotators}["first"]
    assert first.first_p < 0.01 and not first.position_bias  # 12 < MIN_GROUPS
    assert audit(position_groups(n=12), min_groups=10).flagged() == {"first": ["position"]}


def test_mixed_k_uses_the_mean_chance_rate() -> None:
    groups = []
    for gid, k in ((1, 2), (2, 2), (3, 4), (4, 4)):
        ids = [gid * 10 + c for c in range(k)]
        texts = ["same"] * k
        groups.append(AuditGroup(gid, ids, texts, {"first": shown_best("first", gid, ids, 0)}))
    row = audit(groups).annotators[0]
    assert row.chance_rate == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert row.first_p == pytest.approx(0.5 * 0.5 * 0.25 * 0.25)


def length_groups(n: int = 24) -> list[AuditGroup]:
    """Three candidates of distinct lengths per group; two annotators rank by stored position
    (0 > 1 > 2), and the lengths cycle through all six orders, so their length τ averages 0;
    "long" ranks the longest first."""
    groups = []
    orders = list(permutations((5, 10, 20)))
    for g in range(n):
        lens = orders[g % len(orders)]
        gid = 500 + g
        ids = [gid * 10 + c for c in range(3)]
        texts = ["x" * n_chars for n_chars in lens]
        by_length = [[c] for _, c in sorted(zip(lens, ids, strict=True), reverse=True)]
        plain = [[c] for c in ids]
        groups.append(AuditGroup(gid, ids, texts, {"ann": plain, "bob": plain, "long": by_length}))
    return groups


def test_length_bias_is_flagged_against_the_others_consensus() -> None:
    report = audit(length_groups())
    rows = {a.annotator: a for a in report.annotators}
    assert rows["long"].length_tau == pytest.approx(1.0)
    assert rows["ann"].length_tau == pytest.approx(0.0)
    # the others of "long" (ann and bob) agree, so their consensus is their ranking: τ 0
    assert rows["long"].length_tau_consensus == pytest.approx(0.0)
    assert rows["long"].length_groups == 24
    # the groups where the plain order is the length order give difference 0: 20 of 24 left,
    # all positive -> p = 2 / 2**20
    assert rows["long"].length_p == pytest.approx(2 / 2**20)
    assert rows["long"].length_bias
    # ann differs from the (bob + long) consensus too, but leans on length less than it does
    assert rows["ann"].length_p < 0.01 and not rows["ann"].length_bias
    assert report.flagged() == {"long": ["length"]}
    assert math.isfinite(report.consensus_length_tau)


def test_the_judge_gets_no_position_figures() -> None:
    groups = [
        AuditGroup(g.group_id, g.candidate_ids, g.texts, {"judge": g.rankings["first"]})
        for g in position_groups()
    ]
    row = audit(groups).annotators[0]
    assert row.annotator == "judge" and row.position_groups == 0 and row.first_p is None
    assert not row.position_bias
