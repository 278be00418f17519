"""Reward scoring: length-grouped batches (xwin_jobs.scoring) vs fixed-size batches in file order.

    python benchmarks/bench_scoring.py [--responses 2048] [--batch 32] [--no-results]

The tiny reward model (the tiny Llama of examples/tiny_model.py with a num_labels=1 head)
scores the same (prompt, response) set twice per round, both arms with `batch` rows per batch
at most, so the only difference is which sequences share a batch:
- grouped: `RewardScorer.score(items)`: sorted by length, `batch` rows (and a token budget
  of batch x the longest sequence, i.e. no budget cut) per batch;
- file order: `RewardScorer.score(items, grouped=False, batch_size=batch)`.
Response lengths follow what a best-of-N set looks like: most answers short, a long tail up
to max_tokens (log-uniform 4..400 words). Tokenization is part of both arms. Rounds
alternate the arms; the best of `repeats` rounds is reported. Scores of the two arms are
asserted equal (atol 1e-4). With no --no-results, the `## Scoring` section of
benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Scoring"
WORDS = ["2", "plus", "3", "is", "5", "the", "answer", "sum", "of", "and", "no", "idea", "7"]


def build_reward_model(out: Path) -> Path:
    import torch

    from xwin_jobs.modeling import load_reward_model, load_tokenizer, save_model

    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "examples" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.build_tiny_model(out / "base", [" ".join(WORDS), "USER: what is 2 plus 3? ASSISTANT: 5"])
    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(0)
    return save_model(load_reward_model(str(base), tokenizer.pad_token_id), tokenizer, out / "rm")


def make_items(count: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    items = []
    for i in range(count):
        words = int(math.exp(rng.uniform(math.log(4), math.log(400))))
        prompt = [{"role": "user", "content": f"what is {i % 10} plus {rng.randint(0, 9)}?"}]
        items.append((prompt, " ".join(rng.choice(WORDS) for _ in range(words))))
    return items


def main(responses: int = 2048, batch: int = 32, repeats: int = 3) -> dict:
    import torch

    from xwin_jobs.scoring import RewardScorer, encode_items

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        rm = build_reward_model(Path(tmp))
        items = make_items(responses)
        probe = RewardScorer(str(rm), "vicuna")
        lengths = [len(x) for x in encode_items(items, "vicuna", probe.tokenizer, probe.max_length)[0]]
        budget = batch * max(lengths)
        scorer = RewardScorer(str(rm), "vicuna", token_budget=budget)

        def grouped():
            return scorer.score(items, max_rows=batch)

        def file_order():
            return scorer.score(items, grouped=False, batch_size=batch)

        scorer.score(items[:64])  # warm-up
        times = {"grouped": [], "file": []}
        outputs = {}
        for _ in range(repeats):
            for name, fn in (("grouped", grouped), ("file", file_order)):
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    (g_scores, g_stats), (f_scores, f_stats) = outputs["grouped"], outputs["file"]
    diff = float(np.max(np.abs(np.asarray(g_scores, float) - np.asarray(f_scores, float))))
    assert diff < 1e-4, f"scores differ by {diff}"
    best = {k: min(v) for k, v in times.items()}
    return {"responses": responses, "batch": batch, "repeats": repeats, "max_abs_diff": diff,
            "lengths": (min(lengths), int(np.median(lengths)), max(lengths)),
            "best": best, "times": times, "ratio": best["file"] / best["grouped"],
            "tokens": g_stats.tokens, "padded": {"grouped": g_stats.padded_tokens,
                                                 "file": f_stats.padded_tokens}}


def table(r: dict) -> str:
    ok = "yes" if r["ratio"] >= 2 else "NO"
    rows = [
        "| batches | best of runs (s) | all runs (s) | padded tokens | ratio |",
        "| --- | ---: | --- | ---: | --- |",
        f"| length-grouped (xwin_jobs.scoring) | {r['best']['grouped']:.2f} | "
        + ", ".join(f"{t:.2f}" for t in r["times"]["grouped"])
        + f" | {r['padded']['grouped']:,} | 1.00 |",
        f"| fixed size, file order | {r['best']['file']:.2f} | "
        + ", ".join(f"{t:.2f}" for t in r["times"]["file"])
        + f" | {r['padded']['file']:,} | grouped is {r['ratio']:.1f}x faster (goal >= 2x: {ok}) |",
    ]
    return "\n".join(rows)


def write_section(r: dict) -> None:
    import torch

    lo, med, hi = r["lengths"]
    body = "\n".join([
        SECTION, "",
        f"`python benchmarks/bench_scoring.py --responses {r['responses']} --batch {r['batch']}` "
        f"on {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{_dt.date.today().isoformat()}. The tiny reward model (2-layer Llama, hidden 128, "
        f"num_labels=1) scores {r['responses']:,} (prompt, response) pairs of {lo}-{hi} tokens "
        f"(median {med}; log-uniform response lengths, like a best-of-N set), at most "
        f"{r['batch']} rows a batch in both arms; arms alternate, {r['repeats']} rounds, "
        "tokenization included.",
        "", table(r), "",
        f"Same scores: the largest difference between the two arms is {r['max_abs_diff']:.1e} "
        f"(tolerance 1e-4). Real tokens: {r['tokens']:,}.", "",
    ])
    from results_md import replace_section

    replace_section(SECTION, body, RESULTS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    res = main(args.responses, args.batch, args.repeats)
    print(table(res))
    if not args.no_results:
        write_section(res)
        print(f"updated {RESULTS}")
