"""The tables of bench_train_trl.py: per shape, both sides' medians and the compute floor; its
section of RESULTS.md ("## Training vs TRL")."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
from pathlib import Path

from train_shapes import SHAPES, describe, floor_rate, floor_seconds

HERE = Path(__file__).resolve().parent
SECTION = "## Training vs TRL"
# issue 27: whole process, TRL / ours, median of alternating rounds, every shape, equal loss
TARGETS = {"sft": 1.8, "rewardModel": 2.0, "dpo": 2.5}
FLOOR_TARGET = 0.5  # training at >= 50% of the measured matmul rate on the largest shape
SIDES = {"ours": "xwin", "trl": "TRL 1.16"}
KEYS = ("wall", "train", "ref", "rss", "first", "loss", "last", "efficiency", "fed", "load_before", "load_after")


def _median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def summary(res: dict) -> dict[tuple[str, str], dict]:
    """Per (shape, stage): each side's medians, tokens/s, FLOP/s and floor share; the ratios."""
    out = {}
    for (shape, stage), sides in res["runs"].items():
        w = res["workload"].get((shape, stage))
        rates = res["matmul"].get(shape, {}).get("rates")
        row: dict = {}
        for side, runs in sides.items():
            if not runs:
                continue
            r = {k: _median(x.get(k) for x in runs) for k in KEYS}
            r["walls"] = [x["wall"] for x in runs]
            r["trains"] = [x["train"] for x in runs]
            if w:
                r["tps"] = w["real"] / r["train"]
                r["fps"] = r["fed"] / r["train"]
                r["gflops"] = sum(w["flops"].values()) / r["train"] / 1e9
            if w and rates:
                r["floor_share"] = floor_seconds(w["flops"], rates) / r["train"]
            row[side] = r
        if "trl" in row and "ours" in row:
            row["ratio"] = row["trl"]["wall"] / row["ours"]["wall"]
            row["train_ratio"] = row["trl"]["train"] / row["ours"]["train"]
        out[(shape, stage)] = row
    return out


