"""DPO step on a GPU with a 32k+ vocabulary: the chunked labelled-positions head vs full logits.

    python benchmarks/bench_train_gpu.py [--vocab 32000] [--pairs 64] [--steps 5] [--no-results]
    python benchmarks/bench_train_gpu.py --device cpu --small      # a smoke run of the arms

Skipped (exit 0, a message) without CUDA. A random Llama (hidden 1024, 8 layers, bf16
autocast, fp32 weights) takes DPO forward+backward passes over the same long-tailed pairs
(prompts 32-512 tokens, responses 16-1024) in three arms, micro-batches of 4 pairs:
- full: right-padded batches, `model(...).logits` over every position, fp32 log-softmax over
  the whole vocabulary (what the stages did before; what TRL does);
- chunked: the same padded batches, hidden states only, the LM head on labelled positions in
  chunks of 1024 with each chunk recomputed in backward (xwin_jobs.training.packing);
- chunked+packed: the same, sequences packed padding-free (the training default).
Reports real tokens/s and peak CUDA memory (torch.cuda.max_memory_allocated) per arm, and
writes the `## Training on GPU` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reference.py: the padded DPO baseline
HERE = Path(__file__).resolve().parent
SECTION = "## Training on GPU"


def make_pairs(n: int, vocab: int, seed: int = 0):
    from xwin_jobs.training.data import PairExample, SftExample

    rng = random.Random(seed)

    def tail(lo, hi):
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    def seq(prompt, length):
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        return SftExample(ids, [-100] * prompt + ids[prompt:])

    out = []
    for _ in range(n):
        p = tail(32, 512)
        out.append(PairExample(seq(p, p + tail(16, 1024)), seq(p, p + tail(16, 1024))))
    return out


def build_model(vocab: int, small: bool, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if small \
        else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, num_key_value_heads=4,
                         attn_implementation="sdpa", **size)
    return LlamaForCausalLM(config).to(device)


def run_arm(engine, pairs, arm: str, steps: int, micro: int = 4) -> dict:
    import torch

    from reference import collate_pairs, sequence_logprobs
    from xwin_jobs.losses import dpo_sigmoid_loss
    from xwin_jobs.training.config import TrainingConfig
    from xwin_jobs.training.objectives import DpoObjective

    reference = torch.zeros(len(pairs), 2)
    packed = arm == "chunked+packed"
    objective = DpoObjective(pairs, 0, TrainingConfig(), beta=0.1)
    objective.reference = reference

    def full(indices):
        batch = engine.to_device(collate_pairs([pairs[i] for i in indices], 0))
        logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
        logps = sequence_logprobs(logits, batch["labels"])
        n = len(indices)
        ref = reference[indices].to(logps.device)
        return dpo_sigmoid_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], 0.1)[0]

    batches = [list(range(k, min(k + micro, len(pairs)))) for k in range(0, len(pairs), micro)]
    real = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = None
    for s in range(steps + 1):  # the first pass warms up
        if s == 1:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        for b in batches:
            with engine.autocast():
                loss = full(b) if arm == "full" else objective.micro_step(engine, b, packed)[0]
            loss.backward()
        engine.module.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"arm": arm, "tokens_per_s": real * steps / seconds, "peak_gib": peak, "seconds": seconds}


def main(vocab: int, n: int, steps: int, device: str, small: bool) -> dict | None:
    import torch

    from xwin_jobs.training.config import TrainingConfig
    from xwin_jobs.training.engine import DdpEngine

    if device == "cuda" and not torch.cuda.is_available():
        print("bench_train_gpu: skipped, no CUDA device here (run it where a GPU is lent)")
        return None
    pairs = make_pairs(n, vocab)
    results = []
    for arm in ("full", "chunked", "chunked+packed"):
        model = build_model(vocab, small, device)
        engine = DdpEngine(model, TrainingConfig(), total_steps=1, device=device)
        try:
            results.append(run_arm(engine, pairs, arm, steps))
        except torch.OutOfMemoryError:
            results.append({"arm": arm, "tokens_per_s": float("nan"), "peak_gib": float("inf"), "seconds": 0})
        print(results[-1], flush=True)
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"vocab": vocab, "pairs": n, "steps": steps, "device": device,
            "name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}


def write_section(r: dict) -> None:
    from results_md import replace_section

    full = r["results"][0]
    rows = ["| arm | real tokens/s | peak memory (GiB) | vs full logits |", "| --- | ---: | ---: | --- |"]
    for a in r["results"]:
        rows.append(f"| {a['arm']} | {a['tokens_per_s']:,.0f} | {a['peak_gib']:.2f} | "
                    f"{a['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s, "
                    f"{a['peak_gib'] / full['peak_gib']:.2f}x memory |")
    body = "\n".join([SECTION, "", f"`python benchmarks/bench_train_gpu.py --vocab {r['vocab']}` on "
                      f"{r['name']}, {_dt.date.today().isoformat()}: DPO forward+backward, Llama hidden "
                      f"1024 x 8 layers, bf16 autocast, {r['pairs']} long-tailed pairs, micro-batches of 4, "
                      f"{r['steps']} passes after a warm-up.", "", *rows, ""])
    replace_section(SECTION, body, HERE / "RESULTS.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    res = main(args.vocab, args.pairs, args.steps, args.device, args.small)
    if res and not args.no_results and args.device == "cuda":
        write_section(res)
