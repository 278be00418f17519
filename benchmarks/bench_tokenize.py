"""Tokenized once (issue 28): time from stage start to the first optimizer step, and memory per
rank, for an `sft` stage on 100k conversations with 2 ranks; the code before (a checkout of
an older commit, `--before-tree`) and now, first and second attempt.

    git worktree add /tmp/before <commit before issue 28>
    python benchmarks/bench_tokenize.py --before-tree /tmp/before [--conversations 100000]

* The workload: the tests' tiny Llama (examples/tiny_model.py, built offline), 100k synthetic
  multi-turn conversations (~`--words` words an answer) in one JSON Lines file, maxLength 512,
  2 ranks (torchrun, gloo, zeroStage 0), globalBatchSize 16, maxSteps 1.
* Each attempt is `python -m xwin_jobs.launch --standalone --nproc-per-node 2 -m xwin_jobs sft`
  with the tree's code (PYTHONPATH, cwd); "stage start" is the launch, the first optimizer
  step is its `step 1/` log line. At that line each rank's peak RSS so far (VmHWM) and its
  private memory (USS) and proportional share (PSS, shared pages split between the processes
  that map them) are read from /proc. The second attempt runs the same task again after
  deleting the marker and model (a restarted pod on the same node keeps its scratch volume;
  on a file:// store the tokenized examples are read in place either way).
* With no --no-results, the `## Tokenized once` section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SECTION = "## Tokenized once"
FIRST_STEP = re.compile(r"step 1/\d+ ")
WORDS = ("the model reads every answer before it writes the next token and the loss counts only "
         "assistant turns while the prompt stays masked so a long conversation teaches more than "
         "a short one because each token of the reply carries its own weight in the mean").split()
TRAINING = {"epochs": 1, "learningRate": 1e-4, "globalBatchSize": 16, "microBatchSize": 4,
            "maxLength": 512, "zeroStage": 0, "gradientCheckpointing": False, "seed": 1,
            "checkpointEvery": 0, "warmupRatio": 0.0, "maxSteps": 1}


def conversations(n: int, words: int, seed: int = 0):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    for i in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(words // 4)},
                         {"role": "assistant", "content": text(rng.randint(words // 2, words))}]
        yield {"id": f"c{i:07d}", "messages": messages}


def build(tmp: Path, n: int, words: int) -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "examples" / "tiny_model.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = tiny.build_tiny_model(tmp / "base", [" ".join(WORDS), "USER: ASSISTANT: A chat between"], seed=0)
    data = tmp / "sft.jsonl"
    with open(data, "w") as f:
        for record in conversations(n, words):
            f.write(json.dumps(record) + "\n")
    return model, data


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _ranks(root_pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(root_pid).children(recursive=True)
            if "xwin_jobs" in " ".join(p.cmdline()) and p.pid != root_pid]


def attempt(tree: Path, task_file: Path, scratch: Path) -> dict:
    """One launch: seconds to the first step line, and every rank's memory at that moment."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XWIN_WORKDIR": str(scratch),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "xwin_jobs.launch", "--standalone", "--nproc-per-node", "2",
                             "-m", "xwin_jobs", "sft", "--task", str(task_file)],
                            cwd=tree, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen: dict = {}
    tail: list[str] = []

    def read():
        for line in proc.stderr:
            tail.append(line)
            del tail[:-40]
            if "first" not in seen and FIRST_STEP.search(line):
                seen["first"] = time.monotonic() - started
                ranks = []
                for p in _ranks(proc.pid):
                    try:
                        info = p.memory_full_info()
                        ranks.append({"hwmMiB": _status_kib(p.pid, "VmHWM") / 1024,
                                      "ussMiB": info.uss / 2**20, "pssMiB": info.pss / 2**20})
                    except Exception:  # noqa: BLE001 - a process that just exited
                        pass
                seen["ranks"] = ranks

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    if code or "first" not in seen:
        raise SystemExit(f"{tree}: exit {code}\n{''.join(tail)}")
    return {"seconds": seen["first"], "ranks": seen["ranks"], "total": time.monotonic() - started}


