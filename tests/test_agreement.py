"""Agreement statistics and Bradley–Terry fits against hand-computed and published values."""

from __future__ import annotations

import math

import pytest

from labeling.agreement import (
    annotator_report,
    disputes,
    group_disagreement,
    kendall_tau,
    krippendorff_alpha,
    majority_pairs,
    pairwise_agreement,
    ranking_alpha,
)
from labeling.bradley_terry import (
    bt_gains,
    bt_preferences,
    fit_bradley_terry,
    ranking_comparisons,
)
from labeling.ranking import pair_preferences

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers ×
# 12 units, values 1–5, missing data. Unit 12 has a single value and is not pairable.
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, float("nan")],
]

A = [[1], [2], [3], [4]]
B = [[2], [1], [3, 4]]


def test_pairwise_agreement_counts_ties_as_their_own_category() -> None:
    # pairs of A vs B: (1,2) A: 1 first, B: 2 first → disagree; (1,3) (1,4) (2,3) (2,4) agree;
    # (3,4) A orders, B ties → disagree. 4 of 6.
    assert pairwise_agreement(A, B) == pytest.approx(4 / 6)
    assert pairwise_agreement([[1, 2], [3]], [[2, 1], [3]]) == 1.0  # both tie (1,2): agree
    assert pairwise_agreement([[1, 2, 3]], [[1], [2], [3]]) == 0.0
    # only the common items count: {1, 2} ordered the same way in both
    assert pairwise_agreement([[1], [5], [2]], [[1], [2], [7]]) == 1.0
    assert pairwise_agreement([[1], [2]], [[3], [4]]) is None
    assert pairwise_agreement([[1], [2]], [[1], [3]]) is None  # one common item: no pair


def test_kendall_tau_b() -> None:
    # A vs B: concordant 4, discordant 1 ((1,2)), one pair tied in B only ((3,4)).
    # τ_b = (C − D) / sqrt((n0 − ties_A)(n0 − ties_B)) = (4 − 1) / sqrt(6 · 5) = 0.5477
    # (scipy.stats.kendalltau([1,2,3,4], [2,1,3.5,3.5]) gives the same 0.5477225575)
    assert kendall_tau(A, B) == pytest.approx(3 / math.sqrt(30))
    assert kendall_tau(A, [[4], [3], [2], [1]]) == pytest.approx(-1.0)
    assert kendall_tau([[1, 2], [3]], [[1, 2], [3]]) == pytest.approx(1.0)  # (2 − 0)/sqrt(2·2)
    assert kendall_tau([[1, 2, 3]], A) is None  # all tied: undefined
    assert kendall_tau([[1], [2]], [[3], [4]]) is None


@pytest.mark.parametrize(
    "level, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)]
)
def test_krippendorff_alpha_matches_the_published_example(level: str, published: float) -> None:
    # published to 3 decimals; the `krippendorff` package gives 0.7434, 0.8154, 0.8491
    assert krippendorff_alpha(KRIPPENDORFF_2011, level) == pytest.approx(published, abs=5e-4)


def test_krippendorff_alpha_by_hand() -> None:
    # coders × units: A = 1 2 3, B = 1 2 2. Coincidences: o11 = 2, o22 = 2, o23 = o32 = 1;
    # n1 = 2, n2 = 3, n3 = 1, n = 6. α = 1 − (n − 1) Σ o·δ² / Σ n_c n_k δ².
    data = [[1, 2, 3], [1, 2, 2]]
    # nominal: Σ o·δ = 2; Σ n n δ = 2·(2·3 + 2·1 + 3·1) = 22 → 1 − 5·2/22 = 12/22
    assert krippendorff_alpha(data, "nominal") == pytest.approx(12 / 22)
    # interval: Σ o·δ² = 2·1; Σ n n δ² = 2·(6·1 + 2·4 + 3·1) = 34 → 1 − 10/34 = 24/34
    assert krippendorff_alpha(data, "interval") == pytest.approx(24 / 34)
    # ordinal: δ12 = (2 + 3 − 5/2)² = 6.25, δ23 = (3 + 1 − 4/2)² = 4, δ13 = (6 − 3/2)² = 20.25;
    # Σ o·δ = 2·4 = 8; Σ n n δ = 2·(6·6.25 + 2·20.25 + 3·4) = 180 → 1 − 5·8/180 = 7/9
    assert krippendorff_alpha(data, "ordinal") == pytest.approx(7 / 9)
    assert krippendorff_alpha([[1, 1], [1, 1]], "nominal") is None  # no variation: undefined
    assert krippendorff_alpha([[1, N], [N, 2]]) is None  # no pairable unit
    with pytest.raises(ValueError, match="unknown level"):
        krippendorff_alpha(data, "ratio!")


