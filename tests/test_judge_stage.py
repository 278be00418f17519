"""The pairs and evaluate stages' judging steps, run as `python -m xwin_jobs <step>` processes
(as pods run them) against the loopback judge server: pair records, disagreement modes,
kill -9 and resume (online and batch), the API key never leaking, the evaluate report."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from judge_fixtures import (FAKE_KEY, JUDGE_MODEL, ROOT, candidate_records, comparison_key,  # noqa: F401
                            eval_task, job_env, judge_server, pairs_task, run_step, step_command,
                            synthetic, write_candidates)

from xwin_jobs.judge.cache import JudgmentCache
from xwin_jobs.judge.core import is_final
from xwin_jobs.records import read_records
from xwin_jobs.stages.pairs import plan_comparisons
from xwin_jobs.store import Store


def pair_data(root: Path, folder: str = "data") -> list[dict]:
    uri = f"file://{root}/pairs/{folder}/"
    return sorted(read_records(Store(), uri, "pair"), key=lambda r: r["id"]) \
        if Store().list_files(uri) else []


def test_pairs_judge_step_writes_judged_pairs(judge_server, tmp_path):
    task = pairs_task(tmp_path, judge_server.base_url)
    records = candidate_records(24, seed=3)
    write_candidates(task, records)
    done = run_step("pairs-judge", task, tmp_path)
    assert done.returncode == 0, done.stderr
    pairs, ties = pair_data(tmp_path), pair_data(tmp_path, "ties")
    assert pairs and ties
    for p in pairs:   # the judge (the exact grader) preferred the better answer, in both orders
        assert synthetic.grade(p["prompt"], p["chosen"][0]["content"]) > \
               synthetic.grade(p["prompt"], p["rejected"][0]["content"])
        j = p["judge"]
        assert (j["model"], j["template"], j["outcome"]) == (JUDGE_MODEL, "pairwise-v1", j["outcome"])
        assert [v["status"] for v in j["verdicts"]] == ["ok", "ok"] and p["chosen_score"] == 1.0
    assert any(len(p["prompt"]) == 3 for p in pairs)             # multi-turn prompts kept whole
    for t in ties:
        assert synthetic.grade(t["prompt"], t["chosen"][0]["content"]) == \
               synthetic.grade(t["prompt"], t["rejected"][0]["content"])
    metrics = json.loads((tmp_path / "pairs" / "metrics.json").read_text())
    assert metrics["pairs"] == len(pairs) and metrics["ties"] == len(ties)
    assert metrics["comparisons"] == len(pairs) + len(ties) and metrics["judgeModel"] == JUDGE_MODEL
    assert (tmp_path / "pairs" / "_SUCCESS.json").exists()
    served = judge_server.stats()["chat"]["requests"]
    again = run_step("pairs-judge", task, tmp_path)
    assert again.returncode == 0 and "already done" in again.stderr
    assert judge_server.stats()["chat"]["requests"] == served


@pytest.mark.parametrize("mode", ["tie", "drop"])
def test_disagreeing_orders_become_ties_or_are_dropped(judge_server, tmp_path, mode):
    judge_server.config.rate_position_bias = 0.3
    task = pairs_task(tmp_path, judge_server.base_url, disagreement=mode)
    write_candidates(task, candidate_records(24, seed=3))
    assert run_step("pairs-judge", task, tmp_path).returncode == 0
    m = json.loads((tmp_path / "pairs" / "metrics.json").read_text())
    assert m["disagreements"] > 0 and m["disagreement"] == mode
    ties = pair_data(tmp_path, "ties")
    disagree_ties = [t for t in ties if t["judge"]["outcome"] == "disagree"]
    if mode == "tie":
        assert len(disagree_ties) == m["disagreements"] and m["dropped"] == 0
    else:
        assert not disagree_ties and m["dropped"] == m["disagreements"]
    assert m["pairs"] + m["ties"] + m["dropped"] + m["unparseable"] == m["comparisons"]


def _server_to_cache_keys(root: Path) -> dict[str, str]:
    records = read_records(Store(), f"file://{root}/pairs/candidates/", "scored")
    comparisons, _ = plan_comparisons(records, JUDGE_MODEL)
    return {comparison_key(r.messages, JUDGE_MODEL): r.key for c in comparisons for r in (c.forward, c.backward)}


def _kill_and_resume(root: Path, seed: int, progressed):
    """Run the judging step and SIGKILL it three times: once at a random moment after its
    start (any phase), twice at a random moment after `progressed()` turned true in that run
    (mid-judging); then let it finish. Returns [(kill time, cache keys stored then, batch
    state saved?, start time of the next run)]; "stored" = final judgments (an unparseable reply
    with re-asks left is stored too, and rightly continued by the next run)."""
    task_file = root / "task.json"
    cmd = step_command("pairs-judge", task_file)
    rng = random.Random(seed)
    snapshots = []
    for attempt in range(3):
        proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        if attempt == 0:
            time.sleep(rng.uniform(0.3, 1.5))
        else:
            check = progressed()
            deadline = time.monotonic() + 60
            while not check() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        proc.wait()
        cache = JudgmentCache(Store(), f"file://{root}/pairs/judge/cache/").load()
        stored = {k for k, e in cache.entries.items() if is_final(e, max_reasks=2)}
        submitted = (root / "pairs" / "judge" / "batch.json").exists()
        snapshots.append((killed_at, stored, submitted, time.time()))   # the next run starts after
    done = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return snapshots


def _more_delivered(server):
    """A predicate, made now: has the server delivered a verdict since?"""
    before = server.stats()["delivered"]
    return lambda: server.stats()["delivered"] > before


def test_kill9_online_then_resume_gives_the_same_pairs_and_pays_nothing_stored_twice(judge_server, tmp_path):
    c = judge_server.config
    c.latency_s, c.latency_jitter_s, c.rate_malformed, c.rate_5xx = 0.01, 0.02, 0.05, 0.05
    records = candidate_records(40, seed=5)
    baseline = tmp_path / "baseline"
    write_candidates(pairs_task(baseline, judge_server.base_url), records)
    assert run_step("pairs-judge", pairs_task(baseline, judge_server.base_url), baseline).returncode == 0
    judge_server.reset()

    root = tmp_path / "killed"
    task = pairs_task(root, judge_server.base_url)
    write_candidates(task, records)
    (root / "task.json").write_text(task.to_json())
    snapshots = _kill_and_resume(root, 11, lambda: _more_delivered(judge_server))

    assert pair_data(root) == pair_data(baseline) and pair_data(root, "ties") == pair_data(baseline, "ties")
    stats = judge_server.stats()
    times = judge_server.counters.valid_times
    to_cache = _server_to_cache_keys(root)
    assert stats["first_time"] == len(set(to_cache.values()))
    # a judgment stored before a kill is never asked again
    assert any(0 < len(stored) < len(set(to_cache.values())) for _, stored, _, _ in snapshots)
    # a judgment stored before a kill is never asked again by a later run
    for _, stored, _, next_start in snapshots:
        for server_key, cache_key in to_cache.items():
            if cache_key in stored:
                assert all(t < next_start for t in times.get(server_key, [])), cache_key
    # the only repeats are replies that were on their way at the instant of a kill
    for server_key in stats["paid_twice"]:
        first = times[server_key][0]
        assert any(-0.05 <= killed_at - first <= 0.5 for killed_at, _, _, _ in snapshots)
    assert stats["repeated"] <= 3 * 8


def test_kill9_batch_then_resume_submits_once_and_pays_nothing_twice(judge_server, tmp_path):
    judge_server.config.batch_seconds = 1.0
    records = candidate_records(30, seed=6)
    baseline = tmp_path / "baseline"
    write_candidates(pairs_task(baseline, judge_server.base_url), records)
    assert run_step("pairs-judge", pairs_task(baseline, judge_server.base_url), baseline).returncode == 0
    judge_server.reset()

    root = tmp_path / "killed"
    task = pairs_task(root, judge_server.base_url, mode="batch")
    write_candidates(task, records)
    (root / "task.json").write_text(task.to_json())
    snapshots = _kill_and_resume(root, 12, lambda: lambda: judge_server.stats()["batches_created"] > 0)
    assert any(submitted for _, _, submitted, _ in snapshots)     # killed while a batch was out
    assert pair_data(root) == pair_data(baseline)
    stats = judge_server.stats()
    assert stats["batches_created"] == 1 and stats["paid_twice"] == []
    assert stats["batch_paid_duplicates"] == 0 and stats["chat"].get("requests", 0) == 0


def _all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_the_api_key_appears_in_no_log_artifact_metrics_or_error(judge_server, tmp_path):
    task = pairs_task(tmp_path, judge_server.base_url)
    write_candidates(task, candidate_records(6))
    ok = run_step("pairs-judge", task, tmp_path, log_level="DEBUG")
    assert ok.returncode == 0, ok.stderr
    assert FAKE_KEY not in ok.stdout + ok.stderr
    assert "DEBUG" in ok.stderr                             # the debug log was on
    # a server that repeats the key it was sent in its errors; the stage must not pass it on
    judge_server.config.api_key, judge_server.config.echo_key_in_errors = "sk-another-key", True
    other = tmp_path / "other"
    task2 = pairs_task(other, judge_server.base_url)
    write_candidates(task2, candidate_records(6))
    failed = run_step("pairs-judge", task2, other, log_level="DEBUG")
    assert failed.returncode == 1 and "401" in failed.stderr and "Traceback" not in failed.stderr
    assert FAKE_KEY not in failed.stdout + failed.stderr and FAKE_KEY[3:20] not in failed.stderr
    for folder in (tmp_path, other):
        text = _all_text(folder)
        assert FAKE_KEY not in text and FAKE_KEY[8:24] not in text
    assert "metrics.json" in {p.name for p in tmp_path.rglob("*")}


def test_evaluate_judge_step_writes_report_table_and_plots(judge_server, tmp_path):
    task = eval_task(tmp_path, judge_server.base_url, {"good": 0.9, "bad": 0.1})
    done = run_step("evaluate-judge", task, tmp_path)
    assert done.returncode == 0, done.stderr
    data = tmp_path / "evaluate" / "data"
    report = json.loads((data / "report.json").read_text())
    good, bad = report["models"]["good"], report["models"]["bad"]
    assert good["alpacaEval"]["winRate"] > bad["alpacaEval"]["winRate"]
    assert good["alpacaEval"]["judged"] == 8 and good["mtBench"]["graded"] == 8
    assert good["mtBench"]["mean"] > bad["mtBench"]["mean"]
    table = (data / "report.md").read_text()
    # the paper's table (figures with intervals), then the counts behind them
    assert table.count("\n| good |") == 2 and table.count("\n| bad |") == 2
    assert good["alpacaEval"]["ci"][0] <= good["alpacaEval"]["winRate"] <= good["alpacaEval"]["ci"][1]
    assert report["table"][0]["model"] == "good" and "gradeCI" in report["table"][0]
    for png in ("pipeline.png", "mtbench.png"):
        assert (data / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["good.alpacaWinRate"] == good["alpacaEval"]["winRate"]
    assert len(list(data.glob("details-*.jsonl"))) == 1
    # its own cost (no upstream marker here): the judge's USD, in report.json and report.md
    assert report["cost"]["stages"]["evaluate"]["judgeUSD"] == report["judge"]["estimatedCostUSD"]
    assert report["cost"]["total"]["judgeUSD"] == report["judge"]["estimatedCostUSD"]
    assert "## Cost" in table and "| **total** |" in table
