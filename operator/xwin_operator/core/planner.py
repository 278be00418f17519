"""The pure planner: what the operator (or `xwin run`) should do next for one AlignmentRun.

One planner, two executors: the kopf handlers turn the actions into API calls (kube/), `xwin
run` turns them into local processes (local/), so both walk the same graph with the same rules.

    actions = decide(run, observed, status, generation=..., config=OperatorConfig())

Level-based: `decide` looks only at what exists now (the children, read by label, and the
stages' `_SUCCESS.json` markers, read from the store) plus the previous `.status` (used only
to keep times stable, to know which stages this run already finished, and to emit an Event
when a stage changes phase). Run it as often as you like: it never asks to create a child
that exists (deterministic names; creates must still tolerate 409), and killing the caller at
any point loses nothing.

Inputs (filled by the kopf handlers, or by the local executor):
  * `ChildState` for every child labelled `xwin.ai/run=<name>`: its phase (Pending, Running,
    Succeeded, Failed), as each executor observes it: kube/observe.py maps the Kubernetes
    objects (PyTorchJob, TrainJob, Job, Deployment, Service), local/children.py the local
    processes (a job queued -> Pending, running, exited; a vLLM server Running once /health
    answers; a Service at once).
  * `Observed.markers`: stage -> the parsed `_SUCCESS.json` of `<run root>/<stage>/` or None,
    for every stage of `graph.stages_of(spec)` that is not reused (`from:`); the run root is
    `tasks.run_root(spec, namespace, name, config.store or None)`. Read the children FIRST and
    the markers after: a child seen Succeeded then always has its marker in view.
  * `Observed.now`: the current time (ISO, UTC): backoffs and lastTransitionTime use it.
  * `Observed.missing_secrets`: names among `secret_refs(spec).values()` that do not exist.
  * `Observed.missing_inputs`: URIs among `input_uris(spec).values()` found not to exist
    (optional: leave empty when not probed; hf:// is never probed).

Actions, applied in order:
  * CreateChild(child): a typed `children.PlannedChild` (kind, stage, step, attempt, name,
    labels, task; a sampler's also its server's Service); the executor renders it
    (kube.manifests.render, a local process) and creates it; 409 Conflict means it exists: fine.
  * DeleteChild(kind, name): delete (404 is fine), its pods with it (background propagation).
  * SuspendChild(kind, name, suspend): PyTorchJob spec.runPolicy.suspend / Job spec.suspend;
    only a child the operator suspended itself is resumed (Kueue resumes those it holds).
  * FailChild(kind, name, reason, message): a child none of whose pods started within
    spec.scheduling.pendingTimeoutSeconds, or a failed server Deployment whose pod restarts:
    stopped and marked failed, kept as its attempt's record.
  * PatchStatus(status): replace `.status` with this full dict (it never holds a Secret value).
  * EmitEvent(reason, message, type): a Kubernetes Event on the AlignmentRun.
  * RequeueAfter(seconds, reason): nothing to do until then (a backoff is running): call
    `decide` again by then (kube/: the run's daemon sleeps until then or until a change wakes it).

`config` (config.OperatorConfig, `OperatorConfig.from_env()` reads XWIN_* variables): default
images, vLLM port, backoff (`backoff_seconds`, doubling per attempt up to
`backoff_max_seconds`), pod restarts per attempt, and `store` replacing spec.storage.uri.

Rules: stages start when the stages they read have succeeded (graph.py), several at once when
independent; each stage walks its steps (steps.py); a failed attempt is retried as attempt+1
(new child names) after the backoff, from the step that failed, up to retries.maxAttempts,
then the run is Failed naming the stage, the child, its reason and the fields that needed the
stage; a failed run deletes its active children. `suspend: true` creates nothing, suspends
Jobs and PyTorchJobs and deletes vLLM servers; `false` unsuspends them (a sampler once its
server is back). A missing Secret holds back the children that reference it (condition
SecretsReady=False naming the field); a missing external input fails the run (InputNotFound
naming the field). Children of a stage no longer run (removed, or now `from:`) are deleted.
A stage whose marker is there is Succeeded and its still-active children are deleted (a vLLM
server, a leftover of an older attempt), except the current attempt's last-step child: its
job writes the marker just before it exits, so it is let finish (and stays in `children`).

Status written (docs/design.md): phase (Pending | Running | Succeeded | Failed | Suspended), stage
(the stage in progress, or the failed one), observedGeneration, message, stages[] (name,
phase, attempts, startTime, completionTime, artifact, children ["Kind/name"], metrics from the
marker, message), conditions: `Succeeded` (True/False/Unknown with a reason: StageRunning,
Backoff, AllStagesSucceeded, StageFailed, InputNotFound, ...), `Suspended`, `SecretsReady`,
`SpecChangeNeedsNewRun` (a finished stage whose settings changed: never silently rerun; to rerun
it, create a new run or delete that stage's `_SUCCESS.json`).

Shape: `plan_context` gathers one pass's inputs into a frozen PlanContext; `plan_all` plans
every stage from it in pipeline order (stage_plan.plan_stage: one frozen StagePlan each);
`carried_out` applies the run-wide rules (fail fast, suspend, a missing Secret) as new plans;
the child actions, the status (status.build_status) and its Events are functions of those
plans. The per-stage rules are in stage_plan.py, the status and Events in status.py. Pure: no
kopf, kubernetes or boto3 imports.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from xwin_jobs.task import StageTask

from ..api.rules import is_uri
from ..api.spec import AlignmentRun
from .children import PlannedChild
from .config import OperatorConfig
from ..api.graph import dependencies, stage_references, stages_of
from .stage_plan import PlanContext, holds_resources, parse_time, plan_stage
from .status import build_status, status_actions
from .descriptors import steps_of
from .tasks import stage_task
from .types import (ACTIVE, FINISHED, Action, ChildState, CreateChild, DeleteChild, FailChild, Observed, Phase,
                    RequeueAfter, StagePlan, SuspendChild, now_iso)


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


def _created(child: PlannedChild, now: str) -> ChildState:
    """A child being created by this decision, as the status lists it (so the status written
    with the create already names it, instead of a second patch once the watch shows it)."""
    return ChildState(kind=child.kind, name=child.name, stage=child.stage, step=child.step.name,
                      attempt=child.attempt, phase=Phase.PENDING, created=now)


def stage_tasks(run: AlignmentRun, config: OperatorConfig | None = None) -> dict[str, StageTask]:
    """The StageTask of every stage the run makes (not `from:`): a function of the spec and
    `config.store` only, so a caller may compute it once per generation and pass it to decide."""
    store = (config or OperatorConfig()).store or None
    return {s: stage_task(run, s, store) for s in stages_of(run.spec)
            if not getattr(run.spec.stages, s).reused}


def plan_context(run: AlignmentRun, observed: Observed, status: dict | None, config: OperatorConfig,
                 tasks: dict[str, StageTask] | None = None, generation: int | None = None) -> PlanContext:
    """One pass's inputs, gathered once (`tasks`: stage_tasks(run, config) when None)."""
    tasks = stage_tasks(run, config) if tasks is None else tasks
    return PlanContext(
        run=run, observed=observed, now=parse_time(observed.now) or datetime.now(timezone.utc),
        config=config, tasks=tasks,
        prev={s.get("name"): s for s in (status or {}).get("stages", [])},
        deps=dependencies(run.spec),
        problems=_input_problems(run, tasks, list(observed.missing_inputs)),
        same_spec=generation is not None and (status or {}).get("observedGeneration") == generation)