def test_ranking_alpha_uses_fractional_ranks_as_ordinal_values() -> None:
    assert ranking_alpha({1: {"a": A, "b": A}}) == pytest.approx(1.0)
    # reversed rankings of 3: units (1,3), (2,2), (3,1) → o13 = o31 = 2, o22 = 2, n_v = 2 each;
    # δ12 = δ23 = (4 − 2)² = 4, δ13 = (6 − 2)² = 16; Σ o·δ = 4·16 = 64;
    # Σ n n δ = 2·(4·4 + 4·16 + 4·4) = 192 → α = 1 − 5·64/192 = −2/3
    assert ranking_alpha({1: {"a": [[0], [1], [2]], "b": [[2], [1], [0]]}}) == pytest.approx(-2 / 3)
    labels = {
        "g1": {"a": [[0], [1], [2]], "b": [[1], [0], [2]], "c": [[0], [1, 2]]},
        "g2": {"a": [[0], [1]], "b": [[0, 1]]},
    }
    # the same as krippendorff.alpha on the fractional ranks
    # [[1, 2, 3, 1, 2], [2, 1, 3, 1.5, 1.5], [1, 2.5, 2.5, nan, nan]], ordinal: 0.469297273
    assert ranking_alpha(labels) == pytest.approx(0.46929727333185545)


def _panel() -> dict:
    # a, b, d agree on 0 > 1 > 2 in three groups; c ranks every group the other way round
    up, down = [[0], [1], [2]], [[2], [1], [0]]
    return {g: {"a": up, "b": up, "c": down, "d": up} for g in ("g1", "g2", "g3")}


def test_annotator_report_flags_the_outlier() -> None:
    seconds = {("g1", "a"): 10.0, ("g2", "a"): 30.0, ("g3", "a"): 20.0}
    report = {s.annotator: s for s in annotator_report(_panel(), seconds_by_label=seconds)}
    a, c = report["a"], report["c"]
    # a vs b and d: 3 of 3 pairs per group; vs c: 0 of 3 → (3 + 3 + 0)·3 / 27 = 2/3
    assert a.pairwise_agreement == pytest.approx(2 / 3)
    assert a.kendall_tau == pytest.approx(1 / 3)  # mean of τ = 1, 1, −1 in each group
    assert (a.n_labels, a.n_shared, a.n_gold, a.median_seconds) == (3, 3, 0, 20.0)
    assert a.gold_accuracy is None and not a.flagged
    assert c.pairwise_agreement == 0.0 and c.kendall_tau == pytest.approx(-1.0) and c.flagged
    assert c.median_seconds is None
    assert [s.annotator for s in annotator_report(_panel())] == ["a", "b", "c", "d"]


def test_annotator_report_prefers_gold_when_there_is_enough() -> None:
    gold = {"g1": [[2], [1], [0]]}  # gold agrees with c
    report = {s.annotator: s for s in annotator_report(_panel(), gold)}
    assert report["c"].gold_accuracy == 1.0 and report["a"].gold_accuracy == 0.0
    # one gold group < min_labels = 3: flags still come from agreement with the others
    assert report["c"].flagged and not report["a"].flagged
    report = {s.annotator: s for s in annotator_report(_panel(), gold, min_labels=1)}
    assert report["a"].flagged and not report["c"].flagged
    # too few shared labels: nobody is flagged
    few = annotator_report({"g1": _panel()["g1"]})
    assert not any(s.flagged for s in few)


def test_group_disagreement_and_disputes() -> None:
    up, down = [[0], [1], [2]], [[2], [1], [0]]
    # annotator pairs: (up, up) = 1, (up, down) = 0, (up, down) = 0 → 1 − 1/3 = 2/3
    assert group_disagreement([up, up, down]) == pytest.approx(2 / 3)
    assert group_disagreement([up]) == 0.0 and group_disagreement([]) == 0.0
    labels = {
        "calm": {"a": up, "b": up},
        "mixed": {"a": up, "b": up, "c": down},
        "fight": {"a": up, "b": down},
    }
    assert disputes(labels) == [("fight", 1.0), ("mixed", pytest.approx(2 / 3))]
    assert disputes(labels, threshold=0.9) == [("fight", 1.0)]


def test_majority_pairs() -> None:
    rankings = [[[0], [1], [2]], [[1], [0], [2]], [[0], [1, 2]]]
    # (0,1): 0 first in 2 of 3; (0,2): 3 of 3; (1,2): 2 of 3 (one tie)
    assert majority_pairs(rankings) == [(0, 1), (0, 2), (1, 2)]
    assert majority_pairs([[[0], [1]], [[1], [0]], [[0, 1]]]) == []  # 1 of 3 each way
    assert majority_pairs([[[0], [1]], [[1], [0]]]) == []  # 1 of 2 is no strict majority
    assert majority_pairs([[[1], [0]], [[1], [0]], [[0], [1]]]) == [(1, 0)]


