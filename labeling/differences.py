"""Where the K candidates of a group differ: shared opening and ending, word diffs, near-twins.

Plain Python, no Streamlit. Text is split into words and the whitespace runs between them, so
every piece joins back to the exact original text and shared parts end at word boundaries.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

# Two candidates are near-identical when at most this share of their words would have to be
# inserted, deleted or replaced to turn one into the other (word-level edit distance divided by
# the longer candidate's word count; whitespace differences are ignored).
NEAR_IDENTICAL_MAX_DIFFERENCE = 0.05

_PIECES = re.compile(r"\s+|\S+")


def pieces(text: str) -> list[str]:
    """Words and the whitespace runs between them, in order ('' joins them back to text)."""
    return _PIECES.findall(text)


@dataclass
class SharedParts:
    """The opening and ending every candidate shares, and each candidate's differing middle."""

    prefix: str
    suffix: str
    middles: list[str]

    @property
    def prefix_words(self) -> int:
        """Number of words in the shared opening."""
        return len(self.prefix.split())

    @property
    def suffix_words(self) -> int:
        """Number of words in the shared ending."""
        return len(self.suffix.split())


def _common_prefix_len(seqs: list[list[str]]) -> int:
    n = 0
    for column in zip(*seqs, strict=False):
        if any(piece != column[0] for piece in column[1:]):
            break
        n += 1
    return n


def shared_parts(texts: list[str]) -> SharedParts:
    """The words every text starts and ends with (whole words only) and what lies between.

    With fewer than two texts nothing is shared. The opening and ending never overlap, so each
    text is exactly prefix + middle + suffix.
    """
    texts = [str(t) for t in texts]
    if len(texts) < 2:
        return SharedParts("", "", list(texts))
    split = [pieces(t) for t in texts]
    head = _common_prefix_len(split)
    rests = [p[head:] for p in split]
    tail = _common_prefix_len([r[::-1] for r in rests])
    prefix = "".join(split[0][:head])
    suffix = "".join(rests[0][len(rests[0]) - tail :]) if tail else ""
    middles = ["".join(r[: len(r) - tail]) for r in rests]
    return SharedParts(prefix, suffix, middles)


Kind = Literal["equal", "a", "b"]


@dataclass
class Segment:
    """A run of a word diff: text in both candidates ('equal'), only in A ('a') or only in B."""

    kind: Kind
    text: str


