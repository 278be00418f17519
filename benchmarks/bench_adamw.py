"""The optimizer step alone: torch's AdamW for-loop, foreach and fused, on the model shapes of
bench_train_trl.py (train_shapes.SHAPES), with gradients in place.

    python benchmarks/bench_adamw.py [--threads 2] [--rounds 3] [--steps 5] [--no-results]

Each round times `--steps` steps of each implementation (alternating, after one warm-up
step), in one process; the best round is reported per implementation, with the load average.
Why: whether the trainer should use the fused one (docs/design.md, section 8: not yet).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTION = "## AdamW step"
KINDS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(shape: dict, rounds: int, steps: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for kind, options in KINDS.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **options)
            opt.step()
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            took = (time.perf_counter() - start) / steps
            best[kind] = min(best.get(kind, took), took)
    best["params"] = sum(p.numel() for p in model.parameters())
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from train_shapes import BPE_VOCAB, SHAPES

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    for name in SHAPES:
        shape = SHAPES[name]
        r = measure({"vocab_size": shape["model_vocab"] or BPE_VOCAB, "hidden_size": shape["hidden"],
                     "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
                     "num_attention_heads": shape["heads"], "num_key_value_heads": shape["heads"]},
                    args.rounds, args.steps)
        rows.append((name, r))
        print(name, {k: (f"{v * 1000:.1f} ms" if k != "params" else v) for k, v in r.items()}, flush=True)
    load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
    body = [SECTION, "",
            f"`python benchmarks/bench_adamw.py` ({args.rounds} rounds of {args.steps} steps, best round), "
            f"{args.threads} torch threads, {platform.processor() or platform.machine()}, load average {load}, "
            f"torch {torch.__version__}, {_dt.date.today()}. One optimizer step over every parameter "
            "with gradients in place.", "",
            "| shape | parameters | for-loop (ms) | foreach (ms) | fused (ms) | for-loop / fused |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    body += [f"| {n} | {r['params'] / 1e6:.1f}M | {r['for-loop'] * 1000:.1f} | {r['foreach'] * 1000:.1f} | "
             f"{r['fused'] * 1000:.1f} | {r['for-loop'] / r['fused']:.1f}x |" for n, r in rows]
    if not args.no_results:
        from results_md import replace_section

        replace_section(SECTION, "\n".join(body) + "\n")
    print("\n".join(body))


if __name__ == "__main__":
    main()
