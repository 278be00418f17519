"""One stage of the plan: what a stage needs now (its marker, its dependencies, its current
attempt, its next step's children, a retry after a backoff). planner.py runs it per stage. Pure.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

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
from .types import ACTIVE, ChildState, Observed, StageView, attempt_failed



def holds_resources(c: ChildState) -> bool:
    """Whether deleting the child frees something: an active child, or a failed server
    Deployment (its pod keeps restarting, and holding its GPUs, until it is deleted)."""
    return c.phase in ACTIVE or (c.kind == "Deployment" and c.phase == "Failed")


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
    return any(c.step == step.name and c.kind == kind and c.phase == "Succeeded" for c in cs)


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
        out.append(replace(c, phase="Failed", reason="PendingTimeout", finished=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
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


def _plan_steps(view: StageView, run: AlignmentRun, task: StageTask,
                observed: Observed, config: OperatorConfig) -> None:
    """A ready, unfinished stage: its current attempt, its next step's children, retries."""
    steps = steps_of(run.spec, view.name)
    cs = view.children
    attempt = max((c.attempt for c in cs), default=0) or 1
    pending = [s for s in steps if not _is_done(run, s, steps, cs)]
    if not pending:  # every step finished, yet no marker for these inputs
        view.phase, view.reason, view.attempts = "Failed", "NoMarker", attempt
        view.message = (f"stage {view.name}: its last step finished but {task.output}_SUCCESS.json "
                        "is missing or was written for other inputs")
        return
    now = parse_time(observed.now) or datetime.now(timezone.utc)
    timed_out = [] if run.spec.suspend else _timed_out(run, steps, task, cs, attempt, now)
    view.fails += timed_out
    stopped = {(c.kind, c.name) for c in timed_out}
    cs = [next((t for t in timed_out if (t.kind, t.name) == (c.kind, c.name)), c) for c in cs]
    failed = [c for c in cs if c.attempt == attempt and c.phase == "Failed"
              and c.step in {s.name for s in pending}]
    if failed:
        text = "; ".join(_failure_text(c) for c in failed)
        permanent = [c for c in failed if c.permanent]
        if permanent:  # every attempt would fail the same way: stop now, naming why
            view.phase, view.reason, view.attempts = "Failed", permanent[0].reason or "StageFailed", attempt
            view.message = (f"stage {view.name} failed after {attempt} attempt(s), not retried "
                            f"(another attempt would fail the same way): {text}")
            view.deletes += [(c.kind, c.name) for c in cs if holds_resources(c) and (c.kind, c.name) not in stopped]
            return
        if attempt >= run.spec.retries.maxAttempts:
            view.phase, view.reason, view.attempts = "Failed", "StageFailed", attempt
            view.message = f"stage {view.name} failed after {attempt} attempt(s): {text}"
            view.deletes += [(c.kind, c.name) for c in cs if holds_resources(c) and (c.kind, c.name) not in stopped]
            return
        failed_at = max((parse_time(c.finished or c.created) for c in failed), default=None,
                        key=lambda t: t or datetime.min.replace(tzinfo=timezone.utc))
        wait = _backoff(config, attempt) - ((now - failed_at).total_seconds() if failed_at else 1e9)
        view.deletes += [(c.kind, c.name) for c in cs if c.attempt == attempt and c.phase in ACTIVE]
        # a failed server Deployment's pod restarts (and holds its GPUs, and can make the attempt
        # look alive again): stopped at 0 replicas and marked failed, kept as the attempt's record
        view.fails += [c for c in failed if c.kind == "Deployment" and c.live_pods and not c.stopped
                       and (c.kind, c.name) not in stopped]
        alive = [c for c in failed if c.live_pods]
        if wait <= 0 and alive:  # the next attempt's pods would wait for the GPUs these still hold
            view.phase, view.reason, view.attempts, view.requeue = "Running", "AttemptCleanup", attempt, FREED_WAIT
            view.message = (f"{attempt_failed(attempt, view.name)} ({text}); attempt {attempt + 1} "
                            f"starts once its pods are gone ({', '.join(f'{c.kind}/{c.name}' for c in alive)})")
            return
        if wait > 0:
            view.phase, view.reason, view.attempts, view.requeue = "Running", "Backoff", attempt, wait
            view.message = (f"{attempt_failed(attempt, view.name)} ({text}); attempt "
                            f"{attempt + 1} of {run.spec.retries.maxAttempts} starts after a "
                            f"{_backoff(config, attempt):.0f}s backoff")
            return
        # the backoff was over before this pass saw the failure (an operator that was down,
        # a short backoff): the failure is still reported once, with the next attempt
        view.failed_attempt = f"{attempt_failed(attempt, view.name)} ({text})"
        attempt += 1
    view.phase, view.reason, view.attempts = "Running", "StageRunning", attempt
    current = pending[0]
    view.message = f"stage {view.name}: step {current.name} (attempt {attempt})"
    waiting = _waiting_text(cs, attempt)
    if waiting is not None:
        view.reason, view.message = waiting[0], f"{view.message} waits: {waiting[1]}"

    def ensure(step: Step) -> None:
        view.needs_judge |= step.needs_judge
        have = {(c.kind, c.name) for c in cs}
        view.creates += [p for p in planned_children(run, view.name, step, attempt, task)
                         if (p.kind, p.name) not in have]

    if current.kind == "serve":
        ensure(current)
        sample = next(s for s in steps if s.name == current.serves)
        server = _find(cs, "Deployment", current.name, attempt)
        if server is not None and server.phase == "Running":
            ensure(sample)
            following = _next_server(steps, sample)
            if following is not None:   # its cold start overlaps this sampling: two servers at most
                ensure(following)
        else:
            view.message = f"stage {view.name}: waiting for the vLLM server (attempt {attempt})"
    else:
        ensure(current)


