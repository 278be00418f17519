"""Judge benchmarks against the fault-injecting loopback judge server (examples/judge_server.py).

    python benchmarks/bench_judge.py [--rpm 600 --window 10 --seconds 60] [--comparisons 10000]
                                     [--no-results]

1. Online: the server admits at most R requests per window (R/min scaled to the window,
   answering 429 + Retry-After beyond it) and injects latency, 5xx, 429s and malformed
   verdicts. The online judge, paced at requestsPerMinute = R, judges enough requests to run
   for --seconds. Reported: requests the server admitted per minute (goal: >= 90% of R),
   judgments per minute, and comparisons failing after every retry (goal: <= 1%).
2. Batch: the pairs stage's judging step (in this process) over --comparisons comparisons
   (both orders each), judge.mode batch. Reported: batch submissions (goal: one, under the
   Batch API's 50,000-request limit), requests the server processed, identical requests paid
   twice (goal: 0), wall time; then a re-run, which must submit nothing.

With no --no-results, the `## Judge` section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "examples" / "tiny"), str(ROOT / "tests")]

RESULTS = HERE / "RESULTS.md"
SECTION = "## Judge"
KEY = "sk-bench-judge"


def online(rpm: int, window: float, seconds: float) -> dict:
    from judge_fixtures import pairwise_requests
    from judge_server import JudgeServer, ServerConfig

    from xwin_jobs.judge.core import JudgeSettings
    from xwin_jobs.judge.runner import judge_all
    from xwin_jobs.store import Store

    os.environ["OPENAI_API_KEY"] = KEY
    per_window = max(1, round(rpm * window / 60))
    config = ServerConfig(api_key=KEY, requests_per_window=per_window, window_s=window,
                          latency_s=0.05, latency_jitter_s=0.1, rate_5xx=0.02, rate_429=0.01,
                          retry_after_s=1.0, rate_malformed=0.02)
    n = int(rpm * seconds / 60)
    requests = pairwise_requests(n, seed=7)
    settings = JudgeSettings.from_params({"model": "gpt-4-0613", "maxConcurrency": 32,
                                          "requestsPerMinute": rpm, "backoffBaseSeconds": 0.5})
    with JudgeServer(config) as server, tempfile.TemporaryDirectory() as tmp:
        settings = JudgeSettings(**{**settings.__dict__, "base_url": server.base_url})
        started = time.monotonic()
        run, _ = judge_all(requests, settings, Store(), f"file://{tmp}/judge/")
        wall = time.monotonic() - started
        stats = server.stats()
        accepted = server.counters.accepted_at
    span = accepted[-1] - accepted[0]
    return {"rpm": rpm, "window": window, "per_window": per_window, "requests": n,
            "wall": wall, "accepted": len(accepted), "accepted_per_min": (len(accepted) - 1) / span * 60,
            "judged_per_min": len(run.judgments) / wall * 60, "judged": len(run.judgments),
            "failed": len(run.failed), "window_429": stats["chat"].get("rate_limited", 0),
            "injected": {k: stats["chat"].get(k, 0) for k in ("injected_5xx", "injected_429", "malformed")},
            "paid_twice": len(stats["paid_twice"])}


def batch(comparisons: int) -> dict:
    import synthetic
    from judge_fixtures import pairs_task, write_candidates
    from judge_server import JudgeServer, ServerConfig

    from xwin_jobs.stages import run_stage
    from xwin_jobs.store import Store

    k = 4
    prompts = -(-comparisons // (k * (k - 1) // 2))
    rng = random.Random(3)
    records = []
    for i in range(prompts):
        p = synthetic.prompt(rng, i, "pp")
        texts = [synthetic.right_answer(p["messages"])] + [f"It is {100 * i + j}." for j in range(k - 1)]
        records.append({"id": p["id"], "prompt": p["messages"],
                        "responses": [{"content": t, "finish_reason": "stop"} for t in texts]})
    with JudgeServer(ServerConfig(api_key=KEY, batch_seconds=1.0)) as server, \
            tempfile.TemporaryDirectory() as tmp:
        task = pairs_task(Path(tmp), server.base_url, mode="batch", pollIntervalSeconds=0.5)
        write_candidates(task, records)
        started = time.monotonic()
        marker = run_stage(task, Store())
        wall = time.monotonic() - started
        first = server.stats()
        Store().delete_prefix(task.output + "_SUCCESS.json")   # re-run the step: all cached
        started = time.monotonic()
        run_stage(task, Store())
        rerun = time.monotonic() - started
        second = server.stats()
    return {"comparisons": marker["metrics"]["comparisons"], "requests": marker["metrics"]["judgeRequests"],
            "batches": first["batches_created"], "processed": first["batch_requests"],
            "duplicates": first["batch_paid_duplicates"], "paid_twice": len(first["paid_twice"]),
            "pairs": marker["metrics"]["pairs"], "wall": wall, "rerun": rerun,
            "rerun_batches": second["batches_created"] - first["batches_created"],
            "cost": marker["metrics"]["estimatedCostUSD"]}


def markdown(o: dict, b: dict, seconds: float) -> str:
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    failed_pct = 100 * o["failed"] / max(1, o["requests"])
    return "\n".join([
        SECTION, "",
        f"`python benchmarks/bench_judge.py --rpm {o['rpm']} --window {o['window']:g} --seconds "
        f"{seconds:g} --comparisons {b['comparisons']}` on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {_dt.date.today().isoformat()}; the judge is "
        "examples/judge_server.py on loopback (the tiny task's exact grader).", "",
        f"Online: the server admits {o['per_window']} requests per {o['window']:g}-second window "
        f"(R = {o['rpm']}/min) and injects 50-150 ms latency, 2% 5xx, 1% 429 (Retry-After 1 s) "
        f"and 2% malformed verdicts; {o['requests']} judge requests, maxConcurrency 32, "
        f"requestsPerMinute {o['rpm']}.", "",
        "| online | value | goal |", "| --- | ---: | --- |",
        f"| requests admitted by the server per minute | {o['accepted_per_min']:.0f} "
        f"({100 * o['accepted_per_min'] / o['rpm']:.1f}% of R) | >= 90% of R: "
        f"{yes(o['accepted_per_min'] >= 0.9 * o['rpm'])} |",
        f"| judgments completed per minute (wall clock) | {o['judged_per_min']:.0f} | |",
        f"| failed after every retry | {o['failed']} of {o['requests']} ({failed_pct:.2f}%) | "
        f"<= 1%: {yes(failed_pct <= 1)} |",
        f"| 429s from the window limit / injected 5xx, 429, malformed | {o['window_429']} / "
        f"{o['injected']['injected_5xx']}, {o['injected']['injected_429']}, {o['injected']['malformed']} | |",
        f"| valid verdicts paid twice | {o['paid_twice']} | 0: {yes(o['paid_twice'] == 0)} |",
        f"| wall time | {o['wall']:.1f} s | |", "",
        f"Batch: the pairs judging step over {b['comparisons']:,} comparisons "
        f"({b['requests']:,} requests, both orders), judge.mode batch.", "",
        "| batch | value | goal |", "| --- | ---: | --- |",
        f"| batch submissions | {b['batches']} | one (limit 50,000 requests per batch): "
        f"{yes(b['batches'] == 1)} |",
        f"| requests processed by the server | {b['processed']:,} | = requests: "
        f"{yes(b['processed'] == b['requests'])} |",
        f"| identical requests paid twice / comparisons paid twice | {b['duplicates']} / "
        f"{b['paid_twice']} | 0: {yes(b['duplicates'] == 0 and b['paid_twice'] == 0)} |",
        f"| pairs written | {b['pairs']:,} | |",
        f"| wall time (1 s batch turnaround, 0.5 s polls) | {b['wall']:.1f} s | |",
        f"| re-run: submissions / wall time | {b['rerun_batches']} / {b['rerun']:.1f} s | 0 |",
        f"| estimated cost at gpt-4-0613 batch prices | ${b['cost']:.2f} | |", ""])


def write_section(body: str, path: Path = RESULTS) -> None:
    from results_md import replace_section

    replace_section(SECTION, body, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--comparisons", type=int, default=10_000)
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    o = online(a.rpm, a.window, a.seconds)
    print(o)
    b = batch(a.comparisons)
    print(b)
    body = markdown(o, b, a.seconds)
    print(body)
    if not a.no_results:
        write_section(body)
        print(f"updated {RESULTS}")
    ok = o["accepted_per_min"] >= 0.9 * o["rpm"] and o["failed"] <= 0.01 * o["requests"] \
        and b["batches"] == 1 and b["duplicates"] == 0 and b["paid_twice"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
