"""Rejection-sampling selection and DPO pair building over a dense score table (numpy only).

The scored set (Xwin-Set) is held as one float array `scores` of shape (P, N): row p holds
the reward-model scores of prompt p's responses in the order they were returned. A cell is
*valid* when it holds a finite number; NaN marks anything unusable (an empty response, a NaN
or missing score, or padding when a prompt got fewer than N responses). +/-inf counts as
invalid too, so a broken score can never win or lose a selection.

One total order ranks a prompt's valid responses: descending score, ties broken by ascending
response index (the earlier response ranks higher). Rank is 1-based over valid responses:
rank 1 is the best, rank `count` the worst. Every strategy below is defined through that
order, so results are deterministic and `chosen` and `rejected` can never be the same
response:

- chosen:   `best` (rank 1) | `rank:N` (the N-th best).
- rejected: `worst` (rank count; among tied lowest scores the *latest* response) |
            `rank:N` (N counted from the best, as the Xwin-LM paper's "rank r" rejected
            sample; N must exceed the chosen rank) |
            `random` (uniform over the valid responses ranked below the chosen one, seeded).
- rejected_floor: q in [0, 1): the rejected strategy picks only among responses scoring at
  or above the q-quantile of every valid score in the table (the *floor*): `worst` is then
  the lowest-ranked response at or above the floor, `random` draws among those below the
  chosen one, and `rank:N` pairs only where the N-th response is at or above it. The rejected
  answer is then a *plausible* lower-ranked one, not a degenerate one (a refusal, an empty or
  cut-off answer): rejection sampling already moves the policy away from the bottom of the
  ranking, and DPO learns from the near misses left, as Xwin-LM-DPO pairs the best response
  with a lower-ranked one rather than always the worst. A prompt with nothing at or above
  the floor ranked below its chosen response gets no pair (flagged as too few).
- min_margin: a pair is dropped when chosen_score - rejected_score < min_margin
  (a gap equal to min_margin is kept).

A prompt without enough valid responses for a strategy is never dropped silently: it is
flagged in `too_few_valid` and counted. Rejection sampling keeps what a prompt has when it
has fewer than k valid responses (flagged in `short`, counted in the summary).

Everything is vectorised over prompts, with no Python loop over prompts or responses: the
ranks and the worst response of every row come from two compiled per-row kernels
(selection_kernels.py, numba, parallel over rows, one pass each); pairs, margins, the random
draw and the counts are numpy over whole columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

@dataclass
class ScoreTable:
    """A scored set in dense form. `contents[p][j]` is response j of prompt p."""

    ids: list[str]
    prompts: list[list[dict]]
    contents: list[list[str]]
    scores: np.ndarray        # (P, N) float64, NaN = invalid or padding
    returned: np.ndarray      # (P,) int: responses each prompt came back with

    def content(self, p: int, j: int) -> str:
        return self.contents[p][j]


@dataclass
class TopK:
    indices: np.ndarray       # (P, k) int64, best first; -1 where valid is False
    valid: np.ndarray         # (P, k) bool: that rank exists for the prompt
    short: np.ndarray         # (P,) bool: fewer than k valid responses (kept with what it has)


@dataclass
class PairSelection:
    chosen_idx: np.ndarray    # (P,) int64, -1 where the prompt has too few valid responses
    rejected_idx: np.ndarray  # (P,) int64, -1 likewise
    margin: np.ndarray        # (P,) float64 chosen - rejected score, NaN where no pair
    kept: np.ndarray          # (P,) bool: a pair exists and margin >= min_margin
    too_few_valid: np.ndarray  # (P,) bool
    floor: float | None = None  # the score rejected_floor resolved to (None: no floor)

    @property
    def pairs_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def dropped_by_margin(self) -> int:
        return int((~self.too_few_valid & ~self.kept).sum())

    @property
    def too_few(self) -> int:
        return int(self.too_few_valid.sum())

    def counts(self) -> dict[str, int]:
        return {"prompts": int(self.kept.shape[0]), "pairs_kept": self.pairs_kept,
                "dropped_by_margin": self.dropped_by_margin, "too_few_valid": self.too_few}


# ---------------------------------------------------------------- dense core
#
# The per-row work is two compiled kernels (selection_kernels.py: numba, parallel over rows),
# each one pass over the table that skips non-finite cells inline; everything around them is
# numpy over whole columns.

def as_score_array(scores: Any) -> np.ndarray:
    """A 2-D floating array (float32 kept as is, anything else as float64)."""
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be a 2-D (prompts, responses) table, got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.shape[1] == 0:                  # no responses at all: one all-invalid column
        return np.full((arr.shape[0], 1), np.nan, dtype=arr.dtype)
    return arr


def _finite_only(s: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(s), s, np.nan)


def _gather(s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """s[p, idx[p]] for every row (idx must be in range)."""
    flat = np.arange(s.shape[0], dtype=np.int64) * s.shape[1] + idx
    return np.ascontiguousarray(s).ravel().take(flat)


def _ranked(s: np.ndarray, upto: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (P, upto) of ranks 1..upto in the total order and their scores, -inf where a
    prompt has no such rank (its index is then meaningless)."""
    from .selection_kernels import ranked_rows

    return ranked_rows(s, upto)


