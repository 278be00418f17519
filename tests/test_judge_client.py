"""The online judge against the fault-injecting loopback server: retries, re-asks, cache,
budget, rate limits, timeouts, refused credentials."""

from __future__ import annotations

import asyncio
import time

import pytest
from judge_fixtures import FAKE_KEY, judge_env, judge_server, pairwise_requests  # noqa: F401

from xwin_jobs.judge.cache import JudgmentCache
from xwin_jobs.judge.client import OnlineJudge
from xwin_jobs.judge.core import JudgeError, JudgeSettings
from xwin_jobs.judge.cost import Budget, BudgetExceeded
from xwin_jobs.judge.runner import check_complete, judge_all
from xwin_jobs.judge.templates import extract_payload
from xwin_jobs.store import Store


def settings(server, **extra) -> JudgeSettings:
    return JudgeSettings.from_params({"model": "gpt-4-0613", "baseURL": server.base_url,
                                      "maxConcurrency": 8, "backoffBaseSeconds": 0.02, **extra})


def judge(server, folder, requests, **extra):
    return judge_all(requests, settings(server, **extra), Store(), f"file://{folder}/")


def right_winner(request) -> str:
    payload = extract_payload(request.messages)
    return "B" if payload["answer_a"].startswith("It is 10") else "A"


def test_every_request_judged_through_faults_each_paid_once_and_cached(judge_server, judge_env, tmp_path):
    c = judge_server.config
    c.rate_429, c.retry_after_s, c.rate_5xx, c.rate_malformed, c.rate_garbage_body = 0.1, 0.05, 0.1, 0.1, 0.05
    c.latency_s, c.latency_jitter_s = 0.002, 0.01
    requests = pairwise_requests(60)
    run, budget = judge(judge_server, tmp_path / "judge", requests)
    check_complete(run, budget)
    assert len(run.judgments) == 60 and not run.failed
    assert {r.key: run.judgments[r.key]["verdict"]["winner"] for r in requests} == \
           {r.key: right_winner(r) for r in requests}
    stats = judge_server.stats()
    assert stats["chat"]["injected_429"] and stats["chat"]["injected_5xx"] and stats["chat"]["malformed"]
    assert stats["first_time"] == 60 and stats["paid_twice"] == []
    assert run.stats["retries"] > 0 and run.stats["reasks"] > 0
    assert budget.spent_usd == pytest.approx(sum(e["costUSD"] for e in run.judgments.values()))

    served = stats["chat"]["requests"]
    again, _ = judge(judge_server, tmp_path / "judge", requests)
    assert judge_server.stats()["chat"]["requests"] == served      # a re-run asks nothing
    assert again.stats["cached"] == 60 and again.judgments == run.judgments


def test_unparseable_after_bounded_reasks_is_recorded_and_not_asked_again(judge_server, judge_env, tmp_path):
    judge_server.config.rate_malformed = 1.0
    requests = pairwise_requests(5)
    run, _ = judge(judge_server, tmp_path / "j", requests, maxReasks=2)
    assert judge_server.stats()["chat"]["malformed"] == 15          # 1 + 2 re-asks each
    assert all(e["status"] == "unparseable" and e["asks"] == 3 and e["problem"] for e in run.judgments.values())
    judge(judge_server, tmp_path / "j", requests, maxReasks=2)
    assert judge_server.stats()["chat"]["requests"] == 15
    judge_server.config.rate_malformed = 0.0                        # more re-asks allowed: continued
    more, _ = judge(judge_server, tmp_path / "j", requests, maxReasks=3)
    assert judge_server.stats()["chat"]["requests"] == 20
    assert all(e["status"] == "ok" and e["asks"] == 4 for e in more.judgments.values())


def test_timeouts_are_retried_and_abandoned_requests_are_not_delivered(judge_server, judge_env, tmp_path):
    judge_server.config.rate_timeout, judge_server.config.hang_s = 0.3, 5.0
    requests = pairwise_requests(12)
    started = time.monotonic()
    run, _ = judge(judge_server, tmp_path / "j", requests, requestTimeoutSeconds=0.3)
    assert len(run.judgments) == 12 and run.stats["retries"] >= 1
    assert time.monotonic() - started < 5.0
    stats = judge_server.stats()
    assert stats["chat"]["injected_timeouts"] >= 1 and stats["paid_twice"] == []


