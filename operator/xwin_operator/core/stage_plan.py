"""One stage of the plan: what a stage needs now (its marker, its dependencies, its current
attempt, its next step's children, a retry after a backoff), as a frozen StagePlan.

    plan = plan_stage(ctx, stage, upstream)   # ctx: PlanContext; upstream: the plans so far

planner.py builds the context once per pass and plans the stages in pipeline order. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Mapping

from xwin_jobs.cost import requested_gpus
from xwin_jobs.fingerprint import MISSING, external_inputs, short
from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun
from .children import planned_children, step_kind
from .config import OperatorConfig
from ..api.graph import stages_of
from .descriptors import steps_of
from .steps import Step
from .inputs import run_root, stage_uri
from .types import ACTIVE, DONE, ChildState, Observed, Phase, StagePlan, attempt_failed


def holds_resources(c: ChildState) -> bool:
    """Whether deleting the child frees something: an active child, or a failed server
    Deployment (its pod keeps restarting, and holding its GPUs, until it is deleted)."""
    return c.phase in ACTIVE or (c.kind == "Deployment" and c.phase == Phase.FAILED)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _is_done(run: AlignmentRun, step: Step, steps: list[Step], cs: list[ChildState]) -> bool:
    if step.kind == "serve":
        sample = next(s for s in steps if s.name == step.serves)
        return _is_done(run, sample, steps, cs)
    kind = step_kind(run, step.kind)
    return any(c.step == step.name and c.kind == kind and c.phase == Phase.SUCCEEDED for c in cs)


def _find(cs: list[ChildState], kind: str, step: str, attempt: int) -> ChildState | None:
    return next((c for c in cs if c.kind == kind and c.step == step and c.attempt == attempt), None)


DEFAULT_PENDING_TIMEOUT = {True: 3600.0, False: 900.0}  # seconds, by whether the step asks for GPUs
FREED_WAIT = 5.0  # seconds between looks while a failed attempt's pods are still going away


def step_gpus(step: Step, task: StageTask) -> int:
    """nvidia.com/gpu one pod of the step asks for (xwin_jobs.cost.SIZING)."""
    return requested_gpus(task.params, step.resources)[0]


def step_gpu_total(step: Step, task: StageTask) -> int:
    """nvidia.com/gpu all the step's pods ask for (x nodes, x replicas)."""
    return requested_gpus(task.params, step.resources)[1]


def pending_timeout(run: AlignmentRun, step: Step, task: StageTask) -> float | None:
    """scheduling.pendingTimeoutSeconds for this step (its default by GPUs); None: never."""
    value = run.spec.scheduling.pendingTimeoutSeconds
    value = DEFAULT_PENDING_TIMEOUT[step_gpus(step, task) > 0] if value is None else float(value)
    return value or None


def _timed_out(run: AlignmentRun, steps: list[Step], task: StageTask, cs: list[ChildState],
               attempt: int, now: datetime) -> list[ChildState]:
    """The current attempt's children none of whose pods started within the pending timeout,
    as failed (reason PendingTimeout, naming what kept them, e.g. Unschedulable)."""
    out = []
    for c in cs:
        step = next((s for s in steps if s.name == c.step), None)
        since = parse_time(c.waiting_since)
        limit = pending_timeout(run, step, task) if step is not None else None
        if c.attempt != attempt or since is None or limit is None or (now - since).total_seconds() <= limit:
            continue
        why = f"{c.cause}: {c.cause_message}" if c.cause else (
            "no pod of it was created or started (a missing PriorityClass, a ResourceQuota or an admission "
            f"webhook refusing its pods: `kubectl describe {c.kind.lower()} {c.name}` shows the controller's events)")
        out.append(replace(c, phase=Phase.FAILED, reason="PendingTimeout", finished=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           message=f"not started within {limit:.0f}s (spec.scheduling.pendingTimeoutSeconds): {why}"))
    return out


