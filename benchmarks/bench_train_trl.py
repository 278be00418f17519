"""Training beside TRL 1.16 over model shapes: SFT, reward model and DPO on the same model and data.

    python benchmarks/bench_train_trl.py [--shapes tiny,mid,vocab32k] [--stages sft,rewardModel,dpo]
                                         [--rounds 2] [--examples 512] [--threads 2] [--no-results]
    python benchmarks/bench_train_trl.py --from-log LOG [--from-log LOG2 ...]   # summarise printed runs

Shapes (train_shapes.py): tiny (2 layers, hidden 128), mid (4 layers, hidden 256: issue 27's
held-out shape) and vocab32k (mid with the model's vocabulary padded to 32,000), each with a
~3,000-token BPE built offline. For each shape one model is initialised and saved once; both
sides load that folder. Both sides train it on the same long-tailed workload (sequence lengths
~19-500 tokens, log-uniform like real chat data; 512 conversations or pairs by default; the
pairs are learnable: chosen and rejected answers draw their words from disjoint halves of the
vocabulary, so both sides' RM and DPO losses fall and can be compared) with the same
hyperparameters (one epoch, global batch 32 reached by accumulating micro-batches of 4
sequences or pairs, AdamW betas 0.9/0.95, linear schedule, clip 1.0, fp32 on CPU):
- ours: `python -m xwin_jobs <stage> --task ...`, the stage exactly as a pod runs it
  (reading records, tokenizing, training, saving), with `microBatchTokens` and packing;
- TRL: benchmarks/peer_trl.py in its own virtualenv (`make trl`: .venv-trl), given the token
  ids and labelled positions our encoder produced (pre-tokenized), trainer defaults
  otherwise (padding to each batch's longest, full logits; DPO with precomputed reference
  log-probabilities, its cheapest mode); it saves its model too.

Each run is a fresh process with OMP_NUM_THREADS = MKL_NUM_THREADS = --threads (both sides).
Measured per shape x stage x side: whole-process wall time and peak RSS (wait4); training time
(the optimizer-step loop: ours from the stage's log timestamps, from the `training:` line to
the last `step N/N` line; TRL's trainer `train_runtime`; DPO's reference pass, before the loop
on both sides, is reported beside it); real tokens/s (the workload's real tokens / training
time); padding efficiency (real / fed positions of the training batches); first-step, mean
and last-step training losses; the 1-minute load average before and after the run. Rounds
alternate the sides (ours first in even rounds, TRL first in odd ones); medians are reported.
The compute floor: this CPU's fp32 matmul rate at each shape's matmuls, measured before and
after the shape's runs (the better is used), and each side's achieved training FLOP/s as a
share of it (formulas: train_shapes.py). Without .venv-trl the peer is skipped, with a message.
Every run prints one `RUN {json}` line (and each shape `WORKLOAD`/`MATMUL` lines) that
--from-log reads back, so a run cut short still gives its tables.

The GPU variant (chunked head vs full logits on a 32k vocabulary) is bench_train_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_shapes import SHAPES, build_model, matmul_rates, workload_flops  # noqa: E402

TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
STAGES = ("sft", "rewardModel", "dpo")
HP = {"epochs": 1, "globalBatchSize": 32, "microBatchSize": 4, "maxLength": 512, "seed": 7,
      "warmupRatio": 0.0, "weightDecay": 0.0, "lrScheduler": "linear", "maxGradNorm": 1.0,
      "zeroStage": 0, "gradientCheckpointing": False, "checkpointEvery": 0}
LEARNING_RATE = {"sft": 1e-3, "rewardModel": 1e-4, "dpo": 1e-4}
MICRO_BATCH_TOKENS = 1024
BETA = 0.1


def child_env(threads: int) -> dict[str, str]:
    """Both sides alike. On a loaded machine torch's OpenMP pool spins against the other load
    (2 threads on 2 shared cores ran 4x slower than 1 in an earlier run): record the load."""
    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


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


def trl_rows(stage: str, records: list[dict], tokenizer) -> tuple[list[dict], dict]:
    """Our encoding of `records`, in the columns TRL reads pre-tokenized; and the workload:
    rows, real tokens, labelled positions (learned next tokens) and the sequences' lengths."""
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
    lengths = [len(s.input_ids) for s in seqs]
    labelled = sum(1 for s in seqs for t in s.labels[1:] if t != -100)
    return rows, {"rows": len(rows), "real": sum(lengths), "labelled": labelled, "lengths": lengths}