def plan_all(ctx: PlanContext) -> dict[str, StagePlan]:
    """Every stage in pipeline order, as the planner sees it now (a stage after those it reads)."""
    plans: dict[str, StagePlan] = {}
    for stage in stages_of(ctx.run.spec):
        st = getattr(ctx.run.spec.stages, stage)
        if st.reused:
            plans[stage] = StagePlan(stage, phase=Phase.SKIPPED, artifact=st.from_, message=f"reused from {st.from_}")
            continue
        plan = plan_stage(ctx, stage, plans)
        plans[stage] = still_failed(plan, ctx.prev.get(stage, {})) if ctx.same_spec else plan
    return plans


def walk(run: AlignmentRun, observed: Observed, status: dict | None,
         config: OperatorConfig, tasks: dict[str, StageTask] | None = None,
         generation: int | None = None) -> dict[str, StagePlan]:
    """Every stage in pipeline order, as the planner sees it now (plan_all of plan_context)."""
    return plan_all(plan_context(run, observed, status, config, tasks, generation))


def still_failed(plan: StagePlan, prev: dict) -> StagePlan:
    """A stage that failed after its attempts stays Failed for the same spec, even once the
    children that failed are gone (a failed server Deployment is deleted, so its pods stop
    holding GPUs): nothing is created for it again. A new generation plans it afresh."""
    if prev.get("phase") != Phase.FAILED or not prev.get("attempts") or plan.phase in FINISHED:
        return plan
    return replace(plan, phase=Phase.FAILED, reason=prev.get("reason") or "StageFailed",
                   message=prev.get("message") or plan.message,
                   attempts=max(plan.attempts, int(prev["attempts"])), creates=(), requeue=None)