def _waiting_text(cs: list[ChildState], attempt: int) -> tuple[str, str] | None:
    """(reason, message) when the current attempt waits on something outside it: Kueue's
    quota (WaitingForQuota), or what keeps its pods from running (Unschedulable, ...)."""
    mine = [c for c in cs if c.attempt == attempt and c.phase in ACTIVE]
    held = next((c for c in mine if c.held), None)
    if held is not None:
        return "WaitingForQuota", f"{held.kind}/{held.name} {held.held}"
    blocked = next((c for c in mine if c.cause), None)
    if blocked is not None:
        return blocked.cause, f"{blocked.kind}/{blocked.name}: {blocked.cause_message}"
    return None


def _backoff(config: OperatorConfig, attempt: int) -> float:
    return min(config.backoff_seconds * 2 ** (attempt - 1), config.backoff_max_seconds)


def _failure_text(c: ChildState) -> str:
    why = c.reason or "Failed"
    if c.exit_code is not None:
        why += f" (exit code {c.exit_code})"
    return f"{c.kind}/{c.name}: {why}" + (f": {c.message}" if c.message else "")


def _next_server(steps: list[Step], sample: Step) -> Step | None:
    """The serve step right after `sample` (evaluate's next model), if the next step is one."""
    i = steps.index(sample)
    return steps[i + 1] if i + 1 < len(steps) and steps[i + 1].kind == "serve" else None


@dataclass(frozen=True)
class PlanContext:
    """What one pass plans every stage from (planner.plan_context builds it): the run, what
    was observed and when, the operator's settings, the stages' tasks, the previous status's
    stages by name, the stage graph, and {stage: message} for stages whose external input is
    missing."""

    run: AlignmentRun
    observed: Observed
    now: datetime                  # observed.now, parsed
    config: OperatorConfig
    tasks: Mapping[str, StageTask]
    prev: Mapping[str, dict]
    deps: Mapping[str, list[str]]
    problems: Mapping[str, str]
    same_spec: bool = False        # the previous status is of this generation


def _failed_attempt(ctx: PlanContext, plan: StagePlan, cs: list[ChildState], failed: list[ChildState],
                    stopped: set[tuple[str, str]], attempt: int) -> StagePlan:
    """The plan of a stage whose current attempt failed: Failed (a permanent failure, or the
    last attempt), Running while it backs off or its pods go away, or, its backoff already
    over, with `failed_attempt` set: the caller plans attempt+1."""
    run, name = ctx.run, plan.name
    text = "; ".join(_failure_text(c) for c in failed)
    permanent = [c for c in failed if c.permanent]
    freed = tuple((c.kind, c.name) for c in cs if holds_resources(c) and (c.kind, c.name) not in stopped)
    if permanent:  # every attempt would fail the same way: stop now, naming why
        return replace(plan, phase=Phase.FAILED, reason=permanent[0].reason or "StageFailed", attempts=attempt,
                       message=(f"stage {name} failed after {attempt} attempt(s), not retried "
                                f"(another attempt would fail the same way): {text}"),
                       deletes=plan.deletes + freed)
    if attempt >= run.spec.retries.maxAttempts:
        return replace(plan, phase=Phase.FAILED, reason="StageFailed", attempts=attempt,
                       message=f"stage {name} failed after {attempt} attempt(s): {text}",
                       deletes=plan.deletes + freed)
    now = ctx.now
    failed_at = max((parse_time(c.finished or c.created) for c in failed), default=None,
                    key=lambda t: t or datetime.min.replace(tzinfo=timezone.utc))
    wait = _backoff(ctx.config, attempt) - ((now - failed_at).total_seconds() if failed_at else 1e9)
    # a failed server Deployment's pod restarts (and holds its GPUs, and can make the attempt
    # look alive again): stopped at 0 replicas and marked failed, kept as the attempt's record
    plan = replace(plan, deletes=plan.deletes + tuple((c.kind, c.name) for c in cs
                                                      if c.attempt == attempt and c.phase in ACTIVE),
                   fails=plan.fails + tuple(c for c in failed if c.kind == "Deployment" and c.live_pods
                                            and not c.stopped and (c.kind, c.name) not in stopped))
    alive = [c for c in failed if c.live_pods]
    if wait <= 0 and alive:  # the next attempt's pods would wait for the GPUs these still hold
        return replace(plan, phase=Phase.RUNNING, reason="AttemptCleanup", attempts=attempt, requeue=FREED_WAIT,
                       message=(f"{attempt_failed(attempt, name)} ({text}); attempt {attempt + 1} starts "
                                f"once its pods are gone ({', '.join(f'{c.kind}/{c.name}' for c in alive)})"))
    if wait > 0:
        return replace(plan, phase=Phase.RUNNING, reason="Backoff", attempts=attempt, requeue=wait,
                       message=(f"{attempt_failed(attempt, name)} ({text}); attempt "
                                f"{attempt + 1} of {run.spec.retries.maxAttempts} starts after a "
                                f"{_backoff(ctx.config, attempt):.0f}s backoff"))
    # the backoff was over before this pass saw the failure (an operator that was down,
    # a short backoff): the failure is still reported once, with the next attempt
    return replace(plan, failed_attempt=f"{attempt_failed(attempt, name)} ({text})")


