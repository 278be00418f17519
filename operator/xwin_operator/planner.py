"""The pure planner: what the operator (or `xwin run`) should do next for one AlignmentRun.

One planner, two executors: the kopf handlers turn the actions into API calls (handlers.py),
`xwin run` turns them into local processes (local.py), so both walk the same graph with the
same rules.

    actions = decide(run, observed, status, uid=..., generation=..., config=OperatorConfig())

Level-based: `decide` looks only at what exists now (the children, read by label, and the
stages' `_SUCCESS.json` markers, read from the store) plus the previous `.status` (used only
to keep times stable, to know which stages this run already finished, and to emit an Event
when a stage changes phase). Run it as often as you like: it never asks to create a child
that exists (deterministic names; creates must still tolerate 409), and killing the caller at
any point loses nothing.

Inputs (filled by the kopf handlers, or by the local executor):
  * `ChildState` for every child labelled `xwin.ai/run=<name>`. How a child maps to a phase:
      - PyTorchJob: Succeeded / Failed conditions -> Succeeded / Failed (reason, message from
        the condition, exit_code if known); Running condition -> Running; else Pending.
        `suspended` = spec.runPolicy.suspend.
      - Job: status.succeeded >= 1 -> Succeeded; a Failed condition -> Failed; active -> Running.
        `suspended` = spec.suspend.
      - Deployment (a vLLM server): availableReplicas >= 1 -> Running (= ready to serve);
        Progressing=False (ProgressDeadlineExceeded) -> Failed; else Pending.
      - Service: Running once it exists.
    The local executor (`xwin run`, local.py) reports its processes the same way: a job
    process (PyTorchJob / Job) is Pending while queued (one job at a time), Running, then
    Succeeded or Failed (exit code, the last output line and the log path as message); a
    local vLLM server (Deployment) is Running once /health answers; a Service at once.
  * `Observed.markers`: stage -> the parsed `_SUCCESS.json` of `<run root>/<stage>/` or None,
    for every stage of `graph.stages_of(spec)` that is not reused (`from:`); the run root is
    `tasks.run_root(spec, namespace, name, config.store or None)`. Read the children FIRST and
    the markers after: a child seen Succeeded then always has its marker in view.
  * `Observed.now`: the current time (ISO, UTC): backoffs and lastTransitionTime use it.
  * `Observed.missing_secrets`: names among `secret_refs(spec).values()` that do not exist.
  * `Observed.missing_inputs`: URIs among `input_uris(spec).values()` found not to exist
    (optional: leave empty when not probed; hf:// is never probed).

Actions, applied in order:
  * CreateChild(manifest): create it; 409 Conflict means it exists: fine.
  * DeleteChild(kind, name): delete (404 is fine). Foreground/background propagation.
  * SuspendChild(kind, name, suspend): PyTorchJob spec.runPolicy.suspend / Job spec.suspend.
  * PatchStatus(status): replace `.status` with this full dict (it never holds a Secret value).
  * EmitEvent(reason, message, type): a Kubernetes Event on the AlignmentRun.
  * RequeueAfter(seconds, reason): nothing to do until then (a backoff is running): call
    `decide` again by then (kopf timer / `temporary` error delay).

`config` (builders.OperatorConfig, `OperatorConfig.from_env()` reads XWIN_* variables): default
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

Status written (DESIGN.md): phase (Pending | Running | Succeeded | Failed | Suspended), stage
(the stage in progress, or the failed one), observedGeneration, message, stages[] (name,
phase, attempts, startTime, completionTime, artifact, children ["Kind/name"], metrics from the
marker, message), conditions: `Succeeded` (True/False/Unknown with a reason: StageRunning,
Backoff, AllStagesSucceeded, StageFailed, InputMissing, ...), `Suspended`, `SecretsReady`,
`SpecChangeNeedsNewRun` (a finished stage whose settings changed: never silently rerun; to rerun
it, create a new run or delete that stage's `_SUCCESS.json`).

Pure: no kopf, kubernetes or boto3 imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .builders import OperatorConfig, child_labels, child_name  # noqa: F401  (re-exported)
from .spec import AlignmentRun


# --- what was observed ------------------------------------------------------------------


@dataclass(frozen=True)
class ChildState:
    """One child as observed (found by the label xwin.ai/run; stage/step/attempt from labels)."""

    kind: str            # PyTorchJob | Deployment | Service | Job
    name: str
    stage: str           # label xwin.ai/stage
    step: str            # label xwin.ai/step: "train", "serve", "sample", "score", "judge", ...
    attempt: int         # label xwin.ai/attempt
    phase: str           # Pending | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    created: str | None = None     # metadata.creationTimestamp (ISO, UTC, "Z")
    finished: str | None = None    # completion / failure time (ISO), when known
    suspended: bool = False        # PyTorchJob runPolicy.suspend / Job spec.suspend


@dataclass
class Observed:
    children: list[ChildState]
    markers: dict[str, dict | None]           # stage -> its _SUCCESS.json (None if absent)
    now: str = ""                             # ISO time, UTC ("2024-01-01T00:00:00Z")
    missing_secrets: list[str] = field(default_factory=list)
    missing_inputs: list[str] = field(default_factory=list)


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateChild:
    manifest: dict


@dataclass(frozen=True)
class DeleteChild:
    kind: str
    name: str


@dataclass(frozen=True)
class SuspendChild:
    kind: str
    name: str
    suspend: bool = True     # False resumes a suspended child


@dataclass(frozen=True)
class PatchStatus:
    status: dict


@dataclass(frozen=True)
class EmitEvent:
    reason: str
    message: str
    type: str = "Normal"     # Normal | Warning


@dataclass(frozen=True)
class RequeueAfter:
    seconds: float
    reason: str = ""


Action = Union[CreateChild, DeleteChild, SuspendChild, PatchStatus, EmitEvent, RequeueAfter]


def decide(run: AlignmentRun, observed: Observed, status: dict | None, *, uid: str,
           generation: int, config: OperatorConfig | None = None,
           tasks: dict | None = None) -> list[Action]:
    """Everything to do now for `run`; see the module docstring. `tasks` may pass
    `stage_tasks(run, config)` computed once for this generation (it is derived from the spec
    alone; a caller that reconciles the same spec often saves rebuilding it)."""
    from .reconcile import reconcile

    return reconcile(run, observed, status, uid=uid, generation=generation,
                     config=config or OperatorConfig(), tasks=tasks)


def stage_tasks(run: AlignmentRun, config: OperatorConfig | None = None) -> dict:
    """{stage: StageTask} of every stage the run makes (what `decide` derives from the spec)."""
    from .reconcile import stage_tasks as build

    return build(run, config or OperatorConfig())


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
    from .reconcile import external_inputs

    return external_inputs(run)


__all__ = ["ChildState", "Observed", "CreateChild", "DeleteChild", "SuspendChild", "PatchStatus",
           "EmitEvent", "RequeueAfter", "Action", "decide", "stage_tasks", "secret_refs", "input_uris",
           "child_labels", "child_name", "OperatorConfig"]
