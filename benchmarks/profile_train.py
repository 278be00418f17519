"""Where a training step's time goes: one of our training stages, in this process, under
torch.profiler (CPU), on a bench_train_trl.py shape and workload.

    python benchmarks/profile_train.py [--stage sft|rewardModel|dpo] [--shape mid] [--steps 3]
                                       [--warmup 1] [--examples 256] [--threads 2] [--top 15]
                                       [--trace trace.json]

The stage runs as `python -m xwin_jobs <stage>` runs it (xwin_jobs.__main__.main, the same task
as the benchmark's, maxSteps = warmup + steps + 1); only the optimizer-step loop is profiled,
`--warmup` steps first unrecorded, then `--steps` steps (forward, backward, optimizer step,
logging; DPO's reference pass comes before the loop and is not in it). Prints:
- the top ops by self CPU time (torch.profiler's key_averages table);
- a breakdown of the recorded steps' wall time: matmuls of the body and of the LM head (an mm
  with the vocabulary as a dimension), attention kernels, log-softmax / cross-entropy, the
  optimizer (everything under Optimizer.step), other elementwise ops, copies and indexing, the
  rest, each split forward / backward (under
  the autograd engine) / optimizer, and what is left outside any op (Python and framework
  overhead: the recorded wall time less the ops' self time).
Self time is the calling thread's wall time inside an op, its OpenMP workers included.
Timings on a loaded machine are only indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_mm"}
ATTENTION = ("attention", "sdpa", "flash")
CROSS_ENTROPY = ("log_softmax", "nll_loss", "logsumexp", "cross_entropy", "softmax_backward")
ELEMENTWISE = {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "pow", "rsqrt", "sqrt", "mean",
               "silu", "silu_backward", "neg", "sigmoid", "exp", "where", "clamp", "sum", "addcmul_",
               "addcdiv_", "lerp_", "rsub", "masked_fill", "masked_fill_", "cos", "sin", "tanh"}
MEMORY = {"copy_", "fill_", "zero_", "cat", "index", "index_select", "index_add_", "scatter", "scatter_add_",
          "gather", "embedding", "embedding_dense_backward", "embedding_backward", "clone", "contiguous",
          "_to_copy", "empty", "empty_strided", "narrow", "split", "stack", "new_zeros", "zeros", "slice_backward",
          "select_backward", "index_put_", "_index_put_impl_", "nonzero", "masked_select", "pad",
          "constant_pad_nd"}


def category(event, vocab: int) -> str:
    name = event.name.lower()
    if event.name in MATMULS:
        shapes = [d for s in (event.input_shapes or []) for d in (s or [])]
        return "LM head matmul" if vocab in shapes else "body matmul"
    if any(k in name for k in ATTENTION):
        return "attention kernels"
    if any(k in name for k in CROSS_ENTROPY):
        return "log-softmax / cross-entropy"
    op = event.name.removeprefix("aten::")
    if op in ELEMENTWISE:
        return "elementwise (norms, rotary, SiLU, residuals, loss weights)"
    if op in MEMORY:
        return "memory (copies, cat, fill, index/scatter, embedding)"
    return "other ops"


def phase(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step") or parent.name.startswith("Optimizer.zero_grad"):
            return "optimizer"
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        parent = parent.cpu_parent
    return "forward/other"


def breakdown(events, wall: float, vocab: int, steps: int) -> str:
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    busy = 0.0
    for e in events:
        if e.device_type.name != "CPU" or e.name.startswith("ProfilerStep"):
            continue  # a ProfilerStep's self time is time outside any op
        self_s = e.self_cpu_time_total / 1e6
        if self_s <= 0:
            continue
        where = phase(e)
        what = "optimizer" if where == "optimizer" else category(e, vocab)
        table[what][where] += self_s
        busy += self_s
    table["outside ops (Python, framework)"]["forward/other"] = max(wall - busy, 0.0)
    cols = ("forward/other", "backward", "optimizer")
    lines = [f"Recorded {steps} step(s): {wall:.2f} s wall ({wall / steps:.2f} s a step)", "",
             "| where | forward/other (s) | backward (s) | optimizer (s) | total (s) | % of wall |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for what, row in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(row.values())
        lines.append(f"| {what} | " + " | ".join(f"{row.get(c, 0.0):.2f}" for c in cols)
                     + f" | {total:.2f} | {100 * total / wall:.0f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="sft", choices=["sft", "rewardModel", "dpo"])
    parser.add_argument("--shape", default="mid")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", help="also write a Chrome trace of the recorded steps here")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import bench_train_trl as bench
    from train_shapes import SHAPES, build_model, model_vocab
    from xwin_jobs.__main__ import main as xwin_main
    from xwin_jobs.task import StageTask
    from xwin_jobs.training import loop

    torch.set_num_threads(args.threads)
    if args.shape not in SHAPES:
        parser.error(f"unknown shape {args.shape!r}; known: {', '.join(SHAPES)}")
    needed = bench.HP["globalBatchSize"] * (args.warmup + args.steps + 1)
    if args.examples < needed:
        parser.error(f"--examples {args.examples} < {needed}: too few for {args.warmup + args.steps + 1} steps")
    with tempfile.TemporaryDirectory(prefix="profile-train-") as tmp:
        work = Path(tmp)
        conversations, pairs, corpus = bench.make_records(args.examples)
        base = build_model(work / "base", corpus, args.shape, seed=0)
        from xwin_jobs.modeling import load_tokenizer

        vocab = model_vocab(args.shape, len(load_tokenizer(base)))
        data = bench.write_jsonl(work / "data.jsonl", conversations if args.stage == "sft" else pairs)
        training = {**bench.HP, "learningRate": bench.LEARNING_RATE[args.stage],
                    "microBatchTokens": bench.MICRO_BATCH_TOKENS, "maxSteps": args.warmup + args.steps + 1}
        params: dict = {"training": training}
        inputs = {"model": f"file://{base}/", ("data" if args.stage == "sft" else "pairs"): f"file://{data}"}
        if args.stage == "dpo":
            params.update({"beta": bench.BETA, "pairsFrom": "pairs"})
        elif args.stage == "rewardModel":
            params["heldOutFraction"] = 0.0
        task = StageTask(stage=args.stage, output=f"file://{work}/out/", inputs=inputs, params=params,
                         chat_template="tokenizer", run={"namespace": "bench", "name": "profile"})
        (work / "task.json").write_text(task.to_json())

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                       schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1))
        boundaries: list[float] = []
        accumulate = loop._accumulate

        def stepping(*a, **kw):  # a step boundary before every step's micro-batches
            if boundaries:
                prof.step()
            boundaries.append(time.perf_counter())
            return accumulate(*a, **kw)

        loop._accumulate = stepping
        with prof:
            code = xwin_main([args.stage, "--task", str(work / "task.json")])
        loop._accumulate = accumulate
        if code:
            print(f"the stage failed (exit {code})", file=sys.stderr)
            return code
        recorded = boundaries[args.warmup:args.warmup + args.steps + 1]
        wall = recorded[-1] - recorded[0]
        print(f"\n{args.stage} on {args.shape} ({SHAPES[args.shape]}, model vocabulary {vocab:,}), "
              f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, metrics "
              f"{json.loads((work / 'out' / 'metrics.json').read_text()).get('paddingEfficiency')} padding efficiency\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        print(breakdown(prof.events(), wall, vocab, args.steps))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
