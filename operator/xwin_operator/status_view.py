"""A run's status as a person reads it: the table of `xwin status`, its header line, and the
progress bars and plain progress lines of `xwin run`. Pure: a status dict in (status.json, or
an AlignmentRun's `.status`), rich renderables and strings out; nothing is computed here that
the status does not hold, except a running stage's duration so far.

The status (docs/design.md 3.3) may carry live progress and cost:

    progress: {percent, etaSeconds, eta, summary}            cost: {gpuHours, judgeUSD, summary}
    stages[i].progress: {step, unit, done, total, percent, etaSeconds, rate, updatedAt,
                         metrics: {loss, learningRate, tokensPerSecond, responsesPerSecond,
                                   usd, requestsPerSecond}, stalled}
    stages[i].cost: {gpuHours, judgeUSD}

Any of these may be missing (an older status, a stage not started) or of an odd type (a
hand-edited file, another version's operator): what is there is shown, the rest left blank;
nothing here raises on a status dict, whatever it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rich.table import Table
from rich.text import Text

PHASE_STYLES = {"Succeeded": "green", "Failed": "red", "Running": "yellow", "Skipped": "cyan",
                "Suspended": "magenta", "Pending": "dim"}
UNIT_WORDS = {"steps": "steps", "prompts": "prompts", "responses": "responses", "comparisons": "comparisons"}

# A finished stage's figures a person looks at first, in this order; the rest stay in metrics.json.
HEADLINE = ("trainLoss", "heldOutAccuracy", "trainRewardAccuracy", "pairs", "ties",
            "meanMaxScore", "meanScore", "responsesPerPrompt", "steps")


# --- reading a field whatever it holds ------------------------------------------------------------


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    """A finite number (bool is not one), else None; numeric strings count (a hand-written file)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None or isinstance(value, (dict, list))
                                                 else str(value))


def _stages(status: Any) -> list[dict]:
    stages = _dict(status).get("stages")
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


# --- formatting -------------------------------------------------------------------------------------


def duration(seconds: Any) -> str:
    """45s, 13m05s, 2h13m, 3d04h; '' for no number or a negative one."""
    s = _num(seconds)
    if s is None or s < 0:
        return ""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k" if abs(value) < 1e6 else f"{value / 1e6:.1f}M"
    return f"{value:.3g}"


def _percent(progress: dict) -> float | None:
    percent = _num(progress.get("percent"))
    if percent is None:
        done, total = _num(progress.get("done")), _num(progress.get("total"))
        if done is not None and total:
            percent = 100.0 * done / total
    return None if percent is None else max(0.0, min(percent, 100.0))


def progress_text(progress: Any) -> str:
    """'41/100 steps 41%' (or what of it the progress holds)."""
    progress = _dict(progress)
    done, total = _num(progress.get("done")), _num(progress.get("total"))
    unit = _text(progress.get("unit"))
    parts = []
    if done is not None:
        parts.append(f"{_number(done)}/{_number(total)}" if total else _number(done))
        if unit:
            parts.append(unit)
    percent = _percent(progress)
    if percent is not None:
        parts.append(f"{percent:.0f}%")
    return " ".join(parts)


def eta_text(progress: Any) -> str:
    """The ETA of a stage's (or the run's) progress: its `eta` text, else `etaSeconds`, and
    'stalled' when the step has not moved for a while."""
    progress = _dict(progress)
    if progress.get("stalled") is True:
        return "stalled"
    return _text(progress.get("eta")) or duration(progress.get("etaSeconds"))


# by unit: the metrics of a step's record worth a column, each as it is shown
FIGURES: dict[str, list[tuple[str, Any]]] = {
    "steps": [("loss", lambda v: f"loss {v:.4g}"), ("tokensPerSecond", lambda v: f"{_number(v)} tok/s")],
    "prompts": [("responsesPerSecond", lambda v: f"{v:.3g} resp/s")],
    "comparisons": [("usd", lambda v: f"${v:.2f}"), ("requestsPerSecond", lambda v: f"{v:.3g} req/s")],
}


def rate_text(progress: Any) -> str:
    """The figure that fits the step's unit: training's loss, sampling's responses per second,
    judging's spend so far, else the units per second."""
    progress = _dict(progress)
    metrics, unit = _dict(progress.get("metrics")), _text(progress.get("unit"))
    parts = [show(value) for key, show in FIGURES.get(unit, [])
             if (value := _num(metrics.get(key))) is not None]
    rate = _num(progress.get("rate"))
    if not parts and rate is not None:
        parts.append(f"{rate:.3g} {unit or 'units'}/s")
    return ", ".join(parts)


def cost_text(cost: Any) -> str:
    """'$4.10, 12.3 GPU-h': the cost's `summary`, else its non-zero parts ('0' when all are 0)."""
    cost = _dict(cost)
    if _text(cost.get("summary")):
        return _text(cost["summary"])
    usd, gpu_hours = _num(cost.get("judgeUSD")), _num(cost.get("gpuHours"))
    parts = ([f"${usd:.2f}"] if usd else []) + ([f"{gpu_hours:.1f} GPU-h"] if gpu_hours else [])
    if parts:
        return ", ".join(parts)
    return "0" if usd is not None or gpu_hours is not None else ""


