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


# ---------------------------------------------------------------------------------------------
# On a real workspace: Team page, `prefloop agreement`, curation


@pytest.fixture
def ws(tmp_path, monkeypatch):
    from tests.fixtures_app import make_workspace

    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def biased_round(ws, n: int = 24):
    """n groups of two equally long candidates: "fst" always ranks the candidate shown to them
    first best, "hon" always ranks the first stored candidate best (whatever they were shown)."""
    from store import db as storedb
    from store import labels
    from store.records import LabelRecord
    from tests.fixtures_app import seed_round

    seeded = seed_round(ws, n_groups=n, k=2)
    records = []
    for gid, ids in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        records.append(LabelRecord(gid, "fst", shown_best("fst", gid, ids, 0)))
        records.append(LabelRecord(gid, "hon", [[ids[0]], [ids[1]]]))
    with storedb.connect(ws) as con:
        labels.add_labels(con, records)
    return seeded


def test_team_page_shows_the_position_flag(ws) -> None:
    from tests.test_app import element_values, open_app

    biased_round(ws)
    at = open_app("Team")
    [table] = [d.value for d in at.dataframe if "first shown best" in d.value.columns]
    table = table.set_index("annotator")
    assert table.loc["fst", "flags"] == "position" and table.loc["hon", "flags"] == ""
    assert table.loc["fst", "first shown best"].startswith("1.00 [")
    assert table.loc["fst", "chance"] == "0.50"
    [warning] = [w for w in element_values(at, "warning") if "Possible bias" in w]
    assert "fst (position)" in warning and "hon" not in warning
    [chart] = at.get("vega_lite_chart")  # the position chart, with its chance ticks
    assert "ranked best (95% Wilson)" in chart.proto.spec and "chance" in chart.proto.spec


def only_solo_on_the_last_group(ws, seeded) -> None:
    """Group 3 ranked by "solo" alone, hon only on group 1: solo shares no group, so its
    agreement and Kendall τ are missing while the others' are numbers (NaN in a table)."""
    from store import db as storedb
    from store import labels
    from store.records import LabelRecord

    g, c = seeded.group_ids, seeded.candidate_ids
    with storedb.connect(ws) as con:
        con.execute("DELETE FROM labels WHERE group_id = ?", [g[2]])
        con.execute("DELETE FROM labels WHERE annotator = 'hon' AND group_id = ?", [g[1]])
        labels.add_labels(con, [LabelRecord(g[2], "solo", [[c[2][1]], [c[2][0]]])])


def test_agreement_json_is_strict_json_and_has_the_audit(ws, capsys) -> None:
    from tests.cli_helpers import cli

    only_solo_on_the_last_group(ws, biased_round(ws, n=3))
    data = strict_json(cli(capsys, "agreement", "-w", ws.root, "--json"))
    rows = {r["annotator"]: r for r in data["annotators"]}
    assert rows["solo"]["kendall_tau"] is None and rows["solo"]["pairwise_agreement"] is None
    assert rows["fst"]["kendall_tau"] is not None
    assert data["bias"]["flagged"] == {}  # 3 groups are too few to flag anyone
    bias = {r["annotator"]: r for r in data["bias"]["annotators"]}
    assert bias["fst"]["first_best"] == 1.0 and bias["fst"]["position_groups"] == 2
    assert bias["solo"]["length_tau"] is None  # equal lengths
    text = cli(capsys, "agreement", "-w", ws.root)
    assert "bias audit over 3 groups" in text and "flagged: none" in text


def test_agreement_cli_flags_and_rejects_a_bad_threshold(ws, capsys) -> None:
    from tests.cli_helpers import cli, cli_error

    biased_round(ws)
    data = strict_json(cli(capsys, "agreement", "-w", ws.root, "--json"))
    assert data["bias"]["flagged"] == {"fst": ["position"]}
    assert "flagged: fst (position)" in cli(capsys, "agreement", "-w", ws.root)
    assert "between 0 and 1" in cli_error(capsys, "agreement", "-w", ws.root, "--bias-alpha", "5")