def stage_view(run: AlignmentRun, stage: str, task: StageTask, cs: list[ChildState],
               observed: Observed, prev: dict, views: dict[str, StageView],
               deps: list[str], config: OperatorConfig, input_problem: str | None) -> StageView:
    """One stage, ready or not: Succeeded (its marker), Failed, Waiting, or its next step."""
    view = StageView(stage, children=sorted(cs, key=lambda c: (c.attempt, c.created or "", c.name)))
    view.attempts = max((c.attempt for c in cs), default=0)
    marker = observed.markers.get(stage)
    steps = steps_of(run.spec, stage)
    last = steps[-1]
    changed: dict[str, tuple[str, str]] = {}
    if marker is not None:
        upstream, changed = inputs_now(run, task, observed, marker, config)
        matches = marker.get("digest") == task.digest(upstream)
        # a stage finished in this run is not rerun for a spec change (SpecChangeNeedsNewRun),
        # but is for an input whose content changed
        finished_here = not changed and (prev.get("phase") == "Succeeded" or any(
            c.step == last.name and c.phase == "Succeeded" for c in cs))
        # a marker that matches stale upstream markers is not done: a stage it reads is about
        # to run again (its own marker no longer matches), so this one waits and runs after it
        upstream_done = all(views[d].phase in ("Succeeded", "Skipped") for d in deps)
        if matches and upstream_done or finished_here:
            view.phase, view.marker, view.artifact = "Succeeded", marker, task.output
            view.changed = not matches
            # the job writes its marker just before it exits: its child may still show Running.
            # Let it finish (deleting it could kill it mid-exit); anything else still up goes.
            view.finishing = [c for c in cs if c.phase in ACTIVE and c.step == last.name
                              and c.attempt == view.attempts]
            view.deletes += [(c.kind, c.name) for c in cs if c.phase in ACTIVE and c not in view.finishing]
            return view
    if input_problem:
        view.phase, view.reason, view.message = "Failed", "InputNotFound", input_problem
        return view
    blocked = [d for d in deps if views[d].phase == "Failed"]
    waiting = [d for d in deps if views[d].phase not in ("Succeeded", "Skipped")]
    if blocked or waiting:
        view.reason = "Waiting"
        view.message = f"waits for stage(s) {', '.join(waiting)}"
        return view
    _plan_steps(view, run, task, observed, config)
    if changed and view.phase == "Running":
        view.message += f" ({changed_text(changed)})"
    # a server no sampler needs any more (done, or from an older attempt) is deleted at once
    for c in cs:
        if c.kind in ("Deployment", "Service") and (c.attempt < view.attempts or _is_done(
                run, next(s for s in steps if s.name == c.step), steps, cs)):
            view.deletes.append((c.kind, c.name))
    return view


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
