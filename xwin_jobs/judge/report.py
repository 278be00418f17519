"""The evaluate stage's report: the paper's table in Markdown (and for a terminal) and PNG plots.

`render_markdown(report)` and `render_table(report)` are pure; `write_plots(report, folder)`
draws with matplotlib's Agg backend (no display needed), imported only when called:
`pipeline.png` (each figure along the pipeline with its 95% interval as error bars) and
`mtbench.png` (grade histograms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .table import COLUMNS, paper_table


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _with_ci(value: float | None, ci: Sequence[float] | None, kind: str) -> str:
    fmt = _pct if kind == "share" else _num
    if value is None:
        return "n/a"
    return fmt(value) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _columns(report: dict[str, Any], rows: list[dict]) -> list[tuple[str, str, str]]:
    ref = (report.get("reference") or "reference").rstrip("/").rsplit("/", 1)[-1]
    return [(key, label.format(reference=ref), kind) for key, label, _, kind in COLUMNS
            if any(key in r for r in rows)]


def render_table(report: dict[str, Any]) -> list[str]:
    """The paper's table as Markdown lines: one row per model, every figure with its 95%
    interval, then the reward model's and best-of-N's figures when the run has them."""
    rows = report.get("table") or paper_table(report)
    cols = _columns(report, rows)
    lines = ["| model | " + " | ".join(label for _, label, _ in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(
            _with_ci(r.get(key), r.get(f"{key}CI"), kind) for key, _, kind in cols) + " |")
    recipe = report.get("recipe") or {}
    if "rewardModel" in recipe:
        rm = recipe["rewardModel"]
        lines += ["", f"Reward model held-out pair accuracy: {_pct(rm['heldOutAccuracy'])}"
                      + (f" ({rm['heldOutPairs']} pairs)" if rm.get("heldOutPairs") else "") + "."]
    if "bestOfN" in recipe:
        b = recipe["bestOfN"]
        lines += ["", f"Best-of-N: mean reward of a random sample {_num(b['randomSampleMeanScore'])}, "
                      f"of the one the reward model selects {_num(b['selectedMeanScore'])}."]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    judge = report.get("judge", {})
    lines = ["# Evaluation", "",
             f"Judge: `{judge.get('model')}` ({judge.get('mode')}), templates "
             f"{', '.join(judge.get('templates', []))}, estimated cost "
             f"${judge.get('estimatedCostUSD', 0):.4f}.", "",
             "MT-bench grade: mean 1-10 grade over both turns. Win rate: AlpacaEval-style, against "
             f"{report.get('reference') or 'the reference'}, each prompt judged in both orders, ties "
             "counted as half. Accuracy: share of MT-bench answers graded at least "
             f"{report.get('passGrade') or 'the pass grade'}. In brackets: 95% bootstrap intervals "
             "over prompts.", ""]
    lines += render_table(report)
    lines += ["", "| model | wins / ties / losses | judged | turn 1 | turn 2 | graded |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in report.get("models", {}).items():
        a, t = m.get("alpacaEval") or {}, m.get("mtBench") or {}
        wtl = f"{a['wins']} / {a['ties']} / {a['losses']}" if a else "n/a"
        lines.append(f"| {name} | {wtl} | {a.get('judged', 'n/a')} | {_num(t.get('turn1'))} | "
                     f"{_num(t.get('turn2'))} | {t.get('graded', 'n/a')} |")
    return "\n".join(lines + render_cost(report.get("cost"))) + "\n"


def render_cost(cost: dict[str, Any] | None) -> list[str]:
    """The report's cost section: GPU-hours and judge USD by stage, and the run's total."""
    if not cost:
        return []
    lines = ["", "## Cost", "",
             "GPU-hours: each step's finishing attempt, from its start to its end, times the GPUs "
             "its pods ask for (the run's status also counts failed attempts and pods waiting "
             "for nodes). Judge USD: estimated from the judge's token counts.", "",
             "| stage | GPU-hours | judge USD |", "| --- | ---: | ---: |"]
    rows = [*cost.get("stages", {}).items(), ("**total**", cost.get("total") or {})]
    for name, c in rows:
        hours = c.get("gpuHours")
        lines.append(f"| {name} | {'n/a' if hours is None else f'{hours:.2f}'} | "
                     f"{float(c.get('judgeUSD') or 0):.4f} |")
    return lines


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """pipeline.png (each figure per model, in pipeline order, with error bars) and
    mtbench.png (grade histograms); only those with data. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = report.get("table") or paper_table(report)
    cols = _columns(report, rows)
    if rows and cols:
        fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.5), squeeze=False)
        for ax, (key, label, kind) in zip(axes[0], cols):
            have = [r for r in rows if r.get(key) is not None]
            scale = 100 if kind == "share" else 1
            xs = list(range(len(have)))
            ys = [scale * r[key] for r in have]
            err = [[scale * (r[key] - (r.get(f"{key}CI") or [r[key]] * 2)[0]) for r in have],
                   [scale * ((r.get(f"{key}CI") or [r[key]] * 2)[1] - r[key]) for r in have]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=5, color="#4C72B0")
            ax.set_xticks(xs, [r["model"] for r in have], rotation=15)
            ax.set_ylim(*((0, 100) if kind == "share" else (1, 10)))
            ax.set_title(label + (" (%)" if kind == "share" else ""))
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("along the pipeline, with 95% intervals")
        fig.tight_layout()
        path = folder / "pipeline.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    models = report.get("models", {})
    grades = {n: m["mtBench"] for n, m in models.items() if m.get("mtBench") and m["mtBench"].get("graded")}
    if grades:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(grades)
        for i, (name, t) in enumerate(grades.items()):
            xs = [k + (i - (len(grades) - 1) / 2) * width for k in range(1, 11)]
            ax.bar(xs, [t["histogram"][str(k)] for k in range(1, 11)], width=width,
                   label=f"{name} (mean {t['mean']:.2f})")
        ax.set_xticks(range(1, 11))
        ax.set_xlabel("grade")
        ax.set_ylabel("answers")
        ax.set_title("MT-bench-style grades (both turns)")
        ax.legend()
        fig.tight_layout()
        path = folder / "mtbench.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
