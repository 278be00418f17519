"""The evaluate stage's report: a Markdown table (one row per model) and PNG plots.

`render_markdown(report)` is pure; `write_plots(report, folder)` draws with matplotlib's
Agg backend (no display needed), imported only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    judge = report.get("judge", {})
    lines = ["# Evaluation", "",
             f"Judge: `{judge.get('model')}` ({judge.get('mode')}), templates "
             f"{', '.join(judge.get('templates', []))}, estimated cost "
             f"${judge.get('estimatedCostUSD', 0):.4f}.", "",
             "AlpacaEval: win rate against the reference outputs, each prompt judged in both "
             "orders, ties counted as half. MT-bench: mean 1-10 grade over both turns.", "",
             "| model | AlpacaEval win rate | ± stderr | wins / ties / losses | judged | "
             "MT-bench | turn 1 | turn 2 | graded |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in report.get("models", {}).items():
        a, t = m.get("alpacaEval") or {}, m.get("mtBench") or {}
        wtl = f"{a['wins']} / {a['ties']} / {a['losses']}" if a else "n/a"
        lines.append(f"| {name} | {_pct(a.get('winRate'))} | {_pct(a.get('stderr'))} | {wtl} | "
                     f"{a.get('judged', 'n/a')} | {_num(t.get('mean'))} | {_num(t.get('turn1'))} | "
                     f"{_num(t.get('turn2'))} | {t.get('graded', 'n/a')} |")
    return "\n".join(lines) + "\n"


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """winrate.png (AlpacaEval win rate per model) and mtbench.png (grade histograms);
    only those with data. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    models = report.get("models", {})
    written: list[Path] = []
    rates = {n: m["alpacaEval"] for n, m in models.items() if m.get("alpacaEval") and
             m["alpacaEval"].get("winRate") is not None}
    if rates:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rates) + 2), 3.5))
        names = list(rates)
        ax.bar(names, [100 * rates[n]["winRate"] for n in names],
               yerr=[100 * (rates[n].get("stderr") or 0) for n in names], capsize=4,
               color="#4C72B0")
        ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylim(0, 100)
        ax.set_ylabel("win rate vs reference (%)")
        ax.set_title("AlpacaEval-style win rate")
        fig.tight_layout()
        path = folder / "winrate.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
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