def word_diff(a: str, b: str) -> list[Segment]:
    """The word-level diff of two texts as runs; A's text is the 'equal' and 'a' runs, in order.

    Within a replaced stretch the 'a' run comes before the 'b' run. Adjacent runs of one kind
    are merged.
    """
    pa, pb = pieces(a), pieces(b)
    out: list[Segment] = []

    def add(kind: Kind, parts: list[str]) -> None:
        text = "".join(parts)
        if not text:
            return
        if out and out[-1].kind == kind:
            out[-1].text += text
        else:
            out.append(Segment(kind, text))

    # whitespace alone never anchors a match: "x y" replacing "a b" is one change, not two
    matcher = difflib.SequenceMatcher(str.isspace, pa, pb, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            add("equal", pa[i1:i2])
        else:
            add("a", pa[i1:i2])
            add("b", pb[j1:j2])
    return out


def side(segments: list[Segment], which: Literal["a", "b"]) -> list[Segment]:
    """The runs that make up one side's text (its own and the shared ones)."""
    return [s for s in segments if s.kind in ("equal", which)]


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance of two word lists (insert, delete or replace one word: cost 1)."""
    # Myers/Hyyrö bit-parallel algorithm: one column of the edit table is a pair of bit
    # vectors (Python ints, one bit per word of a), so long candidates cost milliseconds
    if not a or not b:
        return len(a) + len(b)
    m = len(a)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    match: dict[str, int] = {}
    for i, word in enumerate(a):
        match[word] = match.get(word, 0) | (1 << i)
    up, down, score = mask, 0, m  # vertical deltas +1 / -1; score = D[m][j]
    for word in b:
        eq = match.get(word, 0)
        xv = eq | down
        xh = ((((eq & up) + up) & mask) ^ up) | eq
        right = (down | ~(xh | up)) & mask
        left = up & xh
        if right & top:
            score += 1
        elif left & top:
            score -= 1
        right = ((right << 1) | 1) & mask
        left = (left << 1) & mask
        up = (left | ~(xv | right)) & mask
        down = right & xv
    return score


def _edit_distance_within(a: list[str], b: list[str], limit: int) -> int | None:
    """Word edit distance of a and b if it is at most limit, else None."""
    if abs(len(a) - len(b)) > limit:
        return None
    # strip what both share at the ends: near-identical texts are mostly that
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    distance = edit_distance(a[start:end_a], b[start:end_b])
    return distance if distance <= limit else None


def similarity(
    a: str, b: str, max_difference: float = NEAR_IDENTICAL_MAX_DIFFERENCE
) -> float | None:
    """1 − normalised word edit distance of a and b, or None when they differ by more than
    max_difference (the distance is not worked out past that)."""
    wa, wb = a.split(), b.split()
    longest = max(len(wa), len(wb))
    if longest == 0:
        return 1.0
    limit = int(max_difference * longest + 1e-9)
    distance = _edit_distance_within(wa, wb, limit)
    return None if distance is None else 1.0 - distance / longest


@dataclass
class NearPair:
    """Two near-identical candidates (indices into the texts) and how alike they are (0..1)."""

    i: int
    j: int
    similarity: float


@dataclass
class NearGroup:
    """Candidates (indices, ascending) linked by near-identical pairs, and the least alike pair."""

    members: list[int]
    similarity: float
    exact: bool = False  # the texts are the same character for character


def near_identical_pairs(
    texts: list[str], max_difference: float = NEAR_IDENTICAL_MAX_DIFFERENCE
) -> list[NearPair]:
    """Every pair of texts whose words differ by at most max_difference (see the constant)."""
    out = []
    for i, j in combinations(range(len(texts)), 2):
        alike = similarity(texts[i], texts[j], max_difference)
        if alike is not None:
            out.append(NearPair(i, j, alike))
    return out


def near_identical_groups(
    texts: list[str], max_difference: float = NEAR_IDENTICAL_MAX_DIFFERENCE
) -> list[NearGroup]:
    """Sets of candidates joined by near-identical pairs, ordered by their first member."""
    pairs = near_identical_pairs(texts, max_difference)
    root = list(range(len(texts)))

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for p in pairs:
        root[find(p.j)] = find(p.i)
    members: dict[int, list[int]] = {}
    for x in range(len(texts)):
        members.setdefault(find(x), []).append(x)
    groups = []
    for group in members.values():
        if len(group) < 2:
            continue
        alike = min(p.similarity for p in pairs if p.i in group)
        exact = all(texts[x] == texts[group[0]] for x in group)
        groups.append(NearGroup(group, alike, exact))
    return sorted(groups, key=lambda g: g.members[0])


def percent(alike: float) -> str:
    """How alike two candidates are, as shown: '98%', never rounded up to 100% unless equal."""
    return "100%" if alike >= 1.0 else f"{min(int(alike * 100), 99)}%"


def near_identical_hint(names: list[str], group: NearGroup) -> str:
    """E.g. 'B and D are near-identical (98%)'; names are the letters shown, by index."""
    letters = [names[i] for i in group.members]
    listed = ", ".join(letters[:-1]) + " and " + letters[-1]
    if group.exact:
        return f"{listed} are identical"
    if group.similarity >= 1.0:
        return f"{listed} differ only in spacing"
    at_least = "" if len(letters) == 2 else "≥ "
    return f"{listed} are near-identical ({at_least}{percent(group.similarity)})"