def _worst(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and score of the last response in the total order (lowest score, the latest
    among ties); the score is +inf where a prompt has no valid response."""
    from .selection_kernels import worst_rows

    return worst_rows(s)


def select_top_k(scores: Any, k: int) -> TopK:
    """Top-k responses per prompt, best first. NaN is never selected; a prompt with fewer
    than k valid responses keeps all it has (`short` flags it, `valid` masks the gaps)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"topK must be a positive integer, got {k!r}")
    idx, val = _ranked(as_score_array(scores), k)
    valid = val > -np.inf
    idx[~valid] = -1
    return TopK(indices=idx, valid=valid, short=~valid[:, -1])


def parse_strategy(text: str, *, role: str) -> tuple[str, int]:
    """`best` | `worst` | `random` | `rank:N` -> (kind, N). role is `chosen` or `rejected`."""
    allowed = ("best", "rank") if role == "chosen" else ("worst", "rank", "random")
    t = str(text).strip()
    if t.startswith("rank:"):
        num = t[len("rank:"):]
        if not num.isdigit() or int(num) < 1:
            raise ValueError(f"{role}: rank must be rank:N with N >= 1, got {text!r}")
        return "rank", int(num)
    if t in allowed:
        return t, 1 if t == "best" else 0
    choices = " | ".join("rank:N" if a == "rank" else a for a in allowed)
    raise ValueError(f"{role}: expected {choices}, got {text!r}")


def floor_score(s: np.ndarray, q: float) -> float:
    """The q-quantile (linear interpolation) of the table's valid scores; -inf without any."""
    if isinstance(q, bool) or not (0.0 <= float(q) < 1.0):
        raise ValueError(f"rejectedFloor: expected a quantile in [0, 1), got {q!r}")
    finite = s[np.isfinite(s)]
    return float(np.quantile(finite.astype(np.float64), q)) if finite.size else -math.inf


def build_pairs(scores: Any, chosen: str = "best", rejected: str = "worst",
                min_margin: float = 0.0, seed: int = 0,
                rejected_floor: float | None = None) -> PairSelection:
    """One (chosen, rejected) pair per prompt; see the module docstring for the strategies."""
    c_kind, c_rank = parse_strategy(chosen, role="chosen")
    r_kind, r_rank = parse_strategy(rejected, role="rejected")
    if r_kind == "rank" and r_rank <= c_rank:
        raise ValueError(f"rejected: rank:{r_rank} must rank below chosen ({chosen}), "
                         f"i.e. N > {c_rank}")
    if not math.isfinite(float(min_margin)):
        raise ValueError(f"minMargin must be a finite number, got {min_margin!r}")
    s = as_score_array(scores)
    top, top_val = _ranked(s, max(c_rank, r_rank))
    c_idx, c_val = top[:, c_rank - 1], top_val[:, c_rank - 1]
    has_chosen = c_val > -np.inf
    floor = None if rejected_floor is None else floor_score(s, rejected_floor)
    # the candidates for rejected: every valid response, or those at or above the floor
    s_r = s if floor is None else np.where(s >= floor, s, np.nan).astype(s.dtype)
    if r_kind == "rank":
        r_idx, r_val = top[:, r_rank - 1], top_val[:, r_rank - 1]
        has_pair = (r_val > -np.inf) & (r_val >= (-np.inf if floor is None else floor))
    elif r_kind == "worst":       # the worst is the chosen itself iff nothing ranks below it
        r_idx, r_val = _worst(s_r)
        has_pair = has_chosen & (r_idx != c_idx) & (r_val < np.inf)
    else:
        r_idx, below = _random_below(s_r, c_idx, c_val, seed)
        r_val = _gather(s, r_idx)
        has_pair = has_chosen & (below > 0)
    with np.errstate(invalid="ignore"):
        margin = np.where(has_pair, c_val.astype(np.float64) - r_val.astype(np.float64), np.nan)
    return PairSelection(chosen_idx=np.where(has_pair, c_idx, -1),
                         rejected_idx=np.where(has_pair, r_idx, -1), margin=margin,
                         kept=margin >= float(min_margin),   # NaN (no pair) compares False
                         too_few_valid=~has_pair, floor=floor)