def measured(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str, str]:
    """Wall seconds, peak RSS (MiB, the child's own, from wait4), stdout and stderr of `cmd`."""
    import threading

    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
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
    if code:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({code}):\n{chunks['err'].decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024, chunks["out"].decode(), chunks["err"].decode()


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
STEP_LINE = re.compile(r"^step (\d+)/\1 epoch [\d.]+ loss ([\d.]+)")


def log_times(err: str) -> dict[str, float]:
    """From our stage's log (asctime, milliseconds): `train` seconds (the `training:` line to
    the last `step N/N` line: the whole loop), `ref` seconds (DPO: the `micro-batches:` line,
    just before the reference pass, to `reference log-probabilities:`), `last` step loss.
    NaN where a line is missing (the log format changed: fix the patterns here)."""
    marks: dict[str, float] = {}
    last = float("nan")
    for line in err.splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(2)
        if msg.startswith("micro-batches:"):
            marks["prepared"] = t
        elif msg.startswith("reference log-probabilities:"):
            marks["referenced"] = t
        elif msg.startswith("training:"):
            marks["loop"] = t
        elif (s := STEP_LINE.match(msg)):
            marks["done"], last = t, float(s.group(2))
    nan = float("nan")
    return {"train": marks["done"] - marks["loop"] if {"done", "loop"} <= marks.keys() else nan,
            "ref": marks["referenced"] - marks["prepared"] if {"referenced", "prepared"} <= marks.keys() else nan,
            "last": last}


def ours(stage: str, work: Path, base: str, data: str, round_: int, env: dict) -> dict:
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
    wall, rss, _, err = measured([sys.executable, "-m", "xwin_jobs", stage, "--task", str(task_file)], ROOT, env)
    metrics = json.loads((out / "metrics.json").read_text())
    times = log_times(err)
    return {"wall": wall, "rss": rss, "train": times["train"], "ref": times["ref"],
            "loss": metrics["trainLoss"], "first": metrics["initialTrainLoss"], "last": times["last"],
            "efficiency": metrics.get("paddingEfficiency", float("nan")),
            "fed": metrics["trainTokens"] / metrics["paddingEfficiency"] if metrics.get("paddingEfficiency") else None}


def trl(stage: str, work: Path, base: str, rows: list[dict], round_: int, env: dict) -> dict:
    workload = work / f"trl-{stage}.json"
    if not workload.exists():
        workload.write_text(json.dumps({"stage": stage, "model": base, "examples": rows,
                                        "hp": {**HP, "learningRate": LEARNING_RATE[stage], "beta": BETA}}))
    out = work / "runs" / f"trl-{stage}-{round_}"
    wall, rss, stdout, _ = measured([str(TRL_PYTHON), str(HERE / "peer_trl.py"), str(workload), str(out)], ROOT, env)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "rss": rss, "train": r["train_runtime"], "ref": r.get("ref_seconds") or float("nan"),
            "loss": r["mean_loss"], "first": r["first_loss"], "last": r["final_loss"],
            "efficiency": r["real_tokens"] / max(r["fed_positions"], 1), "fed": r["fed_positions"]}


EMITTED: list[str] = []  # this process's RUN / WORKLOAD / MATMUL lines, for collect()


def emit(kind: str, record: dict) -> None:
    EMITTED.append(f"{kind} {json.dumps(record)}")
    print(EMITTED[-1], flush=True)


