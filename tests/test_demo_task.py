"""The demo task (examples/tiny): evaluation prompts no training stage ever sees, SFT data
imperfect enough to leave the recipe room, and the demo run that reads them that way."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples/tiny"), str(ROOT / "examples")]

import make_task  # noqa: E402
import synthetic  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_prompts_are_disjoint_from_every_training_pair_and_best_of_n_prompt(seed):
    files = make_task.task_records(seed)
    evaluated = make_task.first_user_turns(files["alpaca"]) | make_task.first_user_turns(files["mt-bench"])
    assert len(evaluated) == len(files["alpaca"]) + len(files["mt-bench"]) >= 400
    for name in make_task.TRAIN_FILES:
        assert not evaluated & make_task.first_user_turns(files[name]), name


def test_the_disjointness_check_catches_a_shared_prompt():
    files = make_task.task_records(0)
    leaked = files["alpaca"][7]["messages"][0]["content"]
    files["rs-prompts"].append(synthetic.prompt_record(999, leaked, "rs"))
    with pytest.raises(AssertionError, match="rs-prompts.jsonl shares 1 prompt"):
        make_task.check_disjoint(files)


def test_sft_data_is_imperfect_and_the_grader_tells_answers_apart():
    files = make_task.task_records(0)
    grades = Counter(synthetic.grade(c["messages"][:1], c["messages"][1]["content"]) for c in files["sft"])
    share_right = grades[1.0] / len(files["sft"])
    assert 0.4 < share_right < 0.6 and grades[0.0] > 0 and grades[0.5] > 0
    q = [{"role": "user", "content": "Quick question. Add 3 and 4."}]
    assert synthetic.grade(q, "3 plus 4 is 7.") == 1.0
    assert synthetic.grade(q, "It is 7.") == 0.5
    assert synthetic.grade(q, "3 plus 4 is 8.") == synthetic.grade(q, "I do not know.") == 0.0
    q2 = q + [{"role": "assistant", "content": "3 plus 4 is 7."}, {"role": "user", "content": "And plus 2?"}]
    assert synthetic.grade(q2, "7 plus 2 is 9.") == 1.0


def test_the_demo_run_reads_evaluation_prompts_only_in_evaluate():
    from xwin_operator.api.spec_io import load_run
    from xwin_operator.core.tasks import stage_task

    run = load_run(ROOT / "examples/tiny/run.yaml")
    evaluate = stage_task(run, "evaluate")
    eval_files = {evaluate.inputs["alpacaPrompts"], evaluate.inputs["mtBenchQuestions"]}
    assert evaluate.params["referenceModel"] == "sft" and "alpacaReference" not in evaluate.inputs
    for stage in run.spec.stages.present():
        if stage != "evaluate":
            assert not eval_files & set(stage_task(run, stage).inputs.values()), stage


def test_second_turn_prompts_follow_a_worked_answer_and_leave_every_other_file_unchanged():
    files = make_task.task_records(0, second_turn_in=("pp", "rs"))
    for name in ("pair-prompts", "rs-prompts"):
        second = [p["messages"] for p in files[name] if len(p["messages"]) == 3]
        assert len(second) == len(files[name]) // 2, name
        for q, a, follow in second:
            assert synthetic.grade([q], a["content"]) == 1.0 and follow["content"].startswith("And plus")
            assert synthetic.expected_sum([q, a, follow]) >= synthetic.expected_sum([q])
    demo = make_task.task_records(0)   # the demo's: every other pair prompt, best-of-N first turns only
    assert sum(len(p["messages"]) == 3 for p in demo["pair-prompts"]) == len(demo["pair-prompts"]) // 2
    assert all(len(p["messages"]) == 1 for p in demo["rs-prompts"])
    plain = make_task.task_records(0, second_turn_every=0)
    assert all(len(p["messages"]) == 1 for name in ("pair-prompts", "rs-prompts") for p in plain[name])
    assert [p["messages"][0] for p in plain["rs-prompts"]] == [p["messages"][0] for p in files["rs-prompts"]]
    assert plain["rs-prompts"] == demo["rs-prompts"]
    assert {k: v for k, v in plain.items() if "prompts" not in k} == \
           {k: v for k, v in files.items() if "prompts" not in k} == \
           {k: v for k, v in demo.items() if "prompts" not in k}
