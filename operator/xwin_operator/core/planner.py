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
    labels, task); the executor renders it (kube.manifests.render, a local process) and
    creates it; 409 Conflict means it exists: fine.
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

The per-stage rules are in stage_plan.py, the status and Events in status.py. Pure: no kopf,
kubernetes or boto3 imports.
"""

from __future__ import annotations

from dataclasses import replace

from xwin_jobs.task import StageTask

from ..api.rules import is_uri
from ..api.spec import AlignmentRun
from .children import PlannedChild
from .config import OperatorConfig
from ..api.graph import dependencies, stage_references, stages_of
from .stage_plan import holds_resources, stage_view
from .status import build_status, status_actions
from .descriptors import steps_of
from .tasks import stage_task
from .types import (ACTIVE, Action, ChildState, CreateChild, DeleteChild, FailChild, Observed, RequeueAfter, StageView,
                    SuspendChild, now_iso)


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
                      attempt=child.attempt, phase="Pending", created=now)


def stage_tasks(run: AlignmentRun, config: OperatorConfig | None = None) -> dict[str, StageTask]:
    """The StageTask of every stage the run makes (not `from:`): a function of the spec and
    `config.store` only, so a caller may compute it once per generation and pass it to decide."""
    store = (config or OperatorConfig()).store or None
    return {s: stage_task(run, s, store) for s in stages_of(run.spec)
            if not getattr(run.spec.stages, s).reused}


def walk(run: AlignmentRun, observed: Observed, status: dict | None,
         config: OperatorConfig, tasks: dict[str, StageTask] | None = None,
         generation: int | None = None) -> dict[str, StageView]:
    """Every stage in pipeline order, as the planner sees it now."""
    spec = run.spec
    prev = {s.get("name"): s for s in (status or {}).get("stages", [])}
    same_spec = generation is not None and (status or {}).get("observedGeneration") == generation
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
        views[stage] = stage_view(run, stage, tasks[stage], cs, observed, prev.get(stage, {}),
                                  views, deps[stage], config, problems.get(stage))
        if same_spec:
            views[stage] = still_failed(views[stage], prev.get(stage, {}))
    return views


def still_failed(view: StageView, prev: dict) -> StageView:
    """A stage that failed after its attempts stays Failed for the same spec, even once the
    children that failed are gone (a failed server Deployment is deleted, so its pods stop
    holding GPUs): nothing is created for it again. A new generation plans it afresh."""
    if prev.get("phase") != "Failed" or not prev.get("attempts") or view.phase in ("Succeeded", "Failed"):
        return view
    return replace(view, phase="Failed", reason=prev.get("reason") or "StageFailed",
                   message=prev.get("message") or view.message,
                   attempts=max(view.attempts, int(prev["attempts"])), creates=[], requeue=None)


def decide(run: AlignmentRun, observed: Observed, status: dict | None, *, generation: int,
           config: OperatorConfig | None = None, tasks: dict[str, StageTask] | None = None) -> list[Action]:
    """Everything to do now for `run`; see the module docstring. `tasks` may pass
    `stage_tasks(run, config)` computed once for this generation (it is derived from the spec
    alone; a caller that reconciles the same spec often saves rebuilding it)."""
    config = config or OperatorConfig()
    if not observed.now:  # callers should pass it; never write an empty lastTransitionTime
        observed = replace(observed, now=now_iso())
    tasks = stage_tasks(run, config) if tasks is None else tasks
    views = walk(run, observed, status, config, tasks, generation)
    failed = [v for v in views.values() if v.phase == "Failed"]
    refs = secret_refs(run)
    missing = {path: name for path, name in refs.items() if name in set(observed.missing_secrets)}
    actions: list[Action] = []
    deletes: list[tuple[str, str]] = []
    finishing = {(c.kind, c.name) for v in views.values() for c in v.finishing}
    if failed:  # fail fast: nothing new starts, nothing keeps holding GPUs
        deletes += [(c.kind, c.name) for c in observed.children
                    if holds_resources(c) and (c.kind, c.name) not in finishing]
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
            if c.suspended and c.suspended_by_us and c.phase in ACTIVE:  # never one Kueue holds
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
                actions += [FailChild(c.kind, c.name, c.reason, c.message) for c in v.fails]
                actions += [CreateChild(p) for p in v.creates]
                v.children = v.children + [_created(p, observed.now) for p in v.creates]
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
    new_status = build_status(run, views, status, generation, observed, missing, tasks,
                              config.stall_seconds)
    actions += status_actions(run, views, status, new_status)
    waits = [v.requeue for v in views.values() if v.requeue is not None]
    if waits and not failed and not run.spec.suspend:
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