def run_shape(shape: str, stages: list[str], rounds: int, n: int, threads: int, have_trl: bool) -> None:
    from xwin_jobs.modeling import load_tokenizer

    env = child_env(threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{shape}-") as tmp:
        work = Path(tmp)
        conversations, pairs, corpus = make_records(n)
        base = build_model(work / "base", corpus, shape, seed=0)
        tokenizer = load_tokenizer(base)
        vocab = len(tokenizer)
        rates = matmul_rates(shape, vocab, threads)
        files = {"sft": write_jsonl(work / "sft.jsonl", conversations),
                 "pairs": write_jsonl(work / "pairs.jsonl", pairs)}
        for stage in stages:
            rows, w = trl_rows(stage, conversations if stage == "sft" else pairs, tokenizer)
            lengths = w.pop("lengths")
            flops = workload_flops(shape, stage, lengths, w["labelled"], vocab)
            emit("WORKLOAD", {"shape": shape, "stage": stage, "n": n, "vocab": vocab, "flops": flops,
                              "max_length": max(lengths), **w})
            data = files["sft" if stage == "sft" else "pairs"]
            for r in range(rounds):
                for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
                    if side == "trl" and not have_trl:
                        continue
                    before = os.getloadavg()[0]
                    res = (ours(stage, work, base, data, r, env) if side == "ours"
                           else trl(stage, work, base, rows, r, env))
                    res.update({"shape": shape, "stage": stage, "side": side, "round": r,
                                "load_before": before, "load_after": os.getloadavg()[0]})
                    print(f"{shape} {stage} round {r} {side}: {res['wall']:.1f}s (training {res['train']:.1f}s) "
                          f"rss {res['rss']:.0f} MiB loss {res['first']:.4f} -> mean {res['loss']:.4f} "
                          f"last {res['last']:.4f} eff {res['efficiency']:.3f} "
                          f"(load {before:.1f} -> {res['load_after']:.1f})", flush=True)
                    emit("RUN", res)
        after = matmul_rates(shape, vocab, threads)
        best = {k: max(v, after[k]) for k, v in rates.items()}
        emit("MATMUL", {"shape": shape, "threads": threads, "tokens": 1024, "before": rates,
                        "after": after, "rates": best})


def collect(lines: list[str]) -> dict:
    """The RUN / WORKLOAD / MATMUL records of printed lines (later records of the same key win;
    a stage keeps the rounds both sides finished)."""
    res: dict = {"runs": {}, "workload": {}, "matmul": {}}
    for line in lines:
        kind, _, body = line.strip().partition(" ")
        if kind not in ("RUN", "WORKLOAD", "MATMUL") or not body.startswith("{"):
            continue
        rec = json.loads(body)
        if kind == "RUN":
            res["runs"].setdefault((rec["shape"], rec["stage"]), {}).setdefault(rec["side"], {})[rec["round"]] = rec
        elif kind == "WORKLOAD":
            res["workload"][(rec["shape"], rec["stage"])] = rec
        else:
            res["matmul"][rec["shape"]] = rec
    for key, sides in res["runs"].items():
        common = set.intersection(*(set(v) for v in sides.values())) if len(sides) > 1 else set(next(iter(sides.values())))
        res["runs"][key] = {side: [v[r] for r in sorted(common)] for side, v in sides.items()}
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every run (both sides)")
    parser.add_argument("--no-results", action="store_true", help="print the tables, leave RESULTS.md alone")
    parser.add_argument("--from-log", metavar="LOG", action="append",
                        help="summarise the RUN/WORKLOAD/MATMUL lines of earlier runs instead of running")
    args = parser.parse_args()
    shapes, stages = args.shapes.split(","), args.stages.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if args.from_log:
        res = collect([line for p in args.from_log for line in Path(p).read_text().splitlines()])
        threads = {m["threads"] for m in res["matmul"].values()} or {args.threads}
        command = "(from the logs of " + ", ".join(args.from_log) + ")"
    else:
        have_trl = TRL_PYTHON.exists()
        if not have_trl:
            print(f"TRL peer skipped: {TRL_PYTHON} missing (run `make trl` to create .venv-trl)")
        print(f"host: {os.cpu_count()} CPUs, load {os.getloadavg()}, threads {args.threads}", flush=True)
        for shape in shapes:
            run_shape(shape, stages, args.rounds, args.examples, args.threads, have_trl)
        res = collect(EMITTED)
        threads = {args.threads}
        command = ("`python benchmarks/bench_train_trl.py --shapes " + args.shapes + " --stages " + args.stages
                   + f" --rounds {args.rounds} --examples {args.examples} --threads {args.threads}`")
    from train_report import tables, write_section

    print(tables(res))
    if not args.no_results and any(len(s) > 1 for s in res["runs"].values()):
        write_section(res, command, threads)
        print(f"updated {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
