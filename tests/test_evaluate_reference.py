"""The evaluate stage's reference: another evaluated model's answers (`reference: sft`) or a
file, through the loopback judge server; a reference that misses a prompt is refused before
anything is judged."""

from __future__ import annotations

import dataclasses
import json

from judge_fixtures import eval_task, judge_server, run_step  # noqa: F401


def test_reference_model_every_model_against_its_answers(judge_server, tmp_path):
    task = eval_task(tmp_path, judge_server.base_url, {"weak": 0.2, "strong": 0.9}, n_alpaca=8, n_mt=4)
    inputs = {k: v for k, v in task.inputs.items() if k != "alpacaReference"}
    task = dataclasses.replace(task, inputs=inputs, params={**task.params, "referenceModel": "weak",
                                                            "passGrade": 10})
    done = run_step("evaluate-judge", task, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "evaluate/data/report.json").read_text())
    weak, strong = report["models"]["weak"], report["models"]["strong"]
    # the reference model ties itself on every prompt, and that costs no judging
    assert weak["alpacaEval"]["winRate"] == 0.5 and weak["alpacaEval"]["ties"] == 8
    assert weak["alpacaEval"]["ci"] == [0.5, 0.5]
    assert strong["alpacaEval"]["winRate"] > 0.5 and strong["alpacaEval"]["wins"] > 0
    assert report["reference"] == "weak"
    assert strong["mtBench"]["accuracy"] > weak["mtBench"]["accuracy"]
    # only the strong model's answers that differ from the reference were judged (both
    # orders), plus a grade for each of the 2 models x 4 questions x 2 turns
    details = [json.loads(line) for f in (tmp_path / "evaluate/data").glob("details-*.jsonl")
               for line in f.read_text().splitlines()]
    asked = [d for d in details if d["benchmark"] == "alpaca" and d["verdicts"] != ["identical"] * 2]
    assert asked and all(d["model"] == "strong" for d in asked)
    assert judge_server.stats()["comparisons"] == 2 * len(asked) + 2 * 4 * 2
    assert "win rate vs weak" in (tmp_path / "evaluate/data/report.md").read_text()


def test_a_reference_file_missing_a_prompt_is_refused_before_any_judging(judge_server, tmp_path):
    task = eval_task(tmp_path, judge_server.base_url, {"good": 0.9}, n_alpaca=8, n_mt=2)
    ref_file = tmp_path / "eval-data/alpaca-ref.jsonl"
    complete = ref_file.read_text()
    ref_file.write_text("".join(line + "\n" for line in complete.splitlines()
                                if json.loads(line)["id"] not in ("alpaca-3", "alpaca-5")))
    failed = run_step("evaluate-judge", task, tmp_path)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert "alpacaEval.reference" in last and "'alpaca-3'" in last and "2 of 8 prompts" in last
    assert judge_server.stats()["comparisons"] == 0           # nothing was paid for
    ref_file.write_text(complete)
    done = run_step("evaluate-judge", task, tmp_path)
    assert done.returncode == 0, done.stderr
    assert judge_server.stats()["paid_twice"] == []
