"""Position-swap aggregation: every comparison is asked in both orders.

For two candidates `first` and `second`:
- forward order: first shown as A, second as B;
- backward order: second shown as A, first as B.

Each order's verdict is mapped back to the candidates. When both orders say the same thing
(first, second, or tie) that is the outcome; when they disagree the outcome is a tie or the
comparison is dropped (`disagreement`), and it is counted either way. A comparison with an
unparseable verdict in either order is `unparseable`, never guessed.

AlpacaEval-style win shares average the two orders with ties counted as half.

Pure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from .verdict import PairwiseVerdict, Parsed, SingleVerdict

DISAGREEMENT_MODES = ("tie", "drop")
RESULTS = ("first", "second", "tie", "dropped", "unparseable")

_FORWARD = {"A": "first", "B": "second", "tie": "tie"}
_BACKWARD = {"A": "second", "B": "first", "tie": "tie"}
_SHARE = {"first": 1.0, "tie": 0.5, "second": 0.0}


@dataclass(frozen=True)
class Outcome:
    result: str              # first | second | tie | dropped | unparseable
    agreement: str           # agree | disagree | unparseable
    forward: str | None      # what the forward order said, mapped: first | second | tie
    backward: str | None     # the same for the backward order
    first_share: float | None  # share of the two orders won by `first` (ties half)

    @property
    def decisive(self) -> bool:
        return self.result in ("first", "second")


def order_preference(verdict: Parsed, order: str) -> str | None:
    """first | second | tie for one order's verdict (`forward` or `backward`); None when the
    verdict is not a pairwise verdict."""
    if not isinstance(verdict, PairwiseVerdict):
        return None
    table = _FORWARD if order == "forward" else _BACKWARD
    return table[verdict.winner]


def combine(forward: Parsed, backward: Parsed, disagreement: str = "drop") -> Outcome:
    """The outcome of one comparison from its two orders' verdicts."""
    if disagreement not in DISAGREEMENT_MODES:
        raise ValueError(f"disagreement must be one of {', '.join(DISAGREEMENT_MODES)}, "
                         f"not {disagreement!r}")
    f = order_preference(forward, "forward")
    b = order_preference(backward, "backward")
    if f is None or b is None:
        return Outcome("unparseable", "unparseable", f, b, None)
    share = (_SHARE[f] + _SHARE[b]) / 2
    if f == b:
        return Outcome(f, "agree", f, b, share)
    return Outcome("tie" if disagreement == "tie" else "dropped", "disagree", f, b, share)


def win_share(forward: Parsed, backward: Parsed) -> float | None:
    """AlpacaEval-style: the share `first` wins over both orders, ties counted as half;
    None when either order is unparseable."""
    return combine(forward, backward, "tie").first_share


def count_outcomes(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Counts by result and by agreement: `first`, `second`, `tie`, `dropped`,
    `unparseable`, `agree`, `disagree`, `comparisons`."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        counts["comparisons"] += 1
        counts[o.result] += 1
        if o.agreement != "unparseable":
            counts[o.agreement] += 1
    return {k: counts.get(k, 0) for k in ("comparisons", *RESULTS, "agree", "disagree")}


def grade_summary(verdicts: Sequence[Parsed]) -> dict[str, object]:
    """Mean, count and histogram (1..10, rounded) of single-answer grades; unparseable ones
    are counted apart."""
    scores = [v.score for v in verdicts if isinstance(v, SingleVerdict)]
    hist = Counter(int(round(s)) for s in scores)
    return {"mean": (sum(scores) / len(scores)) if scores else None,
            "graded": len(scores), "unparseable": len(verdicts) - len(scores),
            "histogram": {str(k): hist.get(k, 0) for k in range(1, 11)}}