def _f(v: float, fmt: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def shape_table(res: dict, shape: str, s: dict) -> str:
    lines = ["| stage | side | whole process (s), median: rounds | training (s), median: rounds | "
             "real tokens/s (training) | positions fed/s | padding efficiency | peak RSS (MiB) | "
             "loss first / mean / last | load before -> after | TRL ÷ ours, whole (target) | TRL ÷ ours, training |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for (sh, stage), row in s.items():
        if sh != shape:
            continue
        for side in ("ours", "trl"):
            if side not in row:
                continue
            r = row[side]
            ratio = train_ratio = ""
            if side == "ours" and "ratio" in row:
                ok = "met" if row["ratio"] >= TARGETS[stage] else "NOT met"
                ratio = f"{row['ratio']:.2f}x (>= {TARGETS[stage]}x: {ok})"
                train_ratio = f"{row['train_ratio']:.2f}x"
            ref = f" (+{r['ref']:.1f} ref. pass)" if stage == "dpo" and not math.isnan(r["ref"]) else ""
            lines.append(
                f"| {stage} | {SIDES[side]} | {_f(r['wall'])}: {', '.join(_f(x) for x in r['walls'])} | "
                f"{_f(r['train'])}{ref}: {', '.join(_f(x) for x in r['trains'])} | {_f(r.get('tps'), ',.0f')} | "
                f"{_f(r.get('fps'), ',.0f')} | {_f(r['efficiency'], '.3f')} | {_f(r['rss'], '.0f')} | "
                f"{_f(r['first'], '.4f')} / {_f(r['loss'], '.4f')} / {_f(r['last'], '.4f')} | "
                f"{_f(r['load_before'])} -> {_f(r['load_after'])} | {ratio} | {train_ratio} |")
    return "\n".join(lines)


def floor_table(res: dict, shape: str, s: dict) -> str:
    m = res["matmul"].get(shape)
    if not m:
        return "(no matmul measurement for this shape)"
    rates = m["rates"]
    sh = SHAPES[shape]
    head = f"[T x {sh['hidden']}] @ [{sh['hidden']} x V]"
    lines = [f"Compute floor: fp32 torch.mm, T = {m['tokens']}, {m['threads']} thread(s), better of before/after "
             f"the shape's runs: [T x h] @ [h x h] {rates['proj'] / 1e9:.1f} GFLOP/s, [T x h] @ [h x i] "
             f"{rates['mlp'] / 1e9:.1f} GFLOP/s, LM head {head} {rates['head'] / 1e9:.1f} GFLOP/s.", "",
             "| stage | training FLOPs (G) | of which LM head | matmul rate of the mix (GFLOP/s) | floor (s) | "
             "xwin: GFLOP/s, % of floor | TRL: GFLOP/s, % of floor |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for (shp, stage), row in s.items():
        w = res["workload"].get((shp, stage))
        if shp != shape or not w:
            continue
        flops = w["flops"]
        cells = []
        for side in ("ours", "trl"):
            r = row.get(side)
            cells.append(f"{_f(r.get('gflops'))}, {_f(100 * r.get('floor_share', float('nan')), '.0f')}%"
                         if r else "")
        total = sum(flops.values())
        lines.append(f"| {stage} | {total / 1e9:,.0f} | {100 * flops['head'] / total:.0f}% | "
                     f"{floor_rate(flops, rates) / 1e9:.1f} | {floor_seconds(flops, rates):.1f} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def verdicts(res: dict, s: dict) -> list[str]:
    out = []
    for (shape, stage), row in s.items():
        if "ratio" in row:
            rss = "<=" if row["ours"]["rss"] <= row["trl"]["rss"] else "> (NOT met)"
            out.append(f"{shape} {stage}: {row['ratio']:.2f}x whole, {row['train_ratio']:.2f}x training "
                       f"(target {TARGETS[stage]}x: {'met' if row['ratio'] >= TARGETS[stage] else 'NOT met'}); "
                       f"peak RSS {row['ours']['rss']:.0f} {rss} TRL's {row['trl']['rss']:.0f} MiB")
    largest = [sh for sh in SHAPES if any(k[0] == sh for k in s)][-1:]
    for (shape, stage), row in s.items():
        if shape in largest and "ours" in row and "floor_share" in row["ours"]:
            share = row["ours"]["floor_share"]
            out.append(f"{shape} {stage}: xwin trains at {100 * share:.0f}% of the matmul floor "
                       f"(target >= {100 * FLOOR_TARGET:.0f}%: {'met' if share >= FLOOR_TARGET else 'NOT met'})")
    return out


def tables(res: dict) -> str:
    s = summary(res)
    shapes = [sh for sh in SHAPES if any(k[0] == sh for k in s)]
    parts = []
    for shape in shapes:
        vocab = next((w["vocab"] for (sh, _), w in res["workload"].items() if sh == shape), 0)
        parts += [f"### {describe(shape, vocab)}", "", shape_table(res, shape, s), "", floor_table(res, shape, s), ""]
    parts += ["Against issue 27's targets:", ""] + [f"- {v}" for v in verdicts(res, s)]
    return "\n".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(res: dict, command: str, threads: set[int]) -> None:
    import torch

    from results_md import replace_section

    loads = [x[k] for sides in res["runs"].values() for runs in sides.values() for x in runs
             for k in ("load_before", "load_after")]
    work = "; ".join(f"{stage}: {w['rows']} examples, {w['real']:,} real tokens, {w['labelled']:,} labelled"
                     for (shape, stage), w in res["workload"].items() if shape == next(iter(res["workload"]))[0])
    from bench_train_trl import BETA, HP, LEARNING_RATE, MICRO_BATCH_TOKENS

    body = "\n".join([
        SECTION, "",
        f"{command} on {os.cpu_count()} CPU cores ({cpu_name()}; "
        f"1-minute load average before/after each run {min(loads):.1f}-{max(loads):.1f}, median "
        f"{statistics.median(loads):.1f}), OMP_NUM_THREADS = MKL_NUM_THREADS = "
        f"{', '.join(map(str, sorted(threads)))} for both sides, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {_dt.date.today().isoformat()}. Long-tailed lengths up to maxLength "
        f"{HP['maxLength']}; {work} (the same token ids on every shape). One epoch, global batch "
        f"{HP['globalBatchSize']}, micro-batches of {HP['microBatchSize']} (TRL) / length-grouped and "
        f"packed under microBatchTokens {MICRO_BATCH_TOKENS} (ours), learning rates "
        + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATE.items())
        + f", DPO beta {BETA}. Whole process: start to exit, model saved; training: the optimizer-step "
        "loop (ours: log timestamps; TRL: train_runtime), DPO's reference pass beside it; medians of "
        "alternating rounds. Real tokens/s = the workload's real tokens / training time; padding "
        "efficiency = real / fed positions of the training batches. FLOPs and the floor: "
        "benchmarks/train_shapes.py. Losses differ only by data order (each side's own seeded "
        "sampler) and float rounding.",
        "", tables(res), "",
    ])
    replace_section(SECTION, body, HERE / "RESULTS.md")