def missing_secret_refs(run: AlignmentRun, observed: Observed) -> dict[str, str]:
    """{field path: Secret name} of the Secrets the run references that were found missing."""
    gone = set(observed.missing_secrets)
    return {path: name for path, name in secret_refs(run).items() if name in gone}


def _holds_back(plan: StagePlan, missing: dict[str, str]) -> bool:
    """Whether a missing Secret holds back what the stage would create now."""
    return bool(plan.creates) and ("spec.storage.secretRef" in missing or
                                   plan.needs_judge and "spec.judge.apiKeySecret" in missing)


def carried_out(ctx: PlanContext, plans: dict[str, StagePlan], missing: dict[str, str]) -> dict[str, StagePlan]:
    """The plans as this pass carries them out. A failed run or a suspended one creates and
    stops nothing per stage (run_actions frees and suspends instead); a stage whose children
    would reference a missing Secret is held back (SecretNotFound, nothing created); what a
    stage creates is listed among its children (the status written with the create names it)."""
    if any(p.phase == Phase.FAILED for p in plans.values()) or ctx.run.spec.suspend:
        return {k: replace(p, creates=(), fails=(), deletes=()) if p.creates or p.fails or p.deletes else p
                for k, p in plans.items()}
    text = "; ".join(f"{p}: Secret '{n}' not found in namespace '{ctx.run.metadata.namespace}'"
                     for p, n in missing.items())
    out = {}
    for k, p in plans.items():
        if _holds_back(p, missing):
            out[k] = replace(p, phase=p.phase if p.children else Phase.PENDING, reason="SecretNotFound",
                             message=text, creates=(), fails=())
        elif p.creates:
            out[k] = replace(p, children=p.children + tuple(_created(c, ctx.observed.now) for c in p.creates))
        else:
            out[k] = p
    return out


