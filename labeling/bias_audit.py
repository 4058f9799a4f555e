"""Auditing annotators for position, length and Markdown bias.

Each annotator saw a group's candidates in their own shuffled order (`display_order`, the
function the annotator page uses), so the audit knows which candidate was shown first and last.

- Position: among the groups whose ranking has a single best candidate (a tied best tier says
  nothing about one slot), how often the candidate shown first (last) is ranked best, against
  the chance rate sum(1/K_i)/n. The p-value is exact and two-sided: the number of hits under
  chance is Poisson-binomial (binomial when every group has the same K), and the p-value sums
  the probabilities of every count no more likely than the observed one. The 95% interval is
  Wilson's score interval of the observed rate.
- Length and Markdown density: per group, Kendall's τ-b between the annotator's ranking and
  the candidates' length (characters) or Markdown density, positive when longer (denser)
  candidates are ranked better, averaged over groups. It is compared with the same τ of the
  consensus of the *other* annotators on the same groups (leave-one-out, so the annotator does
  not pull the reference towards themselves); the test is an exact two-sided sign test on the
  per-group differences (zero differences dropped).
- Flags: position bias when the first- or last-shown test has p < alpha with at least
  min_groups groups; length bias when the length sign test has p < alpha with at least
  min_groups groups compared and the annotator's mean τ is larger in size than the consensus's
  (they lean on length more than the others do, not less). Markdown density is reported, not
  flagged. The judge (annotator "judge") reads candidates in both orders: it gets no position
  figures.

Labels imported with `prefloop labels import` are audited as if they were made in the web page
(the store does not record where a label came from).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from labeling.agreement import kendall_tau
from labeling.annotation import display_order
from labeling.ranking import consensus, tiers_from_scores

Ranking = list[list[int]]
ALPHA = 0.01  # flag when a test's two-sided p-value is below this
MIN_GROUPS = 20  # ... and the test rests on at least this many groups
Z95 = 1.959963984540054
UNSHUFFLED = frozenset({"judge"})  # labeling.curation.JUDGE_ANNOTATOR: sees both orders
POSITION_TEST = (
    "exact two-sided Poisson-binomial test of the first/last-shown best rate against "
    "sum(1/K)/n (groups with a single best candidate); Wilson 95% interval"
)
LENGTH_TEST = (
    "exact two-sided sign test of per-group Kendall τ-b (rank vs length) against the other "
    "annotators' consensus; flagged only when the annotator's |τ| exceeds the consensus's"
)


# ---------------------------------------------------------------------------------------------
# Markdown density

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+|$)")
_QUOTE = re.compile(r"^ {0,3}(?:>[ \t]?)+")
_LIST = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(?=[^`])(.+?)(?<=[^`])\1")
_EMPHASIS = (
    re.compile(r"(\*\*|__|~~)(?=\S)(.+?)(?<=\S)\1"),
    re.compile(r"(?<![\w*])(\*)(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"),
    re.compile(r"(?<![\w_])(_)(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])"),
)


def _inline_syntax(line: str) -> int:
    """Characters of inline code delimiters and emphasis markers in one line."""
    count = 0

    def code(m: re.Match) -> str:
        nonlocal count
        count += 2 * len(m.group(1))
        return "x" * len(m.group(0))  # code content is not Markdown

    line = _CODE_SPAN.sub(code, line)
    for pattern in _EMPHASIS:

        def mark(m: re.Match) -> str:
            nonlocal count
            count += 2 * len(m.group(1))
            return "x" * len(m.group(1)) + m.group(2) + "x" * len(m.group(1))

        line = pattern.sub(mark, line)
    return count


def markdown_density(text: str) -> float:
    """Share of the characters of text that are Markdown syntax.

    Counted as syntax: code fence lines (fence and info string; the code between fences is
    not), heading hashes, blockquote markers, list markers (`-`, `*`, `+`, `1.` with the space
    after), table pipes and table rule rows, inline code backticks, and emphasis delimiters
    (`**`, `__`, `~~`, `*`, `_` around text). 0 for an empty text.
    """
    if not text:
        return 0.0
    syntax = 0
    in_fence: str | None = None
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if in_fence is not None:
            if fence and fence.group(1)[0] == in_fence[0] and len(fence.group(1)) >= len(in_fence):
                syntax += len(line.strip())
                in_fence = None
            continue
        if fence:
            syntax += len(line.strip())
            in_fence = fence.group(1)
            continue
        if _TABLE_RULE.match(line):
            syntax += sum(not c.isspace() for c in line)
            continue
        for block in (_QUOTE, _HEADING, _LIST):
            m = block.match(line)
            if m:
                lead = len(m.group(0)) - len(m.group(0).lstrip())
                syntax += len(m.group(0)) - lead
                line = line[len(m.group(0)) :]
        stripped = line.strip()
        if len(stripped) >= 2 and stripped[0] == "|" and stripped[-1] == "|":
            syntax += stripped.count("|")
            line = line.replace("|", " ")
        syntax += _inline_syntax(line)
    return syntax / len(text)


# ---------------------------------------------------------------------------------------------
# Statistics


def _binomial_pmf(n: int, p: float) -> np.ndarray:
    k = np.arange(n + 1)
    if p <= 0.0 or p >= 1.0:
        out = np.zeros(n + 1)
        out[0 if p <= 0.0 else n] = 1.0
        return out
    log = (
        np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    return np.exp(log)


def poisson_binomial_pmf(probabilities: Iterable[float]) -> np.ndarray:
    """P(X = k), k = 0..n, for X the number of successes of independent trials."""
    by_p: dict[float, int] = {}
    for p in probabilities:
        by_p[float(p)] = by_p.get(float(p), 0) + 1
    pmf = np.ones(1)
    for p, n in sorted(by_p.items()):
        pmf = np.convolve(pmf, _binomial_pmf(n, p))
    return pmf


def two_sided_p(hits: int, probabilities: list[float]) -> float | None:
    """Exact two-sided p-value of hits successes: the chance of a count no more likely than it."""
    if not probabilities:
        return None
    pmf = poisson_binomial_pmf(probabilities)
    return float(min(1.0, pmf[pmf <= pmf[hits] * (1 + 1e-7)].sum()))


def wilson(hits: float, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a rate hits/n; (None, None) for n = 0."""
    if n == 0:
        return None, None
    rate = hits / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(differences: Iterable[float]) -> float | None:
    """Exact two-sided sign test that positive and negative differences are equally likely."""
    nonzero = [d for d in differences if abs(d) > 1e-12]
    if not nonzero:
        return None
    return two_sided_p(sum(d > 0 for d in nonzero), [0.5] * len(nonzero))