def _plan_steps(ctx: PlanContext, plan: StagePlan, task: StageTask, steps: list[Step]) -> StagePlan:
    """A ready, unfinished stage: its current attempt, its next step's children, retries."""
    run, name = ctx.run, plan.name
    cs = list(plan.children)
    attempt = max((c.attempt for c in cs), default=0) or 1
    pending = [s for s in steps if not _is_done(run, s, steps, cs)]
    if not pending:  # every step finished, yet no marker for these inputs
        return replace(plan, phase=Phase.FAILED, reason="NoMarker", attempts=attempt,
                       message=(f"stage {name}: its last step finished but {task.output}_SUCCESS.json "
                                "is missing or was written for other inputs"))
    timed_out = [] if run.spec.suspend else _timed_out(run, steps, task, cs, attempt, ctx.now)
    if timed_out:
        plan = replace(plan, fails=plan.fails + tuple(timed_out))
    stopped = {(c.kind, c.name) for c in timed_out}
    cs = [next((t for t in timed_out if (t.kind, t.name) == (c.kind, c.name)), c) for c in cs]
    failed = [c for c in cs if c.attempt == attempt and c.phase == Phase.FAILED
              and c.step in {s.name for s in pending}]
    if failed:
        plan = _failed_attempt(ctx, plan, cs, failed, stopped, attempt)
        if not plan.failed_attempt:
            return plan
        attempt += 1
    current = pending[0]
    message = f"stage {name}: step {current.name} (attempt {attempt})"
    reason, waiting = "StageRunning", _waiting_text(cs, attempt)
    if waiting is not None:
        reason, message = waiting[0], f"{message} waits: {waiting[1]}"
    wanted = [current]
    if current.kind == "serve":
        sample = next(s for s in steps if s.name == current.serves)
        server = _find(cs, "Deployment", current.name, attempt)
        if server is not None and server.phase == Phase.RUNNING:
            following = _next_server(steps, sample)   # its cold start overlaps this sampling
            wanted += [sample] + ([following] if following is not None else [])
        else:
            message = f"stage {name}: waiting for the vLLM server (attempt {attempt})"
    have = {(c.kind, c.name) for c in cs}
    creates = tuple(p for step in wanted for p in planned_children(run, name, step, attempt, task)
                    if (p.kind, p.name) not in have)
    return replace(plan, phase=Phase.RUNNING, reason=reason, message=message, attempts=attempt,
                   creates=plan.creates + creates,
                   needs_judge=plan.needs_judge or any(s.needs_judge for s in wanted))


