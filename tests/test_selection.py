"""Rejection-sampling selection and DPO pair building on hand-made score tables."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from xwin_jobs.selection import (
    build_pairs,
    dpo_pair_records,
    rejection_sampling_records,
    score_summary,
    score_table_from_records,
    select_top_k,
)

nan = math.nan
# ranks (descending score, lower index first among ties): 1, 2, 0, 3, 4
TIED = [[2.0, 5.0, 5.0, 1.0, 1.0]]


def ranked(row) -> list[int]:
    """Reference order: valid responses by descending score, lower index first on ties."""
    return sorted((j for j, v in enumerate(row) if math.isfinite(v)), key=lambda j: (-row[j], j))


# ---------------------------------------------------------------- top-k

def test_top_k_orders_by_score_and_breaks_ties_by_lower_index():
    top = select_top_k(TIED, 3)
    assert top.indices.tolist() == [[1, 2, 0]]
    assert top.valid.all() and not top.short.any()


def test_top_k_never_selects_nan_or_inf_and_keeps_short_prompts():
    scores = [[nan, 1.0, np.inf, 3.0], [nan, nan, nan, nan], [-np.inf, 0.5, nan, nan]]
    top = select_top_k(scores, 2)
    assert top.indices.tolist() == [[3, 1], [-1, -1], [1, -1]]
    assert top.valid.tolist() == [[True, True], [False, False], [True, False]]
    assert top.valid.sum(axis=1).tolist() == [2, 0, 1]
    assert top.short.tolist() == [False, True, True]


def test_top_k_larger_than_the_table_pads_with_invalid():
    top = select_top_k([[1.0, 2.0]], 4)
    assert top.indices.tolist() == [[1, 0, -1, -1]]
    assert top.short.tolist() == [True]


@pytest.mark.parametrize("k", [1, 3, 17, 40])
def test_top_k_matches_a_reference_on_tables_with_many_ties(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, (300, 40)).astype(float)
    scores[rng.random(scores.shape) < 0.3] = nan
    top = select_top_k(scores, k)
    for p, row in enumerate(scores.tolist()):
        want = ranked(row)[:k]
        assert top.indices[p, :len(want)].tolist() == want
        assert (top.indices[p, len(want):] == -1).all()


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_top_k_rejects_a_bad_k(k):
    with pytest.raises(ValueError, match="topK"):
        select_top_k(TIED, k)


# ---------------------------------------------------------------- pairs

@pytest.mark.parametrize("chosen,rejected,want", [
    ("best", "worst", (1, 4)),      # worst: among tied lowest the latest response
    ("best", "rank:3", (1, 0)),
    ("rank:2", "worst", (2, 4)),
    ("rank:2", "rank:4", (2, 3)),
    ("rank:1", "rank:2", (1, 2)),   # equal scores: the earlier one is chosen
])
def test_every_deterministic_strategy_on_a_tied_row(chosen, rejected, want):
    sel = build_pairs(TIED, chosen=chosen, rejected=rejected)
    assert (int(sel.chosen_idx[0]), int(sel.rejected_idx[0])) == want
    row = TIED[0]
    assert sel.margin[0] == row[want[0]] - row[want[1]]


def test_all_equal_scores_never_pair_a_response_with_itself():
    sel = build_pairs([[3.0, 3.0, 3.0]])
    assert (sel.chosen_idx[0], sel.rejected_idx[0]) == (0, 2)
    assert sel.margin[0] == 0.0 and sel.kept[0]          # a gap equal to minMargin is kept
    assert not build_pairs([[3.0, 3.0, 3.0]], min_margin=0.1).kept[0]


@pytest.mark.parametrize("rejected", ["worst", "random", "rank:2"])
def test_infinite_scores_are_invalid_in_pairs(rejected):
    inf = math.inf
    sel = build_pairs([[1.0, inf, 3.0, -inf], [-inf, 2.0, nan, 1.0], [inf, -inf, 0.0, nan]],
                      rejected=rejected)
    assert sel.chosen_idx.tolist() == [2, 1, -1]
    assert sel.rejected_idx.tolist() == [0, 3, -1]
    assert sel.margin[:2].tolist() == [2.0, 1.0]


def test_min_margin_drops_smaller_gaps_and_counts_them():
    scores = [[0.0, 1.0], [0.0, 0.5], [0.0, 0.49], [0.0, nan]]
    sel = build_pairs(scores, min_margin=0.5)
    assert sel.kept.tolist() == [True, True, False, False]
    assert sel.counts() == {"prompts": 4, "pairs_kept": 2, "dropped_by_margin": 1,
                            "too_few_valid": 1}
    assert sel.margin[3] != sel.margin[3]                 # NaN: no pair for that prompt


@pytest.mark.parametrize("chosen,rejected,needed", [
    ("best", "worst", 2), ("best", "random", 2), ("rank:2", "worst", 3),
    ("rank:2", "random", 3), ("best", "rank:4", 4), ("rank:2", "rank:5", 5),
])
def test_prompts_with_too_few_valid_responses_are_flagged_not_paired(chosen, rejected, needed):
    rows = [[float(j) if j < have else nan for j in range(6)] for have in range(7)]
    sel = build_pairs(rows, chosen=chosen, rejected=rejected)
    assert sel.too_few_valid.tolist() == [have < needed for have in range(7)]
    assert sel.too_few == needed and sel.pairs_kept == 7 - needed
    assert (sel.chosen_idx[:needed] == -1).all() and (sel.rejected_idx[:needed] == -1).all()
    assert (sel.chosen_idx[needed:] != sel.rejected_idx[needed:]).all()


@pytest.mark.parametrize("chosen", ["best", "rank:2", "rank:3"])
@pytest.mark.parametrize("rejected", ["worst", "rank:4", "random"])
def test_pairs_match_a_reference_on_random_tables(chosen, rejected):
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, (400, 12)).astype(float)
    scores[rng.random(scores.shape) < 0.35] = nan
    sel = build_pairs(scores, chosen=chosen, rejected=rejected, min_margin=1.0, seed=3)
    c_rank = 1 if chosen == "best" else int(chosen.split(":")[1])
    for p, row in enumerate(scores.tolist()):
        order = ranked(row)
        need = int(rejected.split(":")[1]) if rejected.startswith("rank") else c_rank + 1
        if len(order) < need:
            assert sel.too_few_valid[p] and not sel.kept[p]
            continue
        c = order[c_rank - 1]
        assert sel.chosen_idx[p] == c
        r = int(sel.rejected_idx[p])
        if rejected == "worst":
            assert r == order[-1]
        elif rejected == "random":
            assert r in order[c_rank:]                   # ranked below the chosen one
        else:
            assert r == order[int(rejected.split(":")[1]) - 1]
        assert sel.kept[p] == (row[c] - row[r] >= 1.0)


@pytest.mark.parametrize("threads", [1, None])
def test_kernels_match_the_reference_with_inf_nan_and_ties_on_any_thread_count(threads):
    import numba
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, (2000, 9)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.2] = nan
    scores[rng.random(scores.shape) < 0.05] = np.inf
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    scores[7] = np.inf                                    # a row of +inf only: nothing valid
    scores[8] = -np.inf
    default = numba.get_num_threads()
    numba.set_num_threads(threads or default)
    try:
        top = select_top_k(scores, 3)
        pairs = build_pairs(scores, rejected="worst")
    finally:
        numba.set_num_threads(default)
    for p, row in enumerate(scores.tolist()):
        order = ranked(row)
        assert [int(j) for j in top.indices[p][top.valid[p]]] == order[:3]
        if len(order) >= 2:
            assert (pairs.chosen_idx[p], pairs.rejected_idx[p]) == (order[0], order[-1])
        else:
            assert pairs.too_few_valid[p]


def test_random_rejected_is_seeded_uniform_and_never_the_chosen():
    scores = np.tile([5.0, 4.0, 3.0, 2.0, 1.0], (20000, 1))
    scores[::7, 2] = nan
    a = build_pairs(scores, rejected="random", seed=11)
    b = build_pairs(scores, rejected="random", seed=11)
    c = build_pairs(scores, rejected="random", seed=12)
    assert np.array_equal(a.rejected_idx, b.rejected_idx)
    assert not np.array_equal(a.rejected_idx, c.rejected_idx)
    assert (a.rejected_idx != a.chosen_idx).all() and (a.chosen_idx == 0).all()
    assert not (a.rejected_idx[::7] == 2).any()          # a NaN response is never drawn
    full = np.ones(len(scores), bool)
    full[::7] = False
    freq = np.bincount(a.rejected_idx[full], minlength=5)[1:] / full.sum()
    assert np.allclose(freq, 0.25, atol=0.02)


def test_random_rejected_with_tied_scores_stays_below_the_chosen():
    sel = build_pairs(np.tile([4.0, 4.0, 4.0], (500, 1)), chosen="rank:2",
                      rejected="random", seed=0)
    assert (sel.chosen_idx == 1).all() and (sel.rejected_idx == 2).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"chosen": "worst"}, "chosen: expected best | rank:N"),
    ({"chosen": "rank:0"}, "rank:N with N >= 1"),
    ({"rejected": "rank:x"}, "rank:N with N >= 1"),
    ({"rejected": "best"}, "rejected: expected worst | rank:N | random"),
    ({"chosen": "rank:3", "rejected": "rank:3"}, "must rank below chosen"),
    ({"min_margin": nan}, "minMargin"),
])
def test_bad_strategies_are_refused_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pairs(TIED, **kwargs)


def test_float32_tables_are_not_converted_and_margins_are_float64():
    scores = np.array([[0.1, 0.7, nan]], dtype=np.float32)
    sel = build_pairs(scores)
    assert sel.margin.dtype == np.float64
    assert sel.margin[0] == np.float64(np.float32(0.7)) - np.float64(np.float32(0.1))


def test_score_summary():
    summary = score_summary([[1.0, 3.0, nan], [2.0, 2.0, 2.0], [nan, nan, nan]])
    assert summary == {"prompts": 3, "responsesPerPromptMean": 5 / 3, "responsesPerPromptMin": 0,
                       "promptsWithoutValidResponse": 1, "meanScore": 2.0,
                       "meanMaxScore": 2.5, "meanMinScore": 1.5}
    assert score_summary(np.zeros((2, 0)))["meanScore"] is None


# ---------------------------------------------------------------- records

def prompt(text):
    return [{"role": "user", "content": text}]


SCORED = [
    {"id": "a", "prompt": prompt("A?"), "responses": [
        {"content": "a0", "score": 0.5}, {"content": "a1", "score": 2.0},
        {"content": "a2", "score": -1.0}, {"content": "a3", "score": 2.0}]},
    {"id": "b", "prompt": prompt("B?"), "responses": [
        {"content": "", "score": 9.0}, {"content": "b1", "score": None},
        {"content": "b2", "score": nan}, {"content": "b3", "score": 1.0}]},
    {"id": "c", "prompt": prompt("C?"), "responses": [
        {"content": "c0", "score": 1.0}, {"content": "  ", "score": 5.0},
        {"content": "c2", "score": 0.9}, {"content": "c3", "score": math.inf}]},
]


def test_score_table_marks_empty_null_nan_and_inf_invalid():
    table = score_table_from_records(SCORED)
    assert table.ids == ["a", "b", "c"]
    assert np.array_equal(table.scores, [[0.5, 2.0, -1.0, 2.0], [nan, nan, nan, 1.0],
                                         [1.0, nan, 0.9, nan]], equal_nan=True)
    assert table.returned.tolist() == [4, 4, 4]
    assert table.content(2, 2) == "c2"


def test_score_table_pads_prompts_with_fewer_responses_with_nan():
    table = score_table_from_records([
        {"id": 1, "prompt": prompt("x"), "responses": [{"content": "x0", "score": 1}]},
        {"id": 2, "prompt": prompt("y"), "responses": [{"content": "y", "score": 2}] * 3},
    ])
    assert table.ids == ["1", "2"] and table.returned.tolist() == [1, 3]
    assert np.array_equal(table.scores, [[1.0, nan, nan], [2.0, 2.0, 2.0]], equal_nan=True)
    assert score_table_from_records([]).scores.shape == (0, 0)


@pytest.mark.parametrize("record,message", [
    ("x", r"record 1: expected an object"),
    ({"prompt": [], "responses": []}, r"record 1: missing field 'id'"),
    ({"id": "q", "prompt": [], "responses": {}}, r"record 1 \(id 'q'\): field 'responses'"),
    ({"id": "q", "responses": []}, r"field 'prompt'"),
    ({"id": "q", "prompt": [], "responses": [{"content": "x", "score": "high"}]},
     r"responses\[0\]\.score: expected a number"),
    ({"id": "q", "prompt": [], "responses": [{"content": 3, "score": 1}]},
     r"responses\[0\]\.content: expected a string"),
])
def test_malformed_scored_records_name_the_record_and_field(record, message):
    with pytest.raises(ValueError, match=message):
        score_table_from_records([record])


def test_rejection_sampling_records_top1_and_top2():
    out, summary = rejection_sampling_records(SCORED, k=1)
    assert out == [
        {"id": "a", "messages": prompt("A?") + [{"role": "assistant", "content": "a1"}]},
        {"id": "b", "messages": prompt("B?") + [{"role": "assistant", "content": "b3"}]},
        {"id": "c", "messages": prompt("C?") + [{"role": "assistant", "content": "c0"}]},
    ]
    assert summary["selected"] == 3 and summary["promptsShort"] == 0
    assert summary["invalidResponses"] == 5 and summary["responses"] == 12
    out2, summary2 = rejection_sampling_records(SCORED, k=2)
    assert [(r["id"], r["messages"][-1]["content"]) for r in out2] == [
        ("a#1", "a1"), ("a#2", "a3"), ("b#1", "b3"), ("c#1", "c0"), ("c#2", "c2")]
    assert summary2["promptsShort"] == 1 and summary2["selected"] == 5


def test_dpo_pair_records_in_the_pair_format_with_counts():
    out, summary = dpo_pair_records(SCORED, chosen="best", rejected="worst", min_margin=0.5)
    assert out == [{
        "id": "a", "prompt": prompt("A?"),
        "chosen": [{"role": "assistant", "content": "a1"}],
        "rejected": [{"role": "assistant", "content": "a2"}],
        "chosen_score": 2.0, "rejected_score": -1.0,
    }]
    assert summary["pairsKept"] == 1
    assert summary["pairsDroppedByMargin"] == 1            # c: 1.0 vs 0.9
    assert summary["promptsTooFewResponses"] == 1          # b: one valid response
    json.dumps(summary, allow_nan=False)                   # fit for metrics.json


def test_dpo_pair_records_random_is_reproducible():
    a, _ = dpo_pair_records(SCORED, rejected="random", seed=5)
    b, _ = dpo_pair_records(SCORED, rejected="random", seed=5)
    assert a == b and all(p["chosen"] != p["rejected"] for p in a)


# ---------------------------------------------------------------- rejected floor
# Two prompts, scores as a reward model gives them: refusals at the bottom (-3), wrong answers
# in the middle (0, 0.5), right answers at the top (2). The floor is a quantile of all 10 valid
# scores: q = 0.5 resolves to 0, above the 4 refusals (the bottom 40%).
FLOORED = [[2.0, -3.0, 0.5, -3.0, 0.0],
           [2.0, 0.0, -3.0, -3.0, 2.0]]


def test_rejected_floor_skips_degenerate_answers_for_worst():
    plain = build_pairs(FLOORED, rejected="worst")
    assert plain.rejected_idx.tolist() == [3, 3]          # the worst: a refusal
    sel = build_pairs(FLOORED, rejected="worst", rejected_floor=0.5)
    assert sel.floor == pytest.approx(0.0)                # the median of the 10 scores
    assert sel.chosen_idx.tolist() == [0, 0]
    assert sel.rejected_idx.tolist() == [4, 1]            # the lowest answer at or above 0
    assert sel.margin.tolist() == [2.0, 2.0]


def test_rejected_floor_applies_to_random_and_rank():
    for seed in range(20):
        sel = build_pairs(FLOORED, rejected="random", rejected_floor=0.5, seed=seed)
        assert sel.rejected_idx[0] in (2, 4) and sel.rejected_idx[1] in (1, 4)
    ranked3 = build_pairs(FLOORED, rejected="rank:3", rejected_floor=0.5)
    assert ranked3.rejected_idx.tolist() == [4, 1]        # third best: 0.0, at the floor
    ranked4 = build_pairs(FLOORED, rejected="rank:4", rejected_floor=0.5)
    assert ranked4.rejected_idx.tolist() == [-1, -1]      # fourth best: a refusal
    assert ranked4.too_few_valid.tolist() == [True, True]


def test_rejected_floor_without_anything_above_it_below_the_chosen_gives_no_pair():
    scores = [[1.0, -5.0, -5.0], [3.0, 2.5, nan]]
    sel = build_pairs(scores, rejected="worst", rejected_floor=0.6)   # floor 1.6: row 0 has none
    assert sel.floor == pytest.approx(1.6)
    assert sel.kept.tolist() == [False, True]
    assert sel.counts()["too_few_valid"] == 1
    assert sel.rejected_idx.tolist() == [-1, 1]


def test_rejected_floor_zero_is_the_plain_strategy_and_bad_floors_are_refused():
    for rejected in ("worst", "random", "rank:2"):
        a = build_pairs(FLOORED, rejected=rejected, rejected_floor=0.0, seed=3)
        b = build_pairs(FLOORED, rejected=rejected, seed=3)
        assert a.rejected_idx.tolist() == b.rejected_idx.tolist()
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="rejectedFloor"):
            build_pairs(FLOORED, rejected_floor=bad)


def test_dpo_pair_records_report_the_floor_score():
    out, summary = dpo_pair_records(SCORED, rejected="worst", rejected_floor=0.0)
    assert summary["rejectedFloor"] == 0.0
    assert summary["rejectedFloorScore"] == -1.0           # the lowest valid score (a2)
    assert summary["pairsKept"] == 2                       # as without a floor
    json.dumps(summary, allow_nan=False)


# ---------------------------------------------------------------- benchmark smoke

def test_benchmark_methods_agree_on_a_small_table():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_selection.py"
    spec = importlib.util.spec_from_file_location("bench_selection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(2000, repeats=1, pandas_repeats=1, quiet=True)  # asserts agreement
    assert result["prompts"] == 2000
    assert result["pairs_kept"] > 0 and result["dropped_by_margin"] > 0
    assert result["too_few_valid"] > 0
