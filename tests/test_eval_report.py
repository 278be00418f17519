"""The evaluate stage's figures: 95% intervals on worked examples, the paper's table, and the
`reference:` field of the spec (a stage of the run or a file)."""

from __future__ import annotations

import math
import random

import pytest

from reference import half_width
from xwin_jobs.judge.intervals import bootstrap_interval, mean_of_groups, percentile, summary
from xwin_jobs.judge.report import render_markdown, render_table
from xwin_jobs.judge.table import paper_table, recipe_figures


def test_percentile_interpolates_between_ranks():
    assert percentile([0.0, 10.0], 0.25) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([7.0], 0.975) == 7.0


def test_bootstrap_of_two_values_spans_them():
    # worked example: resampling [0, 1] gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5th percentile is 0 and the 97.5th is 1
    assert bootstrap_interval([[0.0], [1.0]]) == (0.0, 1.0)


def test_bootstrap_of_equal_values_has_no_width():
    assert bootstrap_interval([[0.5]] * 50) == (0.5, 0.5)
    assert bootstrap_interval([[3.0]]) == (3.0, 3.0)
    assert bootstrap_interval([]) is None and mean_of_groups([]) is None


def test_bootstrap_of_a_proportion_matches_the_normal_interval():
    # 400 prompts, 200 right: the textbook interval is 0.5 ± 1.96 * sqrt(0.25 / 400) = ± 0.049
    values = [[1.0]] * 200 + [[0.0]] * 200
    lo, hi = bootstrap_interval(values)
    assert lo == pytest.approx(0.451, abs=0.008) and hi == pytest.approx(0.549, abs=0.008)
    assert half_width((lo, hi)) == pytest.approx(1.96 * math.sqrt(0.25 / 400), abs=0.008)


def test_bootstrap_is_seeded_and_keeps_a_questions_turns_together():
    rng = random.Random(3)
    flat = [[float(rng.random() < 0.6)] for _ in range(200)]
    assert bootstrap_interval(flat) == bootstrap_interval(flat)       # the same on every run
    # both turns of a question equal (a wrong first answer spoils the second): 100 questions of
    # two turns carry the information of 100 items, not 200, and the interval says so
    clustered = [g + g for g in flat[:100]]
    independent = flat[:100] + flat[:100]
    assert half_width(bootstrap_interval(clustered)) > 1.3 * half_width(bootstrap_interval(independent))
    assert summary(clustered)["mean"] == mean_of_groups(flat[:100]) and summary(clustered)["n"] == 100


REPORT = {
    "judge": {"model": "gpt-4-0613", "mode": "online", "templates": ["p1", "s1"], "estimatedCostUSD": 0.5},
    "reference": "sft", "passGrade": 10,
    "models": {
        "sft": {"alpacaEval": {"winRate": 0.5, "ci": [0.5, 0.5], "wins": 0, "ties": 300, "losses": 0, "judged": 300},
                "mtBench": {"mean": 6.1, "ci": [5.6, 6.6], "accuracy": 0.55, "accuracyCI": [0.5, 0.6],
                            "turn1": 6.0, "turn2": 6.2, "graded": 400}},
        "dpo": {"alpacaEval": {"winRate": 0.7, "ci": [0.66, 0.74], "wins": 130, "ties": 150, "losses": 20, "judged": 300},
                "mtBench": {"mean": 8.9, "ci": [8.6, 9.2], "accuracy": 0.88, "accuracyCI": [0.84, 0.91],
                            "turn1": 9.0, "turn2": 8.8, "graded": 400}},
    },
    "recipe": recipe_figures({"rewardModel": {"metrics": {"heldOutAccuracy": 0.91, "heldOutPairs": 60}},
                              "bestOfN": {"metrics": {"meanScore": 0.1, "meanMaxScore": 1.7,
                                                      "responsesPerPrompt": 8}}}),
}


def test_the_paper_table_has_a_row_per_model_with_intervals():
    rows = paper_table(REPORT)
    assert [r["model"] for r in rows] == ["sft", "dpo"]
    assert rows[1] == {"model": "dpo", "grade": 8.9, "gradeCI": [8.6, 9.2], "winRate": 0.7,
                       "winRateCI": [0.66, 0.74], "accuracy": 0.88, "accuracyCI": [0.84, 0.91]}
    lines = render_table(REPORT)
    assert lines[0] == "| model | MT-bench grade | win rate vs sft | accuracy |"
    assert "| dpo | 8.90 [8.60, 9.20] | 70.0% [66.0%, 74.0%] | 88.0% [84.0%, 91.0%] |" in lines
    text = "\n".join(lines)
    assert "held-out pair accuracy: 91.0% (60 pairs)" in text
    assert "random sample 0.10, of the one the reward model selects 1.70" in text
    assert render_markdown(REPORT).startswith("# Evaluation")


def test_recipe_figures_are_left_out_when_those_stages_did_not_run():
    assert recipe_figures({"rewardModel": None, "bestOfN": None}) == {}
    assert recipe_figures({}) == {}