def plan_stage(ctx: PlanContext, stage: str, upstream: Mapping[str, StagePlan]) -> StagePlan:
    """One (non-reused) stage, ready or not: Succeeded (its marker), Failed, Waiting (on the
    stages it reads, planned before it: `upstream`), or its next step."""
    task, prev = ctx.tasks[stage], ctx.prev.get(stage, {})
    seen = [c for c in ctx.observed.children if c.stage == stage]
    attempts = max((c.attempt for c in seen), default=0)
    children = tuple(sorted(seen, key=lambda c: (c.attempt, c.created or "", c.name)))
    marker = ctx.observed.markers.get(stage)
    steps = steps_of(ctx.run.spec, stage)
    last, deps = steps[-1], ctx.deps[stage]
    changed: dict[str, tuple[str, str]] = {}
    if marker is not None:
        digests, changed = inputs_now(ctx.run, task, ctx.observed, marker, ctx.config)
        matches = marker.get("digest") == task.digest(digests)
        # a stage finished in this run is not rerun for a spec change (SpecChangeNeedsNewRun),
        # but is for an input whose content changed
        finished_here = not changed and (prev.get("phase") == Phase.SUCCEEDED or any(
            c.step == last.name and c.phase == Phase.SUCCEEDED for c in seen))
        # a marker that matches stale upstream markers is not done: a stage it reads is about
        # to run again (its own marker no longer matches), so this one waits and runs after it
        upstream_done = all(upstream[d].phase in DONE for d in deps)
        if matches and upstream_done or finished_here:
            # the job writes its marker just before it exits: its child may still show Running.
            # Let it finish (deleting it could kill it mid-exit); anything else still up goes.
            finishing = tuple(c for c in seen if c.phase in ACTIVE and c.step == last.name
                              and c.attempt == attempts)
            return StagePlan(stage, Phase.SUCCEEDED, attempts, task.output, children, marker, changed=not matches,
                             finishing=finishing, deletes=tuple((c.kind, c.name) for c in seen
                                                                if c.phase in ACTIVE and c not in finishing))
    if ctx.problems.get(stage):
        return StagePlan(stage, Phase.FAILED, attempts, children=children, reason="InputNotFound",
                         message=ctx.problems[stage])
    waiting = [d for d in deps if upstream[d].phase not in DONE]
    if waiting:
        return StagePlan(stage, attempts=attempts, children=children, reason="Waiting",
                         message=f"waits for stage(s) {', '.join(waiting)}")
    plan = _plan_steps(ctx, StagePlan(stage, attempts=attempts, children=children), task, steps)
    if changed and plan.phase == Phase.RUNNING:
        plan = replace(plan, message=f"{plan.message} ({changed_text(changed)})")
    # a server no sampler needs any more (done, or from an older attempt) is deleted at once
    stale = tuple((c.kind, c.name) for c in seen if c.kind in ("Deployment", "Service") and (
        c.attempt < plan.attempts or _is_done(ctx.run, next(s for s in steps if s.name == c.step), steps, seen)))
    return replace(plan, deletes=plan.deletes + stale) if stale else plan


def _marker_stages(run: AlignmentRun, task: StageTask, config: OperatorConfig) -> dict[str, str]:
    root = run_root(run.spec, run.metadata.namespace, run.metadata.name, config.store or None)
    by_uri = {stage_uri(root, s): s for s in stages_of(run.spec)}
    return {uri: by_uri.get(uri, uri) for uri in task.markers}


def inputs_now(run: AlignmentRun, task: StageTask, observed: Observed, marker: dict | None,
               config: OperatorConfig) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """What the stage's inputs are now, as `xwin_jobs.task.upstream_digests` gives them to the
    job (the upstream markers' digests by stage folder, the external inputs' fingerprints by
    URI), and {input name: (fingerprint recorded in `marker`, fingerprint now)} for each
    external input whose content changed. An input the executor cannot see, or that is gone,
    keeps the fingerprint the marker recorded (a deleted input fails only a stage that must
    read it again)."""
    upstream = {uri: str((observed.markers.get(s) or {}).get("digest", ""))
                for uri, s in _marker_stages(run, task, config).items()}
    recorded = (marker or {}).get("inputDigests") or {}
    changed: dict[str, tuple[str, str]] = {}
    for name, uri in external_inputs(task).items():
        now = observed.fingerprints.get(uri)
        if now is None or (now == MISSING and uri in recorded):
            now = recorded.get(uri)
        if now is None:
            continue  # a marker from before fingerprints, and an input this executor cannot see
        upstream[uri] = now
        if uri in recorded and recorded[uri] != now:
            changed[name] = (recorded[uri], now)
    return upstream, changed


def changed_text(changed: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{name} changed ({short(old)} -> {short(new)})" for name, (old, new) in changed.items())
