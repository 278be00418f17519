"""Batch mode against the loopback server: one submission, the per-batch limit, re-ask rounds,
resuming a submitted batch after a restart (state file, or the batch's digest metadata)."""

from __future__ import annotations

import asyncio

import pytest
from judge_fixtures import judge_env, judge_server, pairwise_requests  # noqa: F401

from xwin_jobs.judge.batch import BatchJudge
from xwin_jobs.judge.cache import JudgmentCache
from xwin_jobs.judge.core import JudgeSettings
from xwin_jobs.judge.cost import Budget, price_for
from xwin_jobs.judge.runner import check_complete, judge_all
from xwin_jobs.store import Store


def settings(server, **extra) -> JudgeSettings:
    return JudgeSettings.from_params({"model": "gpt-4-0613", "baseURL": server.base_url,
                                      "mode": "batch", "pollIntervalSeconds": 0.05,
                                      "backoffBaseSeconds": 0.02, **extra})


def judge(server, folder, requests, **extra):
    return judge_all(requests, settings(server, **extra), Store(), f"file://{folder}/")


def test_one_submission_half_price_no_duplicates(judge_server, judge_env, tmp_path):
    requests = pairwise_requests(150)
    run, budget = judge(judge_server, tmp_path / "j", requests)
    check_complete(run, budget)
    stats = judge_server.stats()
    assert stats["batches_created"] == 1 and stats["batch_requests"] == 150
    assert stats["batch_paid_duplicates"] == 0 and stats["paid_twice"] == []
    entry = run.judgments[requests[0].key]
    usage = entry["usage"]
    assert entry["mode"] == "batch" and entry["costUSD"] == pytest.approx(
        price_for("gpt-4-0613").cost(usage["prompt_tokens"], usage["completion_tokens"], batch=True))
    judge(judge_server, tmp_path / "j", requests)                  # cached: nothing submitted
    assert judge_server.stats()["batches_created"] == 1


def test_the_per_batch_request_limit_splits_submissions(judge_server, judge_env, tmp_path):
    run, _ = judge(judge_server, tmp_path / "j", pairwise_requests(120), batchMaxRequests=50)
    assert len(run.judgments) == 120
    assert judge_server.stats()["batches_created"] == 3
    assert run.stats["batches_submitted"] == 3


def test_unparseable_replies_and_failed_lines_go_to_bounded_next_rounds(judge_server, judge_env, tmp_path):
    judge_server.config.batch_rate_malformed, judge_server.config.batch_rate_error = 0.2, 0.1
    run, budget = judge(judge_server, tmp_path / "j", pairwise_requests(80))
    check_complete(run, budget)
    assert all(e["status"] == "ok" for e in run.judgments.values())
    stats = judge_server.stats()
    assert 1 < stats["batches_created"] <= 6 and stats["paid_twice"] == []
    assert run.stats["reasks"] > 0 and run.stats["transient_errors"] > 0


def _start_then_stop(server, folder, requests) -> None:
    """Run the batch judge until its batch is submitted, then abandon it (a killed job)."""
    async def go():
        cache = JudgmentCache(Store(), f"file://{folder}/cache/").load()
        judge = BatchJudge(settings(server), cache, Budget(None), Store(), f"file://{folder}/batch.json")
        task = asyncio.create_task(judge.run(requests))
        while server.stats()["batches_created"] == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())


def test_a_restarted_job_polls_the_batch_it_submitted(judge_server, judge_env, tmp_path):
    judge_server.config.batch_seconds = 1.0
    requests = pairwise_requests(40)
    _start_then_stop(judge_server, tmp_path / "j", requests)
    state = Store().read_json(f"file://{tmp_path}/j/batch.json")
    assert state["batches"][0]["id"] and not state["batches"][0]["collected"]
    run, _ = judge(judge_server, tmp_path / "j", requests)
    assert len(run.judgments) == 40 and run.stats["resumed_batches"] == 1
    assert judge_server.stats()["batches_created"] == 1


def test_a_batch_whose_id_was_never_recorded_is_found_by_its_digest(judge_server, judge_env, tmp_path):
    judge_server.config.batch_seconds = 1.0
    requests = pairwise_requests(40)
    _start_then_stop(judge_server, tmp_path / "j", requests)
    Store().delete_prefix(f"file://{tmp_path}/j/batch.json")       # killed before saving the id
    run, _ = judge(judge_server, tmp_path / "j", requests)
    assert len(run.judgments) == 40 and run.stats["adopted_batches"] == 1
    assert judge_server.stats()["batches_created"] == 1


def test_batch_budget_submits_only_what_fits(judge_server, judge_env, tmp_path):
    requests = pairwise_requests(40)
    run, budget = judge(judge_server, tmp_path / "j", requests, budgetUSD=0.2)
    assert run.budget_stopped and 0 < len(run.judgments) < 40 and budget.spent_usd <= 0.2
    assert judge_server.stats()["batch_requests"] == len(run.judgments)
