"""The evaluate stage's figures: one model's summary from its judgments, and the paper's table.

`summarize_model(plan, judgments, pass_grade)` turns the stored verdicts of one model into
(summary, per-item details):

- alpacaEval: the win rate against the reference (each prompt judged in both orders, ties
  half; an answer identical to the reference is a tie that costs no judging), with a 95%
  bootstrap interval over prompts;
- mtBench: the mean 1-10 grade over both turns, with its interval (questions resampled whole),
  per-turn means and the histogram; with `pass_grade`, accuracy: the share of graded answers
  at or above it (10 with an exact grader: exactly right), with its interval.

`paper_table(report)` gives the rows of the Xwin-LM paper's table (one per model, in the
order evaluated) from a report; `recipe_figures(markers)` the reward model's held-out accuracy
and the best-of-N statistics from those stages' markers.

Pure.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .aggregate import grade_summary, win_share
from .intervals import summary
from .verdict import SingleVerdict, verdict_from_dict

IDENTICAL = "identical"   # an alpaca item whose answer is the reference itself: a tie, not asked


def _alpaca(items: Sequence[tuple], judgments: Mapping[str, dict]) -> tuple[dict, list[dict]]:
    details, shares = [], []
    for pid, fwd, bwd in items:
        if fwd is None:   # identical to the reference
            share, verdicts = 0.5, [IDENTICAL, IDENTICAL]
        else:
            f, b = judgments.get(fwd.key), judgments.get(bwd.key)
            verdicts = [(f or {}).get("verdict"), (b or {}).get("verdict")]
            share = win_share(verdict_from_dict("pairwise", verdicts[0]),
                              verdict_from_dict("pairwise", verdicts[1]))
        if share is not None:
            shares.append(share)
        details.append({"benchmark": "alpaca", "id": pid, "winShare": share, "verdicts": verdicts})
    s = summary([[x] for x in shares])
    return {"winRate": s["mean"], "ci": s["ci"], "judged": len(shares),
            "unparseable": len(items) - len(shares), "wins": sum(x > 0.5 for x in shares),
            "ties": sum(x == 0.5 for x in shares), "losses": sum(x < 0.5 for x in shares)}, details


def _mt_bench(items: Sequence[tuple], judgments: Mapping[str, dict],
              pass_grade: int | None) -> tuple[dict, list[dict]]:
    details: list[dict] = []
    turns: dict[str, list] = {"1": [], "2": []}
    by_question: dict[str, list[float]] = {}
    for item, req, _ in items:
        e = judgments.get(req.key)
        v = verdict_from_dict("single", e and e.get("verdict"))
        question, turn = item.rsplit(":", 1)
        turns[turn].append(v)
        grades = by_question.setdefault(question, [])
        if isinstance(v, SingleVerdict):
            grades.append(v.score)
        details.append({"benchmark": "mtbench", "id": item, "verdict": (e or {}).get("verdict")})
    overall = grade_summary(turns["1"] + turns["2"])
    grades = summary(list(by_question.values()))
    out = {"mean": overall["mean"], "ci": grades["ci"], "turn1": grade_summary(turns["1"])["mean"],
           "turn2": grade_summary(turns["2"])["mean"], "graded": overall["graded"],
           "questions": grades["n"], "unparseable": overall["unparseable"],
           "histogram": overall["histogram"]}
    if pass_grade is not None:
        passed = summary([[float(g >= pass_grade) for g in gs] for gs in by_question.values()])
        out.update(accuracy=passed["mean"], accuracyCI=passed["ci"], passGrade=pass_grade)
    return out, details


def summarize_model(plan: Mapping[str, list], judgments: Mapping[str, dict[str, Any]],
                    pass_grade: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-item details) of one model from the stored judgments. `plan` holds
    "alpaca" items (prompt id, forward request, backward request; both None when the answer is
    the reference itself) and "mtbench" items ("<question id>:<turn>", request, None)."""
    alpaca = mt = None
    details: list[dict] = []
    if plan["alpaca"]:
        alpaca, d = _alpaca(plan["alpaca"], judgments)
        details += d
    if plan["mtbench"]:
        mt, d = _mt_bench(plan["mtbench"], judgments, pass_grade)
        details += d
    return {"alpacaEval": alpaca, "mtBench": mt}, details


def recipe_figures(markers: Mapping[str, dict | None]) -> dict[str, Any]:
    """The reward model's held-out pair accuracy and the best-of-N statistics (mean reward of
    a random sample vs of the one the reward model selects), from those stages' markers."""
    out: dict[str, Any] = {}
    rm = (markers.get("rewardModel") or {}).get("metrics") or {}
    if "heldOutAccuracy" in rm:
        out["rewardModel"] = {"heldOutAccuracy": rm["heldOutAccuracy"],
                              "heldOutPairs": rm.get("heldOutPairs")}
    bon = (markers.get("bestOfN") or {}).get("metrics") or {}
    if "meanScore" in bon:
        out["bestOfN"] = {"randomSampleMeanScore": bon["meanScore"],
                          "selectedMeanScore": bon.get("meanMaxScore"),
                          "responsesPerPrompt": bon.get("responsesPerPrompt")}
    return out


# (column key, label, where in a model's summary, what kind of number)
COLUMNS = (("grade", "MT-bench grade", ("mtBench", "mean", "ci"), "grade"),
           ("winRate", "win rate vs {reference}", ("alpacaEval", "winRate", "ci"), "share"),
           ("accuracy", "accuracy", ("mtBench", "accuracy", "accuracyCI"), "share"))


def paper_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model: {"model", <column>: value, <column>CI: [lo, hi]} for the columns
    the report has figures for."""
    rows = []
    for name, m in report.get("models", {}).items():
        row: dict[str, Any] = {"model": name}
        for key, _, (part, value, ci), _ in COLUMNS:
            figures = m.get(part) or {}
            if figures.get(value) is not None:
                row[key], row[f"{key}CI"] = figures[value], figures.get(ci)
        rows.append(row)
    return rows
