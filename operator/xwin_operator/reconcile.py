"""The planner's logic (see planner.py for the API and the rules it implements).

Two passes: `_walk` looks at every stage in pipeline order and proposes what each one needs
(create the next step's children, retry after a backoff, delete a server whose sampler is
done); `reconcile` then applies run-wide rules (a failed stage stops the run and frees its
GPUs, suspend suspends instead of creating, missing Secrets hold creates back) and appends the
status patch and Events computed by status.py. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from xwin_jobs.task import StageTask

from .builders import LABEL_ATTEMPT, LABEL_STAGE, LABEL_STEP, OperatorConfig, build_step, child_name, step_kind
from .graph import dependencies, stage_references, stages_of
from .planner import (Action, ChildState, CreateChild, DeleteChild, Observed, RequeueAfter,
                      SuspendChild, secret_refs)
from .spec import AlignmentRun, is_uri
from .steps import Step, steps_of
from .tasks import run_root, stage_task, stage_uri

ACTIVE = ("Pending", "Running")


@dataclass
class StageView:
    """What the planner concluded about one stage (status.py turns it into status)."""

    name: str
    phase: str = "Pending"        # Pending | Running | Succeeded | Failed | Suspended | Skipped
    attempts: int = 0
    artifact: str | None = None
    children: list[ChildState] = field(default_factory=list)
    marker: dict | None = None
    reason: str = ""              # machine-readable: Waiting, StageRunning, Backoff, ...
    message: str = ""
    changed: bool = False         # finished, but the spec now asks for something else
    creates: list[dict] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    requeue: float | None = None
    needs_judge: bool = False     # the creates reference judge.apiKeySecret
    finishing: list[ChildState] = field(default_factory=list)  # succeeded, its last child exiting


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def external_inputs(run: AlignmentRun) -> dict[str, str]:
    """{field path: URI} of everything the run reads that no stage of it makes."""
    spec = run.spec
    out = {"spec.baseModel": spec.baseModel}
    for stage in stages_of(spec):
        st = getattr(spec.stages, stage)
        if st.reused:
            out[f"spec.stages.{stage}.from"] = st.from_
            continue
        for fld in ("data", "prompts"):
            if getattr(st, fld, None):
                out[f"spec.stages.{stage}.{fld}"] = getattr(st, fld)
        for fld, ref in stage_references(spec, stage).items():
            if is_uri(ref):
                out[f"spec.stages.{stage}.{fld}"] = ref
        if stage == "evaluate":
            for part in ("alpacaEval", "mtBench"):
                if getattr(st, part):
                    for k, v in getattr(st, part).model_dump().items():
                        out[f"spec.stages.evaluate.{part}.{k}"] = v
    return out


def _label(c: ChildState) -> str:
    return f"{c.kind}/{c.name}"


def _is_done(run: AlignmentRun, step: Step, steps: list[Step], cs: list[ChildState]) -> bool:
    if step.kind == "serve":
        sample = next(s for s in steps if s.name == step.serves)
        return _is_done(run, sample, steps, cs)
    kind = step_kind(run, step.kind)
    return any(c.step == step.name and c.kind == kind and c.phase == "Succeeded" for c in cs)


def _find(cs: list[ChildState], kind: str, step: str, attempt: int) -> ChildState | None:
    return next((c for c in cs if c.kind == kind and c.step == step and c.attempt == attempt), None)


def _backoff(config: OperatorConfig, attempt: int) -> float:
    return min(config.backoff_seconds * 2 ** (attempt - 1), config.backoff_max_seconds)


def _failure_text(c: ChildState) -> str:
    why = c.reason or "Failed"
    if c.exit_code is not None:
        why += f" (exit code {c.exit_code})"
    return f"{c.kind}/{c.name}: {why}" + (f": {c.message}" if c.message else "")


def _plan_steps(view: StageView, run: AlignmentRun, task: StageTask, uid: str,
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
    failed = [c for c in cs if c.attempt == attempt and c.phase == "Failed"
              and c.step in {s.name for s in pending}]
    if failed:
        text = "; ".join(_failure_text(c) for c in failed)
        if attempt >= run.spec.retries.maxAttempts:
            view.phase, view.reason, view.attempts = "Failed", "StageFailed", attempt
            view.message = f"stage {view.name} failed after {attempt} attempt(s): {text}"
            view.deletes += [(c.kind, c.name) for c in cs if c.phase in ACTIVE]
            return
        failed_at = max((parse_time(c.finished or c.created) for c in failed), default=None,
                        key=lambda t: t or datetime.min.replace(tzinfo=timezone.utc))
        now = parse_time(observed.now) or datetime.now(timezone.utc)
        wait = _backoff(config, attempt) - ((now - failed_at).total_seconds() if failed_at else 1e9)
        view.deletes += [(c.kind, c.name) for c in cs if c.attempt == attempt and c.phase in ACTIVE]
        if wait > 0:
            view.phase, view.reason, view.attempts, view.requeue = "Running", "Backoff", attempt, wait
            view.message = (f"attempt {attempt} of stage {view.name} failed ({text}); attempt "
                            f"{attempt + 1} of {run.spec.retries.maxAttempts} starts after a "
                            f"{_backoff(config, attempt):.0f}s backoff")
            return
        attempt += 1
    view.phase, view.reason, view.attempts = "Running", "StageRunning", attempt
    current = pending[0]
    view.message = f"stage {view.name}: step {current.name} (attempt {attempt})"

    def ensure(step: Step) -> None:
        view.needs_judge |= step.needs_judge
        have = {(c.kind, c.name) for c in cs}
        name = child_name(run.metadata.name, view.name, step.name, attempt)
        kinds = (step_kind(run, step.kind), "Service") if step.kind == "serve" else (step_kind(run, step.kind),)
        if all((k, name) in have for k in kinds):
            return  # every child of the step exists: no manifest to build (the common case)
        made = build_step(run, view.name, step, attempt, uid, task, config)
        view.creates += [m for m in made if (m["kind"], m["metadata"]["name"]) not in have]

    if current.kind == "serve":
        ensure(current)
        sample = next(s for s in steps if s.name == current.serves)
        server = _find(cs, "Deployment", current.name, attempt)
        if server is not None and server.phase == "Running":
            ensure(sample)
        else:
            view.message = f"stage {view.name}: waiting for the vLLM server (attempt {attempt})"
    else:
        ensure(current)


def _stage_view(run: AlignmentRun, stage: str, task: StageTask, cs: list[ChildState],
                observed: Observed, prev: dict, views: dict[str, StageView],
                deps: list[str], uid: str, config: OperatorConfig,
                input_problem: str | None) -> StageView:
    view = StageView(stage, children=sorted(cs, key=lambda c: (c.attempt, c.created or "", c.name)))
    view.attempts = max((c.attempt for c in cs), default=0)
    marker = observed.markers.get(stage)
    steps = steps_of(run.spec, stage)
    last = steps[-1]
    if marker is not None:
        upstream = {uri: str((observed.markers.get(s) or {}).get("digest", ""))
                    for uri, s in _marker_stages(run, task, config).items()}
        matches = marker.get("digest") == task.digest(upstream)
        finished_here = prev.get("phase") == "Succeeded" or any(
            c.step == last.name and c.phase == "Succeeded" for c in cs)
        if matches or finished_here:
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
    _plan_steps(view, run, task, uid, observed, config)
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


def _input_problems(run: AlignmentRun, tasks: dict[str, StageTask],
                    missing: list[str]) -> dict[str, str]:
    """stage -> message, for stages reading an external input that was found missing."""
    out: dict[str, str] = {}
    for path, uri in external_inputs(run).items():
        if uri not in missing:
            continue
        for stage, task in tasks.items():
            if uri in task.inputs.values() and stage not in out:
                out[stage] = f"{path}: {uri} does not exist"
    return out


def _created(manifest: dict, now: str) -> ChildState:
    """A child being created by this decision, as the status lists it (so the status written
    with the create already names it, instead of a second patch once the watch shows it)."""
    meta = manifest["metadata"]
    labels = meta.get("labels") or {}
    return ChildState(kind=manifest["kind"], name=meta["name"], stage=labels.get(LABEL_STAGE, ""),
                      step=labels.get(LABEL_STEP, ""), attempt=int(labels.get(LABEL_ATTEMPT, "1")),
                      phase="Pending", created=now)


def stage_tasks(run: AlignmentRun, config: OperatorConfig) -> dict[str, StageTask]:
    """The StageTask of every stage the run makes (not `from:`): a function of the spec and
    `config.store` only, so a caller may compute it once per generation and pass it to decide."""
    return {s: stage_task(run, s, config.store or None) for s in stages_of(run.spec)
            if not getattr(run.spec.stages, s).reused}


def walk(run: AlignmentRun, observed: Observed, status: dict | None, uid: str,
         config: OperatorConfig, tasks: dict[str, StageTask] | None = None) -> dict[str, StageView]:
    spec = run.spec
    prev = {s.get("name"): s for s in (status or {}).get("stages", [])}
    deps = dependencies(spec)
    tasks = stage_tasks(run, config) if tasks is None else tasks
    problems = _input_problems(run, tasks, list(observed.missing_inputs))
    views: dict[str, StageView] = {}
    for stage in stages_of(spec):
        st = getattr(spec.stages, stage)
        if st.reused:
            views[stage] = StageView(stage, phase="Skipped", artifact=st.from_,
                                     message=f"reused from {st.from_}")
            continue
        cs = [c for c in observed.children if c.stage == stage]
        views[stage] = _stage_view(run, stage, tasks[stage], cs, observed, prev.get(stage, {}),
                                   views, deps[stage], uid, config, problems.get(stage))
    return views


def reconcile(run: AlignmentRun, observed: Observed, status: dict | None, *, uid: str,
              generation: int, config: OperatorConfig,
              tasks: dict[str, StageTask] | None = None) -> list[Action]:
    from .status import build_status, status_actions

    if not observed.now:  # callers should pass it; never write an empty lastTransitionTime
        observed = replace(observed, now=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    views = walk(run, observed, status, uid, config, tasks)
    failed = [v for v in views.values() if v.phase == "Failed"]
    refs = secret_refs(run)
    missing = {path: name for path, name in refs.items() if name in set(observed.missing_secrets)}
    actions: list[Action] = []
    deletes: list[tuple[str, str]] = []
    finishing = {(c.kind, c.name) for v in views.values() for c in v.finishing}
    if failed:  # fail fast: nothing new starts, nothing keeps holding GPUs
        deletes += [(c.kind, c.name) for c in observed.children
                    if c.phase in ACTIVE and (c.kind, c.name) not in finishing]
    elif run.spec.suspend:
        for c in observed.children:
            if c.phase not in ACTIVE or (c.kind, c.name) in finishing:
                continue
            if c.kind in ("Deployment", "Service"):
                deletes.append((c.kind, c.name))
            elif not c.suspended:
                actions.append(SuspendChild(c.kind, c.name, True))
    else:
        blocked = {v.name for v in views.values() if v.creates and (
            "spec.storage.secretRef" in missing or v.needs_judge and "spec.judge.apiKeySecret" in missing)}
        servers = {(c.stage, c.step, c.attempt) for c in observed.children
                   if c.kind == "Deployment" and c.phase == "Running"}
        for c in observed.children:  # resume what suspend stopped (a sampler once its server is up)
            if c.suspended and c.phase in ACTIVE:
                step = next((s for s in steps_of(run.spec, c.stage) if s.name == c.step), None)
                if step is None or not step.served_by or (c.stage, step.served_by, c.attempt) in servers:
                    actions.append(SuspendChild(c.kind, c.name, False))
        for v in views.values():
            if v.name in blocked:
                v.phase = v.phase if v.children else "Pending"
                v.reason, v.message = "SecretNotFound", "; ".join(
                    f"{p}: Secret '{n}' not found in namespace '{run.metadata.namespace}'"
                    for p, n in missing.items())
            else:
                actions += [CreateChild(m) for m in v.creates]
                v.children = v.children + [_created(m, observed.now) for m in v.creates]
        for v in views.values():
            deletes += v.deletes
    planned = {s for s in stages_of(run.spec) if not getattr(run.spec.stages, s).reused}
    deletes += [(c.kind, c.name) for c in observed.children  # a stage removed or now `from:`
                if c.stage not in planned and c.phase in ACTIVE]
    seen: set[tuple[str, str]] = set()
    for kind, name in deletes:
        if (kind, name) not in seen:
            seen.add((kind, name))
            actions.append(DeleteChild(kind, name))
    new_status = build_status(run, views, status, generation, observed, missing)
    actions += status_actions(run, views, status, new_status)
    waits = [v.requeue for v in views.values() if v.requeue is not None]
    if waits and not failed and not run.spec.suspend:
        actions.append(RequeueAfter(min(waits), "retry backoff"))
    return actions


__all__ = ["reconcile", "walk", "stage_tasks", "external_inputs", "StageView", "child_name"]