def run_tree(name: str, tree: Path, model: Path, data: Path, tmp: Path, attempts: int) -> list[dict]:
    out = tmp / f"runs-{name}" / "t" / "bench" / "sft"
    task = {"stage": "sft", "output": f"file://{out}/", "inputs": {"model": str(model), "data": str(data)},
            "params": {"training": TRAINING}, "run": {"namespace": "t", "name": "bench"}}
    task_file = tmp / f"task-{name}.json"
    task_file.write_text(json.dumps(task))
    rows = []
    for n in range(attempts):
        for leftover in ("_SUCCESS.json", "model", "metrics.json"):
            shutil.rmtree(out / leftover, ignore_errors=True) if (out / leftover).is_dir() else \
                (out / leftover).unlink(missing_ok=True)
        row = attempt(tree, task_file, tmp / f"scratch-{name}")
        row["load"] = os.getloadavg()[0]
        print(f"{name} attempt {n + 1}: {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


def _fmt(rows: list[dict], key: str) -> str:
    values = sorted((r[key] for r in rows), reverse=True)
    return " / ".join(f"{v:.0f}" for v in values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-tree", required=True, type=Path, help="a checkout of the code before")
    p.add_argument("--conversations", type=int, default=100_000)
    p.add_argument("--words", type=int, default=120, help="the longest answer, in words")
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp_name:
        tmp = Path(tmp_name)
        model, data = build(tmp, args.conversations, args.words)
        loads = [os.getloadavg()[0]]
        results = {name: run_tree(name, tree, model, data, tmp, args.attempts)
                   for name, tree in (("before", args.before_tree), ("after", ROOT))}
        loads += [r["load"] for rows in results.values() for r in rows]
        stored = sum(f.stat().st_size for f in (tmp / "runs-after").rglob("*.arrow"))
        size = data.stat().st_size
    if args.no_results:
        return 0
    from results_md import replace_section

    meta = {"loads": (min(loads), max(loads)), "n": args.conversations, "jsonl": size, "arrow": stored}
    replace_section(SECTION, section(results, meta))
    return 0


def section(results: dict[str, list[dict]], meta: dict) -> str:
    """The RESULTS.md section of one run's numbers."""
    import textwrap

    def para(text: str) -> str:
        return textwrap.fill(text, 100, break_on_hyphens=False)

    before, after = results["before"], results["after"]
    lines = [SECTION, "", para(
        f"{_dt.date.today().isoformat()}, {platform.machine()} CPU ({os.cpu_count()} cores, shared with "
        f"other work; load average {meta['loads'][0]:.1f}-{meta['loads'][1]:.1f}), torch CPU, gloo, 2 ranks, "
        f"`python benchmarks/bench_tokenize.py --before-tree <checkout of main before issue 28> "
        f"--conversations {meta['n']}`: an `sft` stage on {meta['n']:,} synthetic multi-turn "
        f"conversations ({meta['jsonl'] / 2**20:.0f} MiB of JSON Lines; {meta['arrow'] / 2**20:.0f} MiB "
        "of tokenized Arrow files) with the tests' tiny model, maxLength 512, zeroStage 0. Time: from "
        "the launch (torchrun) to the first optimizer step's log line. Memory: each rank at that "
        "moment: peak RSS so far, PSS (pages shared between processes, e.g. the memory-mapped "
        "examples, split between them) and USS (private); the node's total is the sum of the PSS."),
        "", "| code | attempt | to first step (s) | peak RSS per rank (MiB) | PSS per rank (MiB) | "
        "USS per rank (MiB) | node total (MiB) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in results.items():
        for n, r in enumerate(rows, start=1):
            lines.append(f"| {name} | {n} | {r['seconds']:.1f} | {_fmt(r['ranks'], 'hwmMiB')} | "
                         f"{_fmt(r['ranks'], 'pssMiB')} | {_fmt(r['ranks'], 'ussMiB')} | "
                         f"{sum(x['pssMiB'] for x in r['ranks']):.0f} |")
    lines += ["", para(
        f"Second attempt: {before[-1]['seconds'] / after[-1]['seconds']:.1f}x sooner at the first step "
        f"than before ({before[-1]['seconds']:.1f} s -> {after[-1]['seconds']:.1f} s); first attempt "
        f"{before[0]['seconds'] / after[0]['seconds']:.1f}x. Before, every rank of every attempt "
        "read, validated and tokenized the whole input and held every example as Python lists: "
        f"{max(x['ussMiB'] for x in before[-1]['ranks']) / 1024:.1f} GiB private per rank here, times "
        "the ranks of a node. Now one rank per node tokenizes once (`datasets.map` over the pod's "
        "CPUs; its peak is the first attempt's larger figure) and every rank memory-maps the same "
        "Arrow files: a rank's private memory no longer holds the examples, so it does not grow "
        "with the data or with the ranks on the node (the mapped files are in the page cache once)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
