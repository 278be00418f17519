"""Progress and cost of a run, as status shows them (api/status_model.py). Pure.

    uris = progress_uris(run, tasks, children)     # stage -> the live record to read this pass
    stage_progress(record, now, stall_seconds)     # a running stage's `progress`
    stage_cost(run, task, children, prev, now, judge_usd)   # a stage's `cost`
    run_progress(run, stages, now) / run_cost(stages)       # the run's, from its stages'

Where the numbers come from:
  * a stage's progress is its pods' record (xwin_jobs.progress), read by the executor for the
    step of its newest active child that is not a server; a record that does not parse is
    not in `observed.progress`, and the executor keeps the last good one;
  * a child's GPU-hours are its lifetime (creation to end, or to now while it lives) times
    its pods (nodes, replicas) times the GPUs each asks for (a pod waiting for a node counts:
    the child holds its quota); they are kept by child name in the stage's `cost.children`,
    so a deleted child's hours stay counted;
  * a judge stage's USD is what its judge step reported spent (its record's `usd`, then the
    stage's `_SUCCESS.json` metrics);
  * the run's percent weighs each stage by an estimate of its cost: its descriptor's `weight`
    (hours per GPU, relative) times the GPUs its pods ask for; its ETA extrapolates the time
    since the run's first stage started at that percent, and only while the stage in progress
    reports a rate (a run in a backoff or a queue has none, and its status does not churn).
"""

from __future__ import annotations

from typing import Any, Sequence

from xwin_jobs.progress import Progress, epoch, iso, progress_uri
from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun
from .stage_plan import step_gpu_total
from .descriptors import descriptor, steps_of
from .steps import Step
from .types import ACTIVE, DONE, ChildState, Phase

SERVER_KINDS = ("Deployment", "Service")


def _process_steps(run: AlignmentRun, stage: str) -> list[Step]:
    return [s for s in steps_of(run.spec, stage) if s.kind != "serve"]


def progress_uris(run: AlignmentRun, tasks: dict[str, StageTask],
                  children: Sequence[ChildState]) -> dict[str, str]:
    """stage -> the record of the step its newest active child (not a server) runs."""
    out: dict[str, str] = {}
    for c in sorted(children, key=lambda c: (c.attempt, c.created or "")):
        if c.kind not in SERVER_KINDS and c.phase in ACTIVE and c.stage in tasks:
            out[c.stage] = progress_uri(tasks[c.stage].output, c.step)
    return out


def stage_progress(p: Progress, now: float, stall_seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"step": p.step, "unit": p.unit, "done": p.done, "total": p.total,
                           "percent": round(100 * p.fraction, 1), "updatedAt": iso(p.updated_at)}
    eta = p.eta_seconds(now)
    if eta is not None:
        out["etaSeconds"] = int(eta)
    if p.rate > 0:
        out["rate"] = round(p.rate, 4)
    if p.metrics:
        out["metrics"] = {k: round(v, 6) for k, v in p.metrics.items()}
    if p.done < p.total and now - p.moved_at > stall_seconds:
        out["stalled"] = True
    return out


def child_gpu_hours(child: ChildState, step: Step | None, task: StageTask, now: float) -> float:
    if step is None or child.kind == "Service" or not child.created:
        return 0.0
    gpus = step_gpu_total(step, task)
    if not gpus:
        return 0.0
    end = epoch(child.finished) if child.finished else now
    return max(end - epoch(child.created), 0.0) / 3600 * gpus


def stage_cost(run: AlignmentRun, stage: str, task: StageTask, children: Sequence[ChildState],
               prev: dict[str, Any] | None, now: float, judge_usd: float = 0.0) -> dict[str, Any]:
    """GPU-hours by child (this pass's children, and those the previous status counted that
    are gone) and the judge's USD; neither is ever less than the previous status said."""
    prev = prev or {}
    steps = {s.name: s for s in steps_of(run.spec, stage)}
    by_child = {str(k): float(v) for k, v in (prev.get("children") or {}).items()}
    for c in children:
        hours = child_gpu_hours(c, steps.get(c.step), task, now)
        if hours or c.name in by_child:
            by_child[c.name] = round(max(hours, by_child.get(c.name, 0.0)), 4)
    usd = max(float(judge_usd or 0.0), float(prev.get("judgeUSD") or 0.0))
    return {"gpuHours": round(sum(by_child.values()), 4), "judgeUSD": round(usd, 4),
            "children": by_child}


def run_cost(stages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    hours = sum(float((s.get("cost") or {}).get("gpuHours") or 0) for s in stages)
    usd = sum(float((s.get("cost") or {}).get("judgeUSD") or 0) for s in stages)
    return {"gpuHours": round(hours, 4), "judgeUSD": round(usd, 4),
            "summary": f"${usd:,.2f}, {hours:,.1f} GPU-h"}


def stage_weight(run: AlignmentRun, stage: str, task: StageTask | None) -> float:
    gpus = max((step_gpu_total(s, task) for s in steps_of(run.spec, stage)), default=0) \
        if task is not None else 0
    return descriptor(stage).weight * max(gpus, 1)


def stage_fraction(run: AlignmentRun, status: dict[str, Any]) -> float:
    """How much of a stage is done: its finished process steps and its current step's share."""
    if status.get("phase") in DONE:
        return 1.0
    p = status.get("progress")
    if not p:
        return 0.0
    names = [s.name for s in _process_steps(run, status["name"])]
    index = names.index(p["step"]) if p["step"] in names else 0
    return (index + p["percent"] / 100) / max(len(names), 1)


def duration_text(seconds: float) -> str:
    """'2h13m', '41m', '3d4h', '50s'."""
    s = int(max(seconds, 0))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m" if m else f"{s}s"


def run_progress(run: AlignmentRun, tasks: dict[str, StageTask], stages: Sequence[dict[str, Any]],
                 phase: str, current: str | None, now: float) -> dict[str, Any]:
    weights = {s["name"]: stage_weight(run, s["name"], tasks.get(s["name"])) for s in stages}
    total = sum(weights.values()) or 1.0
    fraction = 1.0 if phase == Phase.SUCCEEDED else \
        sum(weights[s["name"]] * stage_fraction(run, s) for s in stages) / total
    out: dict[str, Any] = {"percent": round(100 * fraction, 1)}
    by_name = {s["name"]: s for s in stages}
    now_stage = by_name.get(current or "", {})
    if phase == Phase.SUCCEEDED:
        out["summary"] = "100%"
    elif now_stage.get("progress"):
        out["summary"] = f"{current} {now_stage['progress']['percent']:.0f}%"
    else:
        out["summary"] = current or "-"
    # while the stage in progress reports a rate only: a run waiting (a backoff, a queue)
    # has no ETA, and its status stays the same from one pass to the next
    starts = [epoch(s["startTime"]) for s in stages if s.get("startTime")]
    reporting = "etaSeconds" in (now_stage.get("progress") or {})
    if phase == Phase.RUNNING and reporting and starts and fraction >= 0.01:
        eta = (now - min(starts)) * (1 - fraction) / fraction
        out["etaSeconds"], out["eta"] = int(eta), duration_text(eta)
    return out