def test_client_rate_limit_sustains_the_server_limit_without_failures(judge_server, judge_env, tmp_path):
    # the server allows 15 requests per 1-second window (900/min); the client paces at that
    judge_server.config.requests_per_window, judge_server.config.window_s = 15, 1.0
    judge_server.config.latency_s, judge_server.config.latency_jitter_s = 0.05, 0.1
    requests = pairwise_requests(50)
    run, _ = judge(judge_server, tmp_path / "j", requests, requestsPerMinute=900, maxConcurrency=16)
    assert len(run.judgments) == 50 and not run.failed
    stats = judge_server.stats()
    admitted = judge_server.counters.accepted_at
    rate_per_min = (len(admitted) - 1) / (admitted[-1] - admitted[0]) * 60
    assert rate_per_min >= 0.9 * 900
    # event-loop stalls on a busy machine can bunch two starts: a few 429s, retried, no failure
    assert stats["chat"].get("rate_limited", 0) <= len(requests) // 5


def test_server_429s_pause_every_worker_for_retry_after(judge_server, judge_env, tmp_path):
    judge_server.config.requests_per_window, judge_server.config.window_s = 10, 0.5
    run, _ = judge(judge_server, tmp_path / "j", pairwise_requests(30), maxConcurrency=16)
    stats = judge_server.stats()
    assert len(run.judgments) == 30 and stats["chat"]["rate_limited"] >= 1
    assert run.stats["rate_limited"] == stats["chat"]["rate_limited"]
    assert stats["chat"]["rate_limited"] < 60     # paused, not hammering


def test_budget_stop_says_how_far_it_got_and_a_rerun_continues(judge_server, judge_env, tmp_path):
    requests = pairwise_requests(30)
    run, budget = judge(judge_server, tmp_path / "j", requests, budgetUSD=0.15)
    assert run.budget_stopped and 0 < len(run.judgments) < 30
    assert budget.spent_usd <= 0.15
    with pytest.raises(BudgetExceeded, match=rf"{len(run.judgments)} of 30 judgments done"):
        check_complete(run, budget)
    first = judge_server.stats()["chat"]["ok"]
    assert first == len(run.judgments)
    rest, budget2 = judge(judge_server, tmp_path / "j", requests, budgetUSD=10.0)
    check_complete(rest, budget2)
    stats = judge_server.stats()
    assert stats["chat"]["ok"] == 30 and stats["paid_twice"] == []
    assert rest.stats["cached"] == first


def test_refused_key_stops_at_once_without_leaking_it(judge_server, monkeypatch, tmp_path):
    judge_server.config.echo_key_in_errors = True
    wrong = "sk-wrong-key-0123456789abcdef-LEAKCHECK"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    with pytest.raises(JudgeError) as err:
        judge(judge_server, tmp_path / "j", pairwise_requests(20))
    assert "401" in str(err.value) and wrong not in str(err.value) and wrong[4:20] not in str(err.value)
    assert judge_server.stats()["http"]["POST /v1/chat/completions 401"] <= 8


def test_missing_key_is_a_clear_error(judge_server, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY is not set"):
        judge(judge_server, tmp_path / "j", pairwise_requests(2))


def test_online_judge_direct_use_with_an_injected_client(judge_server, judge_env, tmp_path):
    from openai import AsyncOpenAI

    async def go():
        client = AsyncOpenAI(api_key=FAKE_KEY, base_url=judge_server.base_url, max_retries=0)
        try:
            cache = JudgmentCache(Store(), f"file://{tmp_path}/c/").load()
            return await OnlineJudge(settings(judge_server), cache, Budget(None), client=client).run(pairwise_requests(3))
        finally:
            await client.close()

    assert len(asyncio.run(go()).judgments) == 3


def test_judgments_are_cached_in_s3_too(judge_server, judge_env, s3_server, s3_bucket):
    store = Store(endpoint_url=s3_server.endpoint_url)
    requests = pairwise_requests(6)
    folder = f"{s3_bucket}/runs/pairs/judge/"
    run, _ = judge_all(requests, settings(judge_server), store, folder)
    assert len(run.judgments) == 6
    files = store.list_files(folder)
    assert any("/cache/shards/" in f for f in files) and not any("/cache/items/" in f for f in files)
    cache = JudgmentCache(store, folder + "cache/").load()
    assert {k: cache.get(k)["verdict"] for k in run.judgments} == \
           {k: e["verdict"] for k, e in run.judgments.items()}
    cache.put({**cache.get(requests[0].key), "status": "ok"})     # one object per judgment on S3
    assert any("/cache/items/" in f for f in store.list_files(folder))
    assert JudgmentCache(store, folder + "cache/").load().get(requests[0].key)["rev"] == cache.get(requests[0].key)["rev"]
    served = judge_server.stats()["chat"]["requests"]
    judge_all(requests, settings(judge_server), store, folder)
    assert judge_server.stats()["chat"]["requests"] == served