def feature_tau(ranking: Ranking, values: Mapping[int, float]) -> float | None:
    """Kendall τ-b between a ranking (best first) and a value per item: > 0 when items with
    higher values are ranked better; None when either side is all tied."""
    by_value = tiers_from_scores({item: -v for item, v in values.items()})  # highest first
    return kendall_tau(ranking, by_value)


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True)
class AuditGroup:
    """One labelled group as the audit needs it: candidates in stored order and rankings."""

    group_id: int
    candidate_ids: list[int]
    texts: list[str]
    rankings: dict[str, Ranking]  # annotator -> tiers of candidate ids, best first


@dataclass
class AnnotatorBias:
    """One annotator's position, length and Markdown figures, and the resulting flags."""

    annotator: str
    n_groups: int  # groups they ranked
    position_groups: int  # of those, with a single best candidate and a known shown order
    chance_rate: float | None  # sum(1/K)/n over the position groups
    first_best: float | None  # share of them where the candidate shown first was ranked best
    first_low: float | None
    first_high: float | None
    first_p: float | None
    last_best: float | None  # ... shown last
    last_low: float | None
    last_high: float | None
    last_p: float | None
    length_tau: float | None  # mean over groups of τ(rank, length); > 0: longer ranked better
    length_tau_consensus: float | None  # the others' consensus on the compared groups
    length_groups: int  # groups compared with the others' consensus
    length_p: float | None
    markdown_tau: float | None
    markdown_tau_consensus: float | None
    markdown_groups: int
    markdown_p: float | None
    position_bias: bool = False
    length_bias: bool = False

    @property
    def flagged(self) -> bool:
        """Whether either bias is flagged."""
        return self.position_bias or self.length_bias


