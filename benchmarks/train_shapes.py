"""Model shapes, their training FLOPs and this CPU's matmul rate: helpers of bench_train_trl.py
and profile_train.py.

Shapes (Llama, heads of head_dim, key/value heads = heads, untied LM head, 512 positions):

    tiny      2 layers, hidden 128, intermediate 256, vocabulary ~3,000 (the BPE's own size)
    mid       4 layers, hidden 256, intermediate 1024, vocabulary ~3,000 (issue 27's held-out shape)
    vocab32k  mid's body, model vocab_size padded to 32,000

The vocabulary: a byte-level BPE trained offline on the synthetic corpus (examples/tiny_model.py)
reaches only ~5,750 tokens, however large a size it is asked for (the corpus has ~4,000
distinct words). vocab32k therefore keeps the same ~3,000-token tokenizer (same token ids,
same workload as the other shapes) and pads the model's vocab_size to 32,000: the LM head is
[hidden x 32,000] and softmax/cross-entropy run over all 32,000 logits, as with a real 32k
vocabulary; ids above the tokenizer's never occur in the data.

Training FLOPs of a workload (`workload_flops`; the work the workload requires, the same
number for both sides, so achieved FLOP/s compares like training time does). With h = hidden,
i = intermediate, n = layers, V = the model's vocab_size, over the workload's sequences s of
real length L_s, with T_s positions whose next token is learned (labelled):

    body       6 * P * sum(L_s),       P = n * (4 h^2 + 3 h i)   (q, k, v, o; gate, up, down)
    attention  6 * n * h * sum(L_s^2)  (causal: QK^T and AV, L^2/2 pairs each, x3 for training)
    LM head    6 * h * V * sum(T_s)    (sft, dpo: logits are needed at labelled positions only)
    RM head    6 * h * (number of sequences)  (a scalar read at each sequence's last token)

Embedding lookups, norms, rotary and the optimizer are not counted (no matmuls). DPO's
reference pass (forward only, 2/6 of the above) runs before the training loop on both sides
and is outside training time, so outside these FLOPs too. Padding and head positions beyond
the labelled ones are work a side chooses to do, so not counted.

The compute floor (`floor_seconds`): this CPU's measured fp32 torch.mm rate at the model's
own matmul shapes, with the runs' thread count: [T x h] @ [h x h] (attention projections; also
used for the attention FLOPs, a generous rate for head_dim-sized matmuls), [T x h] @ [h x i]
(the MLP; also its down projection) and [T x h] @ [h x V] (the LM head), T = 1024 positions.
floor = sum over kinds of FLOPs / rate: the training time if every FLOP ran at the matmul
rate. A side's "% of floor" = floor / its training time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BPE_VOCAB = 3000
SHAPES = {
    "tiny": {"layers": 2, "hidden": 128, "intermediate": 256, "heads": 4, "model_vocab": None},
    "mid": {"layers": 4, "hidden": 256, "intermediate": 1024, "heads": 4, "model_vocab": None},
    "vocab32k": {"layers": 4, "hidden": 256, "intermediate": 1024, "heads": 4, "model_vocab": 32000},
}
MATMUL_TOKENS = 1024


def describe(name: str, vocab: int) -> str:
    s = SHAPES[name]
    padded = f"{s['model_vocab']:,} (tokenizer {vocab:,}, padded)" if s["model_vocab"] else f"{vocab:,}"
    return (f"{name}: {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
            f"{s['heads']} heads, vocabulary {padded}")


def tiny_model_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "examples" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(out_dir: Path, corpus: list[str], shape: str, seed: int = 0) -> str:
    """The tokenizer (BPE of BPE_VOCAB on `corpus`, as examples/tiny_model.py builds it) and a
    randomly initialised Llama of `shape`, saved once to out_dir: both sides load this folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from xwin_jobs.modeling import make_tokenizer_portable

    s = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_model_module().build_tiny_tokenizer(corpus, vocab_size=BPE_VOCAB)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), s["model_vocab"] or 0), hidden_size=s["hidden"],
        intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        head_dim=s["hidden"] // s["heads"], max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tokenizer_portable(out)
    return str(out)


def model_vocab(shape: str, tokenizer_vocab: int) -> int:
    return max(tokenizer_vocab, SHAPES[shape]["model_vocab"] or 0)


def workload_flops(shape: str, stage: str, lengths: list[int], labelled: int, vocab: int) -> dict[str, float]:
    """Training FLOPs of one epoch over sequences of real `lengths` with `labelled` learned
    positions in all (module docstring), by matmul kind: proj, mlp, attention, head."""
    s = SHAPES[shape]
    h, i, n = s["hidden"], s["intermediate"], s["layers"]
    real = sum(lengths)
    head = 6 * h * (len(lengths) if stage == "rewardModel" else model_vocab(shape, vocab) * labelled)
    return {"proj": 6.0 * n * 4 * h * h * real, "mlp": 6.0 * n * 3 * h * i * real,
            "attention": 6.0 * n * h * sum(L * L for L in lengths), "head": float(head)}


def matmul_rates(shape: str, vocab: int, threads: int) -> dict[str, float]:
    """FLOP/s of fp32 torch.mm at `shape`'s matmuls (module docstring), measured in a fresh
    process with OMP_NUM_THREADS=MKL_NUM_THREADS=threads, as the runs get."""
    s = SHAPES[shape]
    dims = {"proj": s["hidden"], "mlp": s["intermediate"], "head": model_vocab(shape, vocab)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "matmul", str(s["hidden"]), json.dumps(dims)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _measure(hidden: int, dims: dict[str, int], tokens: int = MATMUL_TOKENS) -> dict[str, float]:
    import time

    import torch

    torch.manual_seed(0)
    a = torch.randn(tokens, hidden)
    rates = {}
    for kind, d in dims.items():
        b, out = torch.randn(hidden, d), torch.empty(tokens, d)
        flops = 2.0 * tokens * hidden * d
        reps = max(2, int(1e9 / flops))  # ~1 GFLOP a timing
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            best.append(flops * reps / (time.perf_counter() - started))
        rates[kind] = sorted(best)[len(best) // 2]  # median of 5
    rates["attention"] = rates["proj"]
    rates["threads"] = torch.get_num_threads()
    return rates


def floor_seconds(flops: dict[str, float], rates: dict[str, float]) -> float:
    return sum(f / rates[kind] for kind, f in flops.items())


def floor_rate(flops: dict[str, float], rates: dict[str, float]) -> float:
    """The matmul rate of this workload's mix: its FLOPs / its floor time."""
    return sum(flops.values()) / floor_seconds(flops, rates)


if __name__ == "__main__":
    if sys.argv[1:2] == ["matmul"]:
        print(json.dumps(_measure(int(sys.argv[2]), json.loads(sys.argv[3]))))
    else:
        print(__doc__)
