"""Batch planning by length (xwin_jobs.training.batching): pure, no model."""

import random

import pytest

from reference import padding_efficiency
from xwin_jobs.training.batching import (BudgetError, Workload, check_budget, fed_positions,
                                         layout_rows, pack_rows, sorted_batches, step_plan)
from xwin_jobs.training.data import batch_plan


def long_tail(n, seed=0, low=19, high=500):
    """Chat-like lengths: most short, a long tail (log-uniform)."""
    import math

    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(n)]


def test_each_optimizer_step_keeps_its_examples_only_the_split_changes():
    lengths = [(n,) for n in long_tail(100)]
    steps = batch_plan(100, 16, 4, seed=3, epoch=1)
    for tokens in (0, 1024):
        for packed in (False, True):
            grouped = step_plan(steps, lengths, 4, tokens, packed)
            assert len(grouped) == len(steps)
            for before, after in zip(steps, grouped):
                assert sorted(i for mb in before for i in mb) == sorted(i for mb in after for i in mb)
            if not tokens:
                assert all(len(mb) <= 4 for step in grouped for mb in step)


def test_token_budget_bounds_every_micro_batch_and_sorting_cuts_padding():
    lengths = [(n,) for n in long_tail(256, seed=1)]
    steps = batch_plan(256, 32, 4, seed=0, epoch=0)
    for packed in (False, True):
        plan = step_plan(steps, lengths, 4, 2048, packed)
        for step in plan:
            for mb in step:
                assert fed_positions([lengths[i][0] for i in mb], packed) <= 2048
    fixed = padding_efficiency(Workload(lengths), [mb for s in steps for mb in s])
    grouped = padding_efficiency(Workload(lengths), [mb for s in step_plan(steps, lengths, 4) for mb in s])
    packed = padding_efficiency(Workload(lengths, packed=True), 
        [mb for s in step_plan(steps, lengths, 4, 2048, True) for mb in s])
    assert fixed < grouped < packed
    assert packed >= 0.9


def test_pairs_pack_chosen_and_rejected_apart_and_budget_counts_both():
    lengths = [(30, 10), (12, 25), (8, 8)]
    assert fed_positions([30, 10], packed=False) == 60
    assert fed_positions([30, 10, 20], packed=True) == 60  # two rows of width 30
    assert fed_positions([30, 10, 20], packed=False) == 90
    batches = sorted_batches(lengths, micro_batch_size=1, micro_batch_tokens=60, packed=True)
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_packed_rows_never_exceed_the_width_and_hold_every_sequence():
    seqs = long_tail(50, seed=2)
    rows, width = layout_rows(sorted(seqs, reverse=True), packed=True)
    assert width == max(seqs)
    assert sorted(i for r in rows for i in r) == list(range(50))
    ordered = sorted(seqs, reverse=True)
    assert all(sum(ordered[i] for i in r) <= width for r in rows)
    assert pack_rows([5, 5, 5], width=10) == [[0, 1], [2]]


def test_budget_smaller_than_the_longest_example_names_the_field():
    with pytest.raises(BudgetError, match=r"training\.microBatchTokens: 100 .*300"):
        check_budget([(20,), (300,), (50,)], 100)
    with pytest.raises(BudgetError, match="microBatchTokens"):
        check_budget([(90, 40)], 100)  # a pair feeds 2 x 90 positions
    check_budget([(20,), (300,)], 300)
    check_budget([(20,), (300,)], 0)  # 0: no budget


def test_loss_weights_are_units_per_example():
    w = Workload([(10,), (20,)], units=[3, 7])
    assert w.weight([0, 1]) == 10 and w.weight([1]) == 7
    assert Workload([(10, 12), (5, 6)]).weight([0, 1]) == 2