def headline_metrics(metrics: Any, most: int = 3) -> list[tuple[str, object]]:
    """A finished stage's first figures (HEADLINE, then evaluate's win rates)."""
    metrics = _dict(metrics)
    chosen = [(k, metrics[k]) for k in HEADLINE if k in metrics]
    chosen += [(k, v) for k, v in metrics.items() if isinstance(k, str) and k.endswith(".alpacaWinRate")]
    return chosen[:most]


def metrics_text(metrics: Any, most: int = 3) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in headline_metrics(metrics, most))


def stage_duration(stage: Any, now: datetime | None = None) -> str:
    """From startTime to completionTime, or to `now` while the stage has not finished."""
    stage = _dict(stage)
    start, end = _when(stage.get("startTime")), _when(stage.get("completionTime"))
    if start is None:
        return ""
    if end is None:
        if stage.get("phase") != "Running":
            return ""
        end = now or datetime.now(timezone.utc)
    return duration((end - start).total_seconds())


# --- the run ----------------------------------------------------------------------------------------


def header(status: Any, title: str = "") -> str:
    """One line: the run's phase and stage, its progress, ETA and cost, e.g.
    'demo/x: Running, stage dpo, 57.3% (dpo 41%), ETA 2h13m, cost $4.10, 12.3 GPU-h'."""
    status = _dict(status)
    progress, phase = _dict(status.get("progress")), _text(status.get("phase")) or "Pending"
    parts = [phase]
    if _text(status.get("stage")):
        parts.append(f"stage {_text(status['stage'])}")
    percent, summary = _num(progress.get("percent")), _text(progress.get("summary"))
    if percent is not None:
        parts.append(f"{percent:.1f}%" + (f" ({summary})" if summary else ""))
    elif summary:
        parts.append(summary)
    eta = eta_text(progress)
    if eta and phase not in ("Succeeded", "Failed"):
        parts.append(f"ETA {eta}")
    cost = cost_text(status.get("cost"))
    if cost:
        parts.append(f"cost {cost}")
    line = ", ".join(parts)
    return f"{title}: {line}" if title else line


def run_table(status: Any, now: datetime | None = None, title: str | None = None) -> Table:
    """Every stage: phase, progress, ETA, the figure of its unit (or a finished stage's
    headline metrics), cost, attempts and duration."""
    table = Table(title=title, expand=False)
    for col, justify in (("stage", "left"), ("phase", "left"), ("progress", "right"), ("ETA", "right"),
                         ("loss / rate / spend", "left"), ("cost", "right"), ("attempts", "right"),
                         ("duration", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for stage in _stages(status):
        phase = _text(stage.get("phase"))
        reason = _text(stage.get("reason"))
        shown = f"{phase} ({reason})" if reason and phase not in ("Succeeded", "Skipped") else phase
        progress = _dict(stage.get("progress"))
        running = phase == "Running"
        figure = rate_text(progress) if running or not stage.get("metrics") else metrics_text(stage.get("metrics"))
        step = _text(progress.get("step"))
        attempts = _num(stage.get("attempts"))
        table.add_row(_text(stage.get("name")) or "?",
                      Text(shown, style=PHASE_STYLES.get(phase, "")),
                      (f"{step} " if step and running else "") + progress_text(progress) if progress else "",
                      eta_text(progress) if running else "",
                      figure, cost_text(stage.get("cost")),
                      _number(attempts) if attempts is not None else "",
                      stage_duration(stage, now))
    return table


# --- progress bars of running steps -----------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One running stage's step: what a progress bar (or a plain progress line) shows."""

    stage: str
    step: str
    unit: str
    done: float | None
    total: float | None      # None: not known yet (an indeterminate bar)
    percent: float | None
    eta: str
    detail: str              # rate_text
    stalled: bool

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.step}" if self.step else self.stage

    @property
    def counts(self) -> str:
        if self.done is None:
            return "no progress yet"
        text = f"{_number(self.done)}/{_number(self.total)}" if self.total else _number(self.done)
        return f"{text} {self.unit}".rstrip()


def progress_bars(status: Any) -> list[Bar]:
    """A Bar per Running stage, in the status' order (one without progress yet, or whose job
    writes none: done None)."""
    bars = []
    for stage in _stages(status):
        if stage.get("phase") != "Running":
            continue
        progress = _dict(stage.get("progress"))
        total = _num(progress.get("total"))
        bars.append(Bar(stage=_text(stage.get("name")) or "?", step=_text(progress.get("step")),
                        unit=_text(progress.get("unit")), done=_num(progress.get("done")),
                        total=total if total and total > 0 else None, percent=_percent(progress),
                        eta=eta_text(progress), detail=rate_text(progress),
                        stalled=progress.get("stalled") is True))
    return bars


def plain_line(bar: Bar) -> str:
    """'  progress dpo/train: 41/100 steps 41%, ETA 20m34s, loss 0.61' (logs and CI)."""
    parts = [bar.counts + (f" {bar.percent:.0f}%" if bar.percent is not None else "")]
    if bar.eta:
        parts.append(bar.eta if bar.stalled else f"ETA {bar.eta}")
    if bar.detail:
        parts.append(bar.detail)
    return f"  progress {bar.key}: " + ", ".join(parts)