def _random_below(s: np.ndarray, c_idx: np.ndarray, c_val: np.ndarray, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, a uniform draw among the valid responses ranked below response c_idx, and
    how many there were to draw from."""
    n_prompts, n = s.shape
    cols = np.arange(n)[None, :]
    c_val = c_val[:, None]
    below = np.isfinite(s) & ((s < c_val) | ((s == c_val) & (cols > c_idx[:, None])))
    m = below.sum(axis=1)
    u = np.random.default_rng(seed).random(n_prompts)
    t = np.minimum((u * m).astype(np.int64), np.maximum(m - 1, 0))
    seen = np.cumsum(below, axis=1, dtype=np.int16 if n < 32000 else np.int64)
    return (seen > t[:, None]).argmax(axis=1), m   # first column with t+1 below-ones seen


def score_summary(scores: Any) -> dict[str, Any]:
    """Metrics for a scored set: valid responses per prompt (mean, min) and the per-prompt
    mean / max / min score averaged over prompts that have at least one valid response."""
    s = _finite_only(as_score_array(scores))
    valid = ~np.isnan(s)
    counts = valid.sum(axis=1)
    has = counts > 0
    out: dict[str, Any] = {
        "prompts": int(s.shape[0]),
        "responsesPerPromptMean": float(counts.mean()) if s.shape[0] else 0.0,
        "responsesPerPromptMin": int(counts.min()) if s.shape[0] else 0,
        "promptsWithoutValidResponse": int((~has).sum()),
    }
    if has.any():
        sv = s[has].astype(np.float64)
        vv = valid[has]
        total = np.where(vv, sv, 0.0).sum(axis=1)
        out["meanScore"] = float((total / counts[has]).mean())
        out["meanMaxScore"] = float(np.where(vv, sv, -np.inf).max(axis=1).mean())
        out["meanMinScore"] = float(np.where(vv, sv, np.inf).min(axis=1).mean())
    else:
        out["meanScore"] = out["meanMaxScore"] = out["meanMinScore"] = None  # JSON null
    return out


# ---------------------------------------------------------------- records level

def _score_value(raw: Any, where: str) -> float:
    if raw is None:
        return math.nan
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"{where}.score: expected a number or null, got {raw!r}")
    return float(raw)


def score_table_from_records(records: Iterable[dict]) -> ScoreTable:
    """Scored-set records `{"id", "prompt", "responses": [{"content", "score"}]}` -> ScoreTable.

    A null/NaN/infinite score or an empty (whitespace-only) content is an invalid cell (NaN);
    prompts with fewer responses than the widest one are padded with NaN. A structurally
    malformed record raises ValueError naming the record number, its id and the field."""
    ids: list[str] = []
    prompts: list[list[dict]] = []
    contents: list[list[str]] = []
    flat: list[float] = []
    lengths: list[int] = []
    for i, rec in enumerate(records):
        where = f"record {i + 1}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        if "id" not in rec:
            raise ValueError(f"{where}: missing field 'id'")
        where = f"record {i + 1} (id {rec['id']!r})"
        responses = rec.get("responses")
        if not isinstance(responses, list):
            raise ValueError(f"{where}: field 'responses' must be a list")
        if not isinstance(rec.get("prompt"), list):
            raise ValueError(f"{where}: field 'prompt' must be a list of messages")
        row: list[str] = []
        for j, resp in enumerate(responses):
            at = f"{where}: responses[{j}]"
            if not isinstance(resp, dict):
                raise ValueError(f"{at}: expected an object with 'content' and 'score'")
            content = resp.get("content")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ValueError(f"{at}.content: expected a string, got {type(content).__name__}")
            score = _score_value(resp.get("score"), at)
            flat.append(score if content.strip() and math.isfinite(score) else math.nan)
            row.append(content)
        ids.append(str(rec["id"]))
        prompts.append(rec["prompt"])
        contents.append(row)
        lengths.append(len(row))
    lens = np.asarray(lengths, dtype=np.int64)
    width = int(lens.max()) if len(lens) else 0
    scores = np.full((len(lens), width), np.nan, dtype=np.float64)
    if flat:
        row_of = np.repeat(np.arange(len(lens)), lens)
        col_of = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        scores[row_of, col_of] = np.asarray(flat, dtype=np.float64)
    return ScoreTable(ids=ids, prompts=prompts, contents=contents, scores=scores, returned=lens)


def _table_summary(table: ScoreTable) -> dict[str, Any]:
    summary: dict[str, Any] = score_summary(table.scores)
    summary["responses"] = int(table.returned.sum())
    summary["invalidResponses"] = int(table.returned.sum() - (~np.isnan(table.scores)).sum())
    return summary


def rejection_sampling_records(scored_records: Iterable[dict], k: int = 1
                               ) -> tuple[list[dict], dict[str, Any]]:
    """Conversation records `{"id", "messages": prompt + [assistant]}` for the top-k valid
    responses of every prompt, best first. With k == 1 the id is the prompt's id, otherwise
    `<id>#<rank>`. Prompts with fewer than k valid responses keep what they have
    (`promptsShort`); prompts with none give no record (`promptsWithoutValidResponse`)."""
    table = score_table_from_records(scored_records)
    top = select_top_k(table.scores, k)
    out: list[dict] = []
    for p, r in zip(*np.nonzero(top.valid)):
        j = int(top.indices[p, r])
        rid = table.ids[p] if k == 1 else f"{table.ids[p]}#{r + 1}"
        answer = {"role": "assistant", "content": table.contents[p][j]}
        out.append({"id": rid, "messages": [*table.prompts[p], answer]})
    summary = _table_summary(table)
    summary.update({"topK": int(k), "selected": len(out),
                    "promptsShort": int((top.short & top.valid[:, 0]).sum())})
    return out, summary


def dpo_pair_records(scored_records: Iterable[dict], chosen: str = "best",
                     rejected: str = "worst", min_margin: float = 0.0, seed: int = 0,
                     rejected_floor: float | None = None
                     ) -> tuple[list[dict], dict[str, Any]]:
    """Pair records (docs/design.md pair format, without `judge`) for every kept pair, in prompt
    order, plus a summary: pairsKept, pairsDroppedByMargin, promptsTooFewResponses (and
    rejectedFloorScore, the score the floor quantile resolved to, when one is set)."""
    table = score_table_from_records(scored_records)
    sel = build_pairs(table.scores, chosen=chosen, rejected=rejected,
                      min_margin=min_margin, seed=seed, rejected_floor=rejected_floor)
    out: list[dict] = []
    for p in np.flatnonzero(sel.kept):
        c, r = int(sel.chosen_idx[p]), int(sel.rejected_idx[p])
        out.append({
            "id": table.ids[p],
            "prompt": table.prompts[p],
            "chosen": [{"role": "assistant", "content": table.contents[p][c]}],
            "rejected": [{"role": "assistant", "content": table.contents[p][r]}],
            "chosen_score": float(table.scores[p, c]),
            "rejected_score": float(table.scores[p, r]),
        })
    summary = _table_summary(table)
    summary.update({"chosen": chosen, "rejected": rejected, "minMargin": float(min_margin),
                    "pairsKept": sel.pairs_kept, "pairsDroppedByMargin": sel.dropped_by_margin,
                    "promptsTooFewResponses": sel.too_few})
    if sel.floor is not None:
        summary.update(rejectedFloor=float(rejected_floor), rejectedFloorScore=sel.floor)
    return out, summary
