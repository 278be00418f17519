"""Training throughput beside TRL 1.16: SFT, reward model and DPO on the same model and data.

    python benchmarks/bench_train_trl.py [--rounds 3] [--examples 512] [--stages sft,rewardModel,dpo]
                                         [--no-results]

Both sides train the same tiny Llama (examples/tiny_model.py with a ~3,000-token BPE
vocabulary, built offline) on the same long-tailed workload (sequence lengths ~19-500 tokens,
log-uniform like real chat data; 512 conversations or pairs by default; the pairs are
learnable: chosen and rejected answers draw their words from disjoint halves of the
vocabulary, so both sides' RM and DPO losses fall and can be compared) with the same
hyperparameters (one epoch, global batch 32 reached by accumulating micro-batches of 4
sequences or pairs, AdamW betas 0.9/0.95, linear schedule, clip 1.0, fp32 on CPU):
- ours: `python -m xwin_jobs <stage> --task ...`, the stage exactly as a pod runs it
  (reading records, tokenizing, training, saving), with `microBatchTokens` and packing;
- TRL: benchmarks/peer_trl.py in its own virtualenv (`make trl`: .venv-trl), given the token
  ids and labelled positions our encoder produced (pre-tokenized), trainer defaults
  otherwise (padding to each batch's longest, full logits; DPO with precomputed reference
  log-probabilities, its cheapest mode); it saves its model too.
Each run is a fresh process; its whole wall time and peak RSS (wait4) are measured, and its
first-step, mean and last-step training losses are reported side by side. Rounds
alternate the sides (ours first in even rounds, TRL first in odd ones); medians are reported
with the machine's load average. Without .venv-trl the peer is skipped, with a message.

The GPU variant (chunked head vs full logits on a 32k vocabulary) is bench_train_gpu.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
SECTION = "## Training vs TRL"
STAGES = ("sft", "rewardModel", "dpo")
TARGETS = {"sft": 1.8, "rewardModel": 1.6, "dpo": 2.0}
HP = {"epochs": 1, "globalBatchSize": 32, "microBatchSize": 4, "maxLength": 512, "seed": 7,
      "warmupRatio": 0.0, "weightDecay": 0.0, "lrScheduler": "linear", "maxGradNorm": 1.0,
      "zeroStage": 0, "gradientCheckpointing": False, "checkpointEvery": 0}
LEARNING_RATE = {"sft": 1e-3, "rewardModel": 1e-4, "dpo": 1e-4}
MICRO_BATCH_TOKENS = 1024
# Both sides alike. One torch thread: on this machine (2 cores shared with other engineers'
# test runs) torch's 2-thread OpenMP pool spins against the other load and runs 4x slower
# than one thread; it would measure the machine's contention, not the trainers.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"}
BETA = 0.1


def tiny_model_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "examples" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_words(rng: random.Random, count: int = 4000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)]


def text(rng: random.Random, words: list[str], n: int) -> str:
    # Zipf-like: low indices far more frequent
    return " ".join(words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)] for _ in range(n))


def long_tail(rng: random.Random, low: float, high: float) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def make_records(n: int, seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    """(conversations, pairs, corpus): prompts 3-40 words, answers log-uniform 3-300 words.
    Pairs are learnable, so both trainers' losses fall and can be compared: a chosen answer
    draws its words (Zipf-like) from one half of the vocabulary, a rejected one from the
    other half (the same random draws either way, so the lengths are as before)."""
    rng = random.Random(seed)
    words = make_words(rng)
    half = len(words) // 2
    good, bad = words[:half], words[half:]
    conversations, pairs = [], []
    for i in range(n):
        prompt = [{"role": "user", "content": text(rng, words, long_tail(rng, 3, 40))}]
        conversations.append({"id": f"c{i}", "messages": prompt + [
            {"role": "assistant", "content": text(rng, words, long_tail(rng, 3, 300))}]})
        pairs.append({"id": f"p{i}", "prompt": prompt,
                      "chosen": [{"role": "assistant", "content": text(rng, good, long_tail(rng, 3, 300))}],
                      "rejected": [{"role": "assistant", "content": text(rng, bad, long_tail(rng, 3, 300))}],
                      "chosen_score": 1.0, "rejected_score": 0.0, "judge": {"model": "synthetic"}})
    corpus = [m["content"] for c in conversations[:200] for m in c["messages"]] + [" ".join(words)]
    return conversations, pairs, corpus


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _prompt_length(example) -> int:
    return next(i for i, t in enumerate(example.labels) if t != -100)


def trl_rows(stage: str, records: list[dict], tokenizer) -> tuple[list[dict], int, int]:
    """Our encoding of `records`, in the columns TRL reads pre-tokenized; also the real
    tokens and the labelled positions (learned next tokens) of the workload."""
    from xwin_jobs.training.data import encode_conversations, encode_pairs

    if stage == "sft":
        examples, _ = encode_conversations(records, "tokenizer", tokenizer, HP["maxLength"])
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        seqs = examples
    else:
        examples, _ = encode_pairs(records, "tokenizer", tokenizer, HP["maxLength"])
        seqs = [s for p in examples for s in (p.chosen, p.rejected)]
        if stage == "rewardModel":
            rows = [{"chosen_ids": p.chosen.input_ids, "rejected_ids": p.rejected.input_ids} for p in examples]
        else:
            rows = []
            for p in examples:
                k = _prompt_length(p.chosen)
                assert p.chosen.input_ids[:k] == p.rejected.input_ids[:k] and k == _prompt_length(p.rejected)
                rows.append({"prompt_ids": p.chosen.input_ids[:k], "chosen_ids": p.chosen.input_ids[k:],
                             "rejected_ids": p.rejected.input_ids[k:]})
    real = sum(len(s.input_ids) for s in seqs)
    labelled = sum(1 for s in seqs for t in s.labels[1:] if t != -100)
    return rows, real, labelled


def measured(cmd: list[str], cwd: Path) -> tuple[float, float, str, str]:
    """Wall seconds, peak RSS (MiB, the child's own, from wait4), stdout and stderr of `cmd`."""
    import threading

    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **CHILD_ENV})
    chunks = {"out": b"", "err": b""}

    def drain(name, pipe):
        chunks[name] = pipe.read()

    threads = [threading.Thread(target=drain, args=(k, p)) for k, p in (("out", proc.stdout), ("err", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({code}):\n{chunks['err'].decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024, chunks["out"].decode(), chunks["err"].decode()


def ours(stage: str, work: Path, base: str, data: str, round_: int) -> dict:
    from xwin_jobs.task import StageTask

    out = work / "runs" / f"ours-{stage}-{round_}"
    params = {"training": {**HP, "learningRate": LEARNING_RATE[stage], "microBatchTokens": MICRO_BATCH_TOKENS}}
    inputs = {"model": f"file://{base}/"}
    if stage == "sft":
        inputs["data"] = f"file://{data}"
    else:
        inputs["pairs"] = f"file://{data}"
        params.update({"beta": BETA, "pairsFrom": "pairs"} if stage == "dpo" else {"heldOutFraction": 0.0})
    task = StageTask(stage=stage, output=f"file://{out}/", inputs=inputs, params=params,
                     chat_template="tokenizer", run={"namespace": "bench", "name": "train"})
    task_file = work / f"task-{stage}.json"
    task_file.write_text(task.to_json())
    wall, rss, _, err = measured([sys.executable, "-m", "xwin_jobs", stage, "--task", str(task_file)], ROOT)
    metrics = json.loads((out / "metrics.json").read_text())
    steps = STEP_LINE.findall(err)  # the loop logs the last step's loss
    return {"wall": wall, "rss": rss, "loss": metrics["trainLoss"], "first": metrics["initialTrainLoss"],
            "last": float(steps[-1][1]) if steps else float("nan"),
            "efficiency": metrics.get("paddingEfficiency")}


def trl(stage: str, work: Path, base: str, rows: list[dict], round_: int) -> dict:
    workload = work / f"trl-{stage}.json"
    workload.write_text(json.dumps({"stage": stage, "model": base, "examples": rows,
                                    "hp": {**HP, "learningRate": LEARNING_RATE[stage], "beta": BETA}}))
    out = work / "runs" / f"trl-{stage}-{round_}"
    wall, rss, stdout, _ = measured([str(TRL_PYTHON), str(HERE / "peer_trl.py"), str(workload), str(out)], ROOT)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "rss": rss, "loss": result["mean_loss"], "first": result["first_loss"],
            "last": result["final_loss"],
            "efficiency": result["real_tokens"] / max(result["fed_positions"], 1)}


def main(rounds: int, n: int, stages: list[str]) -> dict:
    from xwin_jobs.modeling import load_tokenizer

    have_trl = TRL_PYTHON.exists()
    if not have_trl:
        print(f"TRL peer skipped: {TRL_PYTHON} missing (run `make trl` to create .venv-trl)")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        conversations, pairs, corpus = make_records(n)
        base = str(tiny_model_module().build_tiny_model(work / "base", corpus, seed=0, vocab_size=3000))
        tokenizer = load_tokenizer(base)
        files = {"sft": write_jsonl(work / "sft.jsonl", conversations),
                 "pairs": write_jsonl(work / "pairs.jsonl", pairs)}
        runs: dict[str, dict[str, list[dict]]] = {s: {"ours": [], "trl": []} for s in stages}
        workload = {}
        loads = []
        for stage in stages:
            rows, real, labelled = trl_rows(stage, conversations if stage == "sft" else pairs, tokenizer)
            lengths = sorted(len(r.get("input_ids") or r.get("chosen_ids") or []) for r in rows)
            workload[stage] = {"real": real, "labelled": labelled, "rows": len(rows)}
            data = files["sft" if stage == "sft" else "pairs"]
            for r in range(rounds):
                order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
                for side in order:
                    if side == "trl" and not have_trl:
                        continue
                    loads.append(os.getloadavg()[0])
                    res = ours(stage, work, base, data, r) if side == "ours" else trl(stage, work, base, rows, r)
                    runs[stage][side].append(res)
                    print(f"{stage} round {r} {side}: {res['wall']:.1f}s rss {res['rss']:.0f} MiB "
                          f"loss {res['first']:.4f} -> mean {res['loss']:.4f} last {res['last']:.4f} eff {res['efficiency']:.3f} (load {loads[-1]:.1f})",
                          flush=True)
        vocab = len(tokenizer)
    return {"runs": runs, "workload": workload, "rounds": rounds, "n": n, "vocab": vocab,
            "load": (min(loads), statistics.median(loads), max(loads)), "have_trl": have_trl}


RUN_LINE = re.compile(r"^(\w+) round (\d+) (ours|trl): ([\d.]+)s rss ([\d.]+) MiB loss ([\d.]+) -> mean "
                      r"([\d.]+) last ([\d.]+|nan) eff ([\d.]+) \(load ([\d.]+)\)$")
STEP_LINE = re.compile(r"step (\d+)/\1 epoch [\d.]+ loss ([\d.]+)")


def from_logs(specs: list[str]) -> dict:
    """The results of earlier runs from their printed lines, `LOG:EXAMPLES[:STAGE,...]` each
    (a run cut short keeps the rounds both sides finished)."""
    from xwin_jobs.modeling import load_tokenizer

    runs: dict[str, dict[str, list[dict]]] = {}
    counts: dict[str, int] = {}
    loads, rounds = [], 0
    lines = []
    for spec in specs:
        path, n, *only = spec.split(":")
        for line in Path(path).read_text().splitlines():
            lines.append((int(n), only[0].split(",") if only else None, line))
    for n, only, line in lines:
        m = RUN_LINE.match(line.strip())
        if not m or (only and m.group(1) not in only):
            continue
        stage, r, side = m.group(1), int(m.group(2)), m.group(3)
        counts[stage] = n
        wall, rss, first, loss, last, eff, load = map(float, m.groups()[3:])
        runs.setdefault(stage, {"ours": [], "trl": []})[side].append(
            {"wall": wall, "rss": rss, "first": first, "loss": loss, "last": last, "efficiency": eff})
        loads.append(load)
        rounds = max(rounds, r + 1)
    for sides in runs.values():  # keep rounds that both sides finished
        k = min(len(v) for v in sides.values())
        for v in sides.values():
            del v[k:]
    workload = {}
    for stage, n in counts.items():  # the model is built from the records, as in main()
        conversations, pairs, corpus = make_records(n)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            base = str(tiny_model_module().build_tiny_model(Path(tmp) / "base", corpus, seed=0, vocab_size=3000))
            tokenizer = load_tokenizer(base)
            rows, real, labelled = trl_rows(stage, conversations if stage == "sft" else pairs, tokenizer)
            workload[stage] = {"real": real, "labelled": labelled, "rows": len(rows)}
    return {"runs": runs, "workload": workload, "rounds": rounds, "n": counts, "vocab": len(tokenizer),
            "load": (min(loads), statistics.median(loads), max(loads)), "have_trl": True}


def summary(res: dict) -> dict[str, dict]:
    out = {}
    for stage, sides in res["runs"].items():
        row = {}
        for side, runs in sides.items():
            if runs:
                row[side] = {k: statistics.median(r[k] for r in runs) for k in ("wall", "rss", "loss", "first", "last", "efficiency")}
                row[side]["walls"] = [r["wall"] for r in runs]
                row[side]["tps"] = res["workload"][stage]["real"] * HP["epochs"] / row[side]["wall"]
        if "trl" in row:
            row["ratio"] = row["trl"]["wall"] / row["ours"]["wall"]
        out[stage] = row
    return out


def table(res: dict) -> str:
    s = summary(res)
    lines = ["| stage | side | wall (s), median | all rounds (s) | real tokens/s | peak RSS (MiB) | "
             "padding efficiency | first-step loss | mean train loss | last-step loss | TRL ÷ ours (target) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for stage, row in s.items():
        for side in ("ours", "trl"):
            if side not in row:
                continue
            r = row[side]
            ratio = ""
            if side == "ours" and "ratio" in row:
                ok = "met" if row["ratio"] >= TARGETS[stage] else "NOT met"
                ratio = f"{row['ratio']:.2f}x (>= {TARGETS[stage]}x: {ok})"
            lines.append(f"| {stage} | {'xwin' if side == 'ours' else 'TRL 1.16'} | {r['wall']:.1f} | "
                         + ", ".join(f"{w:.1f}" for w in r["walls"])
                         + f" | {r['tps']:,.0f} | {r['rss']:.0f} | {r['efficiency']:.3f} | {r['first']:.4f} | "
                         f"{r['loss']:.4f} | {r['last']:.4f} | {ratio} |")
    return "\n".join(lines)


def write_section(res: dict) -> None:
    import torch

    from results_md import replace_section

    lo, med, hi = res["load"]
    if isinstance(res["n"], int):
        command = f"`python benchmarks/bench_train_trl.py --rounds {res['rounds']} --examples {res['n']}`"
    else:  # put together from runs with different sizes (--from-log)
        command = "`python benchmarks/bench_train_trl.py` (" + "; ".join(
            f"{st}: --examples {k}, {len(res['runs'][st]['ours'])} rounds" for st, k in res["n"].items()) + ")"
    work = "; ".join(f"{st}: {w['rows']} examples, {w['real']:,} real tokens, {w['labelled']:,} labelled"
                     for st, w in res["workload"].items())
    body = "\n".join([
        SECTION, "",
        command + " on "
        f"{os.cpu_count()} shared CPU cores (load average {lo:.1f}-{hi:.1f}, median {med:.1f}, other "
        f"engineers' tests running), Python {platform.python_version()}, torch {torch.__version__}, "
        f"{_dt.date.today().isoformat()}. Tiny Llama (hidden 128, 2 layers, vocabulary {res['vocab']:,}), "
        f"long-tailed lengths up to maxLength {HP['maxLength']}; {work}. One epoch, global batch "
        f"{HP['globalBatchSize']}, micro-batches of {HP['microBatchSize']} (TRL) / length-grouped and "
        f"packed under microBatchTokens {MICRO_BATCH_TOKENS} (ours), learning rates "
        + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATE.items())
        + f", DPO beta {BETA}. Whole-process wall time (start to exit, model saved), medians of "
        "alternating rounds; both sides with OMP_NUM_THREADS=1 (see CHILD_ENV); tokens/s = the workload's real tokens / that wall time; padding "
        "efficiency = real / fed positions of the training batches. Losses differ only by data "
        "order (each side's own seeded sampler) and float rounding.",
        "", table(res), "",
    ])
    replace_section(SECTION, body, HERE / "RESULTS.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--from-log", metavar="LOG:EXAMPLES[:STAGES]", action="append",
                        help="summarise the printed lines of earlier runs instead of running")
    args = parser.parse_args()
    if args.from_log:
        res = from_logs(args.from_log)
    else:
        res = main(args.rounds, args.examples, args.stages.split(","))
    print(table(res))
    if not args.no_results and res["have_trl"]:
        write_section(res)
        print(f"updated {HERE / 'RESULTS.md'}")
