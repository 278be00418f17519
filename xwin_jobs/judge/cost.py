"""Token usage -> estimated USD, and the budget that stops judging before it is passed.

Prices are USD per million tokens (input, output) of OpenAI's list prices; the Batch API
costs half. A model missing from the table is priced like the most expensive entry (so a
budget errs on the safe side) and `price_for` says it is a guess.

`Budget` keeps four sums: `spent` (usage reported by the judge, including earlier attempts
of the stage, read back from the cache), `others` (what the run's other judge stages spent,
read from their caches: `budgetUSD` caps the run as a whole), `reserved` (requests in flight,
at an upper-bound estimate) and the limit. A request is sent only if `others + spent +
reserved + its estimate` stays within the limit, so the run's estimated spend never passes
`budgetUSD`; with `stageBudgetUSD`, `spent + reserved + its estimate` must also stay within it.

Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

# (input, output) USD per 1M tokens.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-0314": (30.0, 60.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.0),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.0, 8.0),
    "gpt-3.5-turbo": (0.50, 1.50),
}
BATCH_DISCOUNT = 0.5
_FALLBACK = max(PRICES_PER_MTOK.values(), key=lambda p: p[0] + p[1])


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    known: bool = True

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        usd = (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6
        return usd * (BATCH_DISCOUNT if batch else 1.0)


def price_for(model: str, table: dict[str, tuple[float, float]] | None = None) -> Price:
    """The price of `model`: an exact entry, else the longest table name it starts with
    (`gpt-4o-2024-08-06` -> `gpt-4o`), else the most expensive entry with known=False."""
    table = PRICES_PER_MTOK if table is None else table
    if model in table:
        return Price(*table[model])
    prefixes = [name for name in table if model.startswith(name + "-")]
    if prefixes:
        return Price(*table[max(prefixes, key=len)])
    fallback = max(table.values(), key=lambda p: p[0] + p[1]) if table else _FALLBACK
    return Price(*fallback, known=False)


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """An upper-side estimate of a chat request's prompt tokens without a tokenizer: a
    third of the UTF-8 bytes (English BPE averages about a quarter) plus a few per message."""
    size = sum(len(str(m.get("content", "")).encode("utf-8")) for m in messages)
    return math.ceil(size / 3) + 4 * len(messages) + 3


class BudgetExceeded(Exception):
    """Judging stopped because the next request would pass budgetUSD."""


@dataclass
class Budget:
    limit_usd: float | None
    spent_usd: float = 0.0      # this stage's, all attempts
    reserved_usd: float = 0.0
    others_usd: float = 0.0     # the run's other judge stages'
    stage_limit_usd: float | None = None  # judge.stageBudgetUSD: this stage's own cap

    def try_reserve(self, estimate_usd: float) -> bool:
        """Reserve `estimate_usd` for a request about to be sent; False if that would pass
        the limit (then nothing is reserved)."""
        if self.limit_usd is not None and \
                self.others_usd + self.spent_usd + self.reserved_usd + estimate_usd > \
                self.limit_usd + 1e-12:
            return False
        if self.stage_limit_usd is not None and \
                self.spent_usd + self.reserved_usd + estimate_usd > self.stage_limit_usd + 1e-12:
            return False
        self.reserved_usd += estimate_usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """A request finished: drop its reservation, add what it really cost."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += actual_usd

    def describe(self) -> str:
        limit = "no limit" if self.limit_usd is None else f"${self.limit_usd:.4f}"
        if self.stage_limit_usd is not None:
            limit += f", stageBudgetUSD ${self.stage_limit_usd:.4f}"
        if not self.others_usd:
            return f"estimated spend ${self.spent_usd:.4f} of budgetUSD {limit}"
        return (f"estimated spend ${self.others_usd + self.spent_usd:.4f} of the run-wide "
                f"budgetUSD {limit} (this stage ${self.spent_usd:.4f}, the run's other judge "
                f"stages ${self.others_usd:.4f})")