@dataclass
class BiasAudit:
    """The audit of a set of groups: one row per annotator and the consensus's own τ."""

    annotators: list[AnnotatorBias]
    consensus_length_tau: float | None  # the all-annotator consensus, over every group
    consensus_markdown_tau: float | None
    n_groups: int
    alpha: float = ALPHA
    min_groups: int = MIN_GROUPS
    tests: dict[str, str] = field(
        default_factory=lambda: {"position": POSITION_TEST, "length": LENGTH_TEST}
    )

    def flagged(self) -> dict[str, list[str]]:
        """Flagged annotators -> which biases ("position", "length")."""
        out = {}
        for a in self.annotators:
            kinds = [
                k for k, on in (("position", a.position_bias), ("length", a.length_bias)) if on
            ]
            if kinds:
                out[a.annotator] = kinds
        return out

    def table(self) -> pd.DataFrame:
        """One row per annotator, with a `flags` column."""
        rows = []
        for a in self.annotators:
            row = asdict(a)
            row["flags"] = ", ".join(self.flagged().get(a.annotator, []))
            rows.append(row)
        columns = [f.name for f in AnnotatorBias.__dataclass_fields__.values()] + ["flags"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> pd.DataFrame:
        """One row per annotator in words: rates with intervals and p-values, τ vs consensus."""

        def num(v: float | None, digits: int = 2) -> str:
            return "–" if v is None else f"{v:.{digits}f}"

        def p(v: float | None) -> str:
            return "–" if v is None else f"{v:.2g}"

        def rate(a: AnnotatorBias, slot: str) -> str:
            if not a.position_groups:
                return "–"
            low, high = getattr(a, f"{slot}_low"), getattr(a, f"{slot}_high")
            return (
                f"{num(getattr(a, f'{slot}_best'))} [{num(low)}, {num(high)}] "
                f"p={p(getattr(a, f'{slot}_p'))}"
            )

        def tau(a: AnnotatorBias, name: str) -> str:
            return (
                f"{num(getattr(a, f'{name}_tau'))} vs {num(getattr(a, f'{name}_tau_consensus'))} "
                f"p={p(getattr(a, f'{name}_p'))} (n={getattr(a, f'{name}_groups')})"
            )

        flags = self.flagged()
        return pd.DataFrame(
            [
                {
                    "annotator": a.annotator,
                    "groups": a.n_groups,
                    "chance": num(a.chance_rate),
                    "first shown best": rate(a, "first"),
                    "last shown best": rate(a, "last"),
                    "length τ vs others": tau(a, "length"),
                    "markdown τ vs others": tau(a, "markdown"),
                    "flags": ", ".join(flags.get(a.annotator, [])),
                }
                for a in self.annotators
            ],
            columns=[
                "annotator",
                "groups",
                "chance",
                "first shown best",
                "last shown best",
                "length τ vs others",
                "markdown τ vs others",
                "flags",
            ],
        )

    def position_frame(self) -> pd.DataFrame:
        """Long rows for a chart: annotator, shown (first/last), rate, low, high, chance."""
        rows = [
            {
                "annotator": a.annotator,
                "shown": slot,
                "rate": getattr(a, f"{slot}_best"),
                "low": getattr(a, f"{slot}_low"),
                "high": getattr(a, f"{slot}_high"),
                "chance": a.chance_rate,
            }
            for a in self.annotators
            if a.position_groups
            for slot in ("first", "last")
        ]
        return pd.DataFrame(rows, columns=["annotator", "shown", "rate", "low", "high", "chance"])

    def to_dict(self) -> dict:
        """Plain data for JSON output and dataset statistics."""
        return {
            "n_groups": self.n_groups,
            "alpha": self.alpha,
            "min_groups": self.min_groups,
            "tests": self.tests,
            "consensus_length_tau": self.consensus_length_tau,
            "consensus_markdown_tau": self.consensus_markdown_tau,
            "flagged": self.flagged(),
            "annotators": self.table().to_dict("records"),
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _position(annotator: str, groups: list[AuditGroup]) -> dict:
    """The first/last-shown best rates of one annotator with intervals and p-values."""
    chance, first, last = [], 0, 0
    for g in groups:
        ranking = g.rankings[annotator]
        k = len(g.candidate_ids)
        if k < 2 or not ranking or len(ranking[0]) != 1:
            continue
        shown = display_order(annotator, g.group_id, k)
        best = ranking[0][0]
        chance.append(1.0 / k)
        first += g.candidate_ids[shown[0]] == best
        last += g.candidate_ids[shown[-1]] == best
    n = len(chance)
    out: dict = {"position_groups": n, "chance_rate": _mean(chance)}
    for name, hits in (("first", first), ("last", last)):
        low, high = wilson(hits, n)
        out |= {
            f"{name}_best": hits / n if n else None,
            f"{name}_low": low,
            f"{name}_high": high,
            f"{name}_p": two_sided_p(hits, chance),
        }
    return out


def _feature(
    annotator: str, groups: list[AuditGroup], values: dict[int, dict[int, float]], name: str
) -> dict:
    """Mean τ of one annotator against a feature, the others' consensus's, and the sign test."""
    mine, paired_me, paired_them = [], [], []
    for g in groups:
        tau = feature_tau(g.rankings[annotator], values[g.group_id])
        if tau is None:
            continue
        mine.append(tau)
        others = [r for a, r in g.rankings.items() if a != annotator]
        if not others:
            continue
        theirs = feature_tau(consensus(others), values[g.group_id])
        if theirs is not None:
            paired_me.append(tau)
            paired_them.append(theirs)
    return {
        f"{name}_tau": _mean(mine),
        f"{name}_tau_consensus": _mean(paired_them),
        f"{name}_groups": len(paired_me),
        f"{name}_p": sign_test([a - b for a, b in zip(paired_me, paired_them, strict=True)]),
    }


def audit(
    groups: Iterable[AuditGroup], *, alpha: float = ALPHA, min_groups: int = MIN_GROUPS
) -> BiasAudit:
    """Position, length and Markdown-density figures per annotator, with bias flags."""
    groups = [g for g in groups if g.rankings]
    lengths = {
        g.group_id: dict(zip(g.candidate_ids, map(len, g.texts), strict=True)) for g in groups
    }
    density = {
        g.group_id: dict(zip(g.candidate_ids, map(markdown_density, g.texts), strict=True))
        for g in groups
    }
    names = sorted({a for g in groups for a in g.rankings})
    rows = []
    for name in names:
        mine = [g for g in groups if name in g.rankings]
        if name in UNSHUFFLED:
            position = {"position_groups": 0, "chance_rate": None} | {
                f"{s}_{f}": None for s in ("first", "last") for f in ("best", "low", "high", "p")
            }
        else:
            position = _position(name, mine)
        row = AnnotatorBias(
            annotator=name,
            n_groups=len(mine),
            **position,
            **_feature(name, mine, lengths, "length"),
            **_feature(name, mine, density, "markdown"),
        )
        ps = [p for p in (row.first_p, row.last_p) if p is not None]
        row.position_bias = row.position_groups >= min_groups and any(p < alpha for p in ps)
        row.length_bias = (
            row.length_groups >= min_groups
            and row.length_p is not None
            and row.length_p < alpha
            and abs(row.length_tau or 0.0) > abs(row.length_tau_consensus or 0.0)
        )
        rows.append(row)

    def consensus_tau(values: dict[int, dict[int, float]]) -> float | None:
        taus = [
            feature_tau(consensus(list(g.rankings.values())), values[g.group_id]) for g in groups
        ]
        return _mean([t for t in taus if t is not None])

    return BiasAudit(
        annotators=rows,
        consensus_length_tau=consensus_tau(lengths),
        consensus_markdown_tau=consensus_tau(density),
        n_groups=len(groups),
        alpha=alpha,
        min_groups=min_groups,
    )


def audit_groups(labels: pd.DataFrame, groups: Iterable) -> list[AuditGroup]:
    """AuditGroups from stored labels (store.labels.labels) and their groups (GroupRecords);
    skipped and all-bad labels and labels without a ranking are left out."""
    by_group: dict[int, dict[str, Ranking]] = {}
    for row in labels.itertuples():
        if row.ranking is None or set(row.flags) & {"skipped", "all_bad"}:
            continue
        by_group.setdefault(int(row.group_id), {})[row.annotator] = row.ranking
    return [
        AuditGroup(g.group_id, list(g.candidate_ids), list(g.texts), by_group[g.group_id])
        for g in groups
        if g.group_id in by_group
    ]


def consensus_weights(
    annotators: Iterable[Hashable], flagged: Iterable[Hashable], weight: float
) -> list[float]:
    """Per-ranking weights for a consensus: `weight` for flagged annotators, 1 for the others."""
    flagged = set(flagged)
    return [weight if a in flagged else 1.0 for a in annotators]
