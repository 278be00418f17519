"""The judge's budget caps the run as a whole (issue 23, item 5): `judge.budgetUSD` counts what
every judge stage of the run spent, read from their judgment caches in the store, across
stages, attempts and retries. With the loopback judge (examples/judge_server.py)."""

from __future__ import annotations

import json

from judge_fixtures import candidate_records, eval_task, judge_server, pairs_task, run_step  # noqa: F401

from xwin_jobs.judge.cache import JudgmentCache
from xwin_jobs.records import write_records
from xwin_jobs.stages.pairs import CANDIDATES, PROGRESS, candidates_digest
from xwin_jobs.store import Store
from xwin_jobs.task import upstream_digests


def write_candidates(task, records) -> None:
    """The pairs stage's sampled candidates, complete, for the inputs as the judge step sees them."""
    store = Store()
    write_records(store, task.output + CANDIDATES, records)
    store.write_json(task.output + CANDIDATES + PROGRESS,
                     {"digest": candidates_digest(task, upstream_digests(store, task)), "complete": True})


def spent(root, stage: str) -> tuple[int, float]:
    """(requests the stage's stored judgments were asked in, re-asks included; their USD)."""
    cache = JudgmentCache(Store(), f"file://{root}/{stage}/judge/cache/").load()
    return sum(int(e.get("asks") or 0) for e in cache.entries.values()), cache.spent_usd()


def test_the_run_wide_budget_stops_the_second_judge_stage_and_keeps_what_it_paid(judge_server, tmp_path):
    pairs = pairs_task(tmp_path, judge_server.base_url)
    write_candidates(pairs, candidate_records(6, seed=3))
    assert run_step("pairs-judge", pairs, tmp_path).returncode == 0
    _, pairs_usd = spent(tmp_path, "pairs")
    assert pairs_usd > 0

    # evaluate's budget leaves a little over what pairs spent: it stops early, run-wide
    budget = round(pairs_usd + 0.1, 4)
    task = eval_task(tmp_path, judge_server.base_url, {"sft": 0.5, "dpo": 0.9}, budgetUSD=budget)
    before = judge_server.stats()["chat"]["ok"]
    first = run_step("evaluate-judge", task, tmp_path)
    assert first.returncode == 1
    assert "judge budget reached" in first.stderr and "run-wide budgetUSD" in first.stderr
    assert f"the run's other judge stages ${pairs_usd:.4f}" in first.stderr
    asked = judge_server.stats()["chat"]["ok"] - before
    stored, eval_usd = spent(tmp_path, "evaluate")
    assert 0 < asked == stored                      # every request it paid for is in the cache
    assert pairs_usd + eval_usd <= budget + 1e-9    # the run's spend stays within budgetUSD
    assert not (tmp_path / "evaluate" / "_SUCCESS.json").exists()
    assert not (tmp_path / "evaluate" / "data").exists()  # no half-written report

    # another attempt with the same budget: no stored judgment is asked again (it may ask what
    # the estimate's margin left room for), it stops the same way, the run still within budget
    second = run_step("evaluate-judge", task, tmp_path)
    assert second.returncode == 1 and "judge budget reached" in second.stderr
    stored, eval_usd = spent(tmp_path, "evaluate")
    assert judge_server.stats()["chat"]["ok"] - before == stored
    assert judge_server.stats()["paid_twice"] == [] and pairs_usd + eval_usd <= budget + 1e-9

    # a larger budget: the attempt asks only what is missing and completes
    task.params["judge"]["budgetUSD"] = 100.0
    third = run_step("evaluate-judge", task, tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    total, _ = spent(tmp_path, "evaluate")
    assert judge_server.stats()["chat"]["ok"] - before == total
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["estimatedCostUSD"] == round(spent(tmp_path, "evaluate")[1], 6)  # the stage's own


def test_an_optional_stage_cap_stops_one_stage_within_the_run_budget(judge_server, tmp_path):
    pairs = pairs_task(tmp_path, judge_server.base_url, budgetUSD=100.0, stageBudgetUSD=0.05)
    write_candidates(pairs, candidate_records(6, seed=3))
    done = run_step("pairs-judge", pairs, tmp_path)
    assert done.returncode == 1 and "stageBudgetUSD $0.0500" in done.stderr
    asked, usd = spent(tmp_path, "pairs")
    assert 0 < usd <= 0.05 and judge_server.stats()["chat"]["ok"] == asked