def run_actions(ctx: PlanContext, plans: dict[str, StagePlan]) -> tuple[list[Action], list[tuple[str, str]]]:
    """The run-wide (actions, deletes): a failed run frees every child that holds resources
    (fail fast); a suspended one suspends its Jobs and training jobs and deletes its servers;
    otherwise what suspend stopped is resumed (a sampler once its server is up), never a
    child Kueue holds. The last-step child of a succeeded stage is left to finish."""
    run, children = ctx.run, ctx.observed.children
    finishing = {(c.kind, c.name) for p in plans.values() for c in p.finishing}
    if any(p.phase == Phase.FAILED for p in plans.values()):
        return [], [(c.kind, c.name) for c in children if holds_resources(c) and (c.kind, c.name) not in finishing]
    actions: list[Action] = []
    deletes: list[tuple[str, str]] = []
    if run.spec.suspend:
        for c in children:
            if c.phase not in ACTIVE or (c.kind, c.name) in finishing:
                continue
            if c.kind in ("Deployment", "Service"):
                deletes.append((c.kind, c.name))
            elif not c.suspended:
                actions.append(SuspendChild(c.kind, c.name, True))
        return actions, deletes
    servers = {(c.stage, c.step, c.attempt) for c in children if c.kind == "Deployment" and c.phase == Phase.RUNNING}
    for c in children:
        if c.suspended and c.suspended_by_us and c.phase in ACTIVE:
            step = next((s for s in steps_of(run.spec, c.stage) if s.name == c.step), None)
            if step is None or not step.served_by or (c.stage, step.served_by, c.attempt) in servers:
                actions.append(SuspendChild(c.kind, c.name, False))
    return actions, deletes


def child_actions(ctx: PlanContext, plans: dict[str, StagePlan]) -> list[Action]:
    """Every action on children, in order: the run-wide ones, each stage's FailChild and
    CreateChild, then each DeleteChild once (the stages', and those of a stage removed or
    now `from:`). `plans` are as carried_out returns them."""
    actions, deletes = run_actions(ctx, plans)
    for p in plans.values():
        actions += [FailChild(c.kind, c.name, c.reason, c.message) for c in p.fails]
        actions += [CreateChild(c) for c in p.creates]
    deletes += [d for p in plans.values() for d in p.deletes]
    planned = {s for s in stages_of(ctx.run.spec) if not getattr(ctx.run.spec.stages, s).reused}
    deletes += [(c.kind, c.name) for c in ctx.observed.children if c.stage not in planned and c.phase in ACTIVE]
    actions += [DeleteChild(kind, name) for kind, name in dict.fromkeys(deletes)]
    return actions


def decide(run: AlignmentRun, observed: Observed, status: dict | None, *, generation: int,
           config: OperatorConfig | None = None, tasks: dict[str, StageTask] | None = None) -> list[Action]:
    """Everything to do now for `run`; see the module docstring. `tasks` may pass
    `stage_tasks(run, config)` computed once for this generation (it is derived from the spec
    alone; a caller that reconciles the same spec often saves rebuilding it)."""
    config = config or OperatorConfig()
    if not observed.now:  # callers should pass it; never write an empty lastTransitionTime
        observed = replace(observed, now=now_iso())
    ctx = plan_context(run, observed, status, config, tasks, generation)
    missing = missing_secret_refs(run, observed)
    plans = carried_out(ctx, plan_all(ctx), missing)
    actions = child_actions(ctx, plans)
    new_status = build_status(run, plans, status, generation, observed, missing, ctx.tasks,
                              config.stall_seconds)
    actions += status_actions(run, plans, status, new_status)
    waits = [p.requeue for p in plans.values() if p.requeue is not None]
    if waits and not any(p.phase == Phase.FAILED for p in plans.values()) and not run.spec.suspend:
        actions.append(RequeueAfter(min(waits), "retry backoff"))
    return actions


def secret_refs(run: AlignmentRun) -> dict[str, str]:
    """{field path: Secret name} of every Secret the run's children reference."""
    spec, refs = run.spec, {}
    if spec.storage.secretRef:
        refs["spec.storage.secretRef"] = spec.storage.secretRef
    if spec.judge and spec.judge.apiKeySecret:
        refs["spec.judge.apiKeySecret"] = spec.judge.apiKeySecret
    return refs


def input_uris(run: AlignmentRun) -> dict[str, str]:
    """{field path: URI} of the external inputs the run reads (baseModel, data, prompts,
    `from:` ...), for a caller that probes them and reports missing ones."""
    return external_inputs(run)
