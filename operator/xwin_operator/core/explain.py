"""Which stages a run would run now, and why: `xwin run --dry-run`. Pure.

    explain(run, observed, config) -> {stage: "skip: done for the same inputs" | "run: ..."}

The same walk the planner makes (planner.walk, on what the executor observed: markers and the
external inputs' fingerprints, no children), worded for a person: a stage runs because it has
no marker, because an input's content changed (`sft: data changed (sha256:ab12cd34 ->
sha256:cd34ef56)`), because a stage it reads runs again, or because its settings changed.
"""

from __future__ import annotations

from ..api.graph import dependencies, stages_of
from ..api.spec import AlignmentRun
from .config import OperatorConfig
from .planner import stage_tasks, walk
from .stage_plan import changed_text, inputs_now
from .types import Observed, Phase


def explain(run: AlignmentRun, observed: Observed, config: OperatorConfig) -> dict[str, str]:
    tasks = stage_tasks(run, config)
    plans = walk(run, observed, None, config, tasks)
    deps = dependencies(run.spec)
    out: dict[str, str] = {}
    for stage in stages_of(run.spec):
        plan = plans[stage]
        if plan.phase == Phase.SKIPPED:
            out[stage] = f"reuse: {plan.message}"
            continue
        if plan.phase == Phase.SUCCEEDED:
            out[stage] = "skip: done for the same inputs"
            continue
        if plan.phase == Phase.FAILED:
            out[stage] = f"fail: {plan.message}"
            continue
        marker = observed.markers.get(stage)
        rerun = [d for d in deps[stage] if not out.get(d, "").startswith(("skip", "reuse"))]
        if marker is None:
            out[stage] = "run: no _SUCCESS.json yet"
            continue
        _, changed = inputs_now(run, tasks[stage], observed, marker, config)
        if changed:
            out[stage] = f"run: {changed_text(changed)}"
        elif rerun:
            out[stage] = f"run: after {', '.join(rerun)} (a stage it reads runs again)"
        else:
            out[stage] = "run: its settings changed since its _SUCCESS.json"
    return out