# ----------------------------------------------------------------------------------------------
# Bradley–Terry


def test_two_items_without_prior_match_the_closed_form() -> None:
    # MLE: σ(s_a − s_b) = w / (w + l) → s_a − s_b = log(w / l); mean zero → ± half of it
    s = fit_bradley_terry(["a", "b"], [("a", "b", 7.0), ("b", "a", 3.0)], prior=0)
    assert s["a"] - s["b"] == pytest.approx(math.log(7 / 3))
    assert s["a"] + s["b"] == pytest.approx(0.0, abs=1e-12)


def test_three_items_generated_by_bt_are_recovered() -> None:
    # strengths 2 : 1 : 0.5 → P(x>y) = 2/3, P(x>z) = 0.8, P(y>z) = 2/3; 1000 games per pair
    strengths = {"x": 2.0, "y": 1.0, "z": 0.5}
    comparisons = []
    for i, j in (("x", "y"), ("x", "z"), ("y", "z")):
        p = strengths[i] / (strengths[i] + strengths[j])
        comparisons += [(i, j, 1000 * p), (j, i, 1000 * (1 - p))]
    s = fit_bradley_terry(list(strengths), comparisons, prior=0)
    # log-strengths log 2, 0, −log 2 already have mean zero
    assert s == pytest.approx({"x": math.log(2), "y": 0.0, "z": -math.log(2)})
    sig = lambda d: 1 / (1 + math.exp(-d))  # noqa: E731
    assert sig(s["x"] - s["y"]) == pytest.approx(2 / 3)
    assert sig(s["x"] - s["z"]) == pytest.approx(0.8)


def test_the_prior_keeps_an_undefeated_item_finite() -> None:
    s = fit_bradley_terry(["a", "b"], [("a", "b", 7.0)], prior=1.0)
    # by symmetry s_a = −s_b = x, and the objective 7·log σ(2x) + 2·(log σ(x) + log σ(−x)) is
    # stationary where 14·σ(−2x) + 2·(1 − 2σ(x)) = 0
    x = s["a"]
    assert s["b"] == pytest.approx(-x)
    assert 14 / (1 + math.exp(2 * x)) + 2 * (1 - 2 / (1 + math.exp(-x))) == pytest.approx(
        0, abs=1e-9
    )
    assert 1 < x < 2
    # without the prior the MLE does not exist and the fit runs off
    assert fit_bradley_terry(["a", "b"], [("a", "b", 7.0)], prior=0)["a"] > 5
    assert fit_bradley_terry([], []) == {}


def test_ties_count_half_a_win_each_way() -> None:
    assert ranking_comparisons([[[0, 1], [2]]]) == [
        (0, 1, 0.5), (1, 0, 0.5), (0, 2, 1.0), (1, 2, 1.0),
    ]  # fmt: skip
    s = fit_bradley_terry([0, 1, 2], ranking_comparisons([[[0, 1, 2]]] * 3))
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in s.values())


def test_bt_preferences_have_pair_preferences_keys() -> None:
    rankings = [[[0], [1], [2], [3]], [[1], [0], [2, 3]]]
    empirical = pair_preferences(rankings)  # (0,1) is 0.5 each way, so it is left out
    prefs = bt_preferences(rankings)
    assert set(prefs) == set(empirical) == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    assert all(0.5 < p < 1.0 for p in prefs.values())
    # BT shrinks the unanimous pairs below 1 and ranks 0 and 1 equally (a mirrored record)
    assert prefs[(0, 2)] == pytest.approx(prefs[(1, 2)]) and prefs[(0, 3)] > prefs[(0, 2)]
    every = bt_preferences(rankings, all_pairs=True)
    assert len(every) == 12 and every[(0, 1)] == pytest.approx(0.5)
    assert every[(2, 0)] == pytest.approx(1 - every[(0, 2)])
    assert bt_preferences([[[0, 1, 2]], [[0, 1, 2]]]) == {}


def test_bt_gains() -> None:
    k = 4
    gains = bt_gains([[[2], [0], [1, 3]]], k)
    assert gains[2] > gains[0] > gains[1] == pytest.approx(gains[3])  # position order
    assert all(0 <= g <= 1 for g in gains)
    # each gain is a mean P(beat another); Σ_i Σ_{j≠i} P_ij = C(k, 2) → Σ gains = k / 2
    assert sum(gains) == pytest.approx(k / 2)
    assert bt_gains([[[0, 1, 2, 3]]] * 3, k) == [0.5] * k  # everything tied: zero spread
    assert bt_gains([[[0], [1]], [[1], [0]]], 2) == pytest.approx([0.5, 0.5])
    assert bt_gains([[[0]]], 1) == [0.5]