def test_every_json_output_parses_strictly_on_an_empty_or_nan_workspace(ws, capsys) -> None:
    from tests.cli_helpers import cli

    w = ("-w", ws.root)
    for args in (
        ("users", "list"),
        ("users", "failed-sign-ins"),
        ("rounds", "list"),
        ("models", "list"),
        ("runs", "list"),
        ("dataset", "list"),
        ("evals", "list"),
        ("gold", "list"),
        ("gold", "accuracy"),
        ("judges", "list"),
        ("agreement",),
    ):
        strict_json(cli(capsys, *args, *w, "--json"))
    seeded = biased_round(ws, n=3)
    only_solo_on_the_last_group(ws, seeded)
    frozen = strict_json(cli(capsys, "dataset", "freeze", *w, "--json"))
    assert frozen["groups"] == 3 and frozen["groups_with_several_annotators"] == 1
    for args in (
        ("dataset", "show"),
        ("dataset", "list"),
        ("rounds", "list"),
        ("agreement",),
        ("labels", "history", seeded.group_ids[0], "--annotator", "fst"),
    ):
        strict_json(cli(capsys, *args, *w, "--json"))


def test_downweighting_biased_annotators_changes_the_curated_pair(ws, capsys) -> None:
    from labeling.curation import Curation, curated_rows
    from store import datasets
    from store import db as storedb
    from tests.cli_helpers import cli, cli_error

    seeded = biased_round(ws)
    # the groups where fst was shown the second stored candidate first: fst and hon disagree
    split = [
        i
        for i, (gid, ids) in enumerate(zip(seeded.group_ids, seeded.candidate_ids, strict=True))
        if display_order("fst", gid, 2)[0] == 1
    ]
    assert split, "the fixture needs a group where fst and hon disagree"
    with storedb.connect(ws) as con:
        plain_rows, _ = curated_rows(con, Curation())
        half_rows, info = curated_rows(con, Curation(downweight_biased=0.5))
        zero_rows, zero_info = curated_rows(con, Curation(downweight_biased=0.0))
    i = split[0]
    # equal weights: one ranking each way is a tie, so the group teaches no pair
    assert plain_rows.iloc[i]["ranking"] == [[0, 1]]
    # fst at half weight: hon's order wins (stored position 0 before 1)
    assert half_rows.iloc[i]["ranking"] == [[0], [1]]
    assert len(half_rows.iloc[i]["rankings"]) == 2  # soft labels still see both rankings
    assert info["bias_audit"]["flagged"] == {"fst": ["position"]}
    assert zero_rows.iloc[i]["ranking"] == [[0], [1]]
    assert len(zero_rows.iloc[i]["rankings"]) == 1  # weight 0: fst is out of the group
    assert zero_info["left_out"]["biased_annotators_only"] == 0
    # the CLI records the weight and the audit in the version, and its card says so
    version = cli(capsys, "dataset", "freeze", "-w", ws.root, "--downweight-biased", "0.5")
    version = version.strip()
    with storedb.connect(ws) as con:
        stored = datasets.get_dataset(con, version)
    assert stored["filters"]["downweight_biased"] == 0.5
    assert stored["stats"]["bias_audit"]["flagged"] == {"fst": ["position"]}
    card = cli(capsys, "dataset", "show", version, "-w", ws.root)
    assert "weight 0.500 in the consensus" in card and "fst (position)" in card
    assert "between 0" in cli_error(
        capsys, "dataset", "freeze", "-w", ws.root, "--downweight-biased", "2"
    )


def test_freeze_form_downweights_flagged_annotators(ws) -> None:
    from tests.test_app import click, element_values, open_app

    biased_round(ws)
    at = open_app("Researcher")
    at.selectbox(key="cur_downweight").set_value("0.5")
    click(at, "freeze_submit")
    assert "Froze dataset version d1." in element_values(at, "success")
    card = "\n".join(element_values(at, "markdown"))
    assert "flagged for position or length bias: weight 0.500 in the consensus" in card
    assert "fst (position)" in card
