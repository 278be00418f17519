"""The pass around `decide`, written once for both executors: observe the children, then the
markers (and whatever else the executor probes), decide, act, and say what to wait for. Pure.

    outcome = await reconcile_once(run, observer, executor, status, generation=..., config=...,
                                   tasks=...)           # kube/: an async observer and executor
    outcome = reconcile_once_sync(run, observer, executor, status, ...)   # local/: plain calls
    wait = resync_after(outcome, interval, idle)       # how long until the next pass, unasked

The two differ only in awaiting: what is observed, in which order, and what follows from it
are `observation` and `Outcome.of`, shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Protocol

from xwin_jobs.fingerprint import MISSING, external_inputs
from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun
from .config import OperatorConfig
from .executor import Executor, apply
from .planner import decide, input_uris, secret_refs
from .progress import SERVER_KINDS, progress_uris
from .types import ACTIVE, Action, ChildState, CreateChild, Observed, PatchStatus, Phase, RequeueAfter, now_iso

class Observer(Protocol):
    """What an executor observes of one run: plain calls (local/: reconcile_once_sync), or
    coroutines but for `children`, which is read from memory on either side (kube/)."""

    def children(self) -> list[ChildState]: ...
    def markers(self, outputs: dict[str, str]) -> dict[str, dict | None] | Awaitable[dict[str, dict | None]]:
        """stage -> its `_SUCCESS.json` in `outputs[stage]` (the stage's output folder), or None."""
    def missing_inputs(self, uris: list[str]) -> list[str] | Awaitable[list[str]]:
        """The external inputs among `uris` found not to exist ([] when not probed)."""
    def missing_secrets(self, refs: dict[str, str]) -> list[str] | Awaitable[list[str]]:
        """The Secret names among `refs` ({field path: name}) that do not exist ([] when none apply)."""
    def fingerprints(self, uris: list[str]) -> dict[str, str] | Awaitable[dict[str, str]]:
        """{URI: fingerprint} of the external inputs among `uris` the executor can see
        (xwin_jobs.fingerprint; MISSING when nothing is there)."""
    def progress(self, uris: dict[str, str]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """stage -> the live record at `uris[stage]` (xwin_jobs.progress.Progress; the last
        good one when it cannot be read now; absent when none ever could)."""


@dataclass(frozen=True)
class Outcome:
    """One pass: what was observed, the actions taken, the status written (None when the
    planner left it as it was) and the shortest requeue asked for (None: none)."""

    observed: Observed
    actions: list[Action]
    status: dict | None
    requeue: float | None


def observation(children: list[ChildState], markers: dict[str, dict | None], missing_inputs: list[str],
                missing_secrets: list[str], prints: dict[str, str], progress: dict[str, Any]) -> Observed:
    """What one pass observed, the time last (external inputs whose fingerprint is MISSING
    count as missing inputs)."""
    missing_inputs = list(missing_inputs) + [u for u, fp in prints.items() if fp == MISSING and u not in missing_inputs]
    return Observed(children=list(children), markers=markers, now=now_iso(), fingerprints=dict(prints),
                    missing_secrets=list(missing_secrets), missing_inputs=missing_inputs,
                    progress=dict(progress))


def _external(tasks: dict[str, StageTask]) -> list[str]:
    return sorted({uri for t in tasks.values() for uri in external_inputs(t).values()})


def _outcome(observed: Observed, actions: list[Action]) -> Outcome:
    patched = [a.status for a in actions if isinstance(a, PatchStatus)]
    waits = [a.seconds for a in actions if isinstance(a, RequeueAfter)]
    return Outcome(observed, actions, patched[-1] if patched else None, min(waits) if waits else None)


async def act(actions: list[Action], executor: Executor) -> None:
    """Each action through the executor, in order, each call finished before the next starts."""
    for call in apply(actions, executor):
        await call


async def reconcile_once(run: AlignmentRun, observer: Observer, executor: Executor, status: dict | None, *,
                         generation: int, config: OperatorConfig,
                         tasks: dict[str, StageTask]) -> Outcome:
    """observe -> decide -> act for `run`, whose last written status is `status`, with an
    observer and an executor whose methods are coroutines (kube/): the children FIRST, then
    the markers (a child seen Succeeded always has its marker in view), the missing inputs and
    Secrets, the external inputs' fingerprints, the running steps' progress records. `tasks` is planner.stage_tasks(run, config)."""
    children = observer.children()
    markers = await observer.markers({s: t.output for s, t in tasks.items()})
    missing_inputs = await observer.missing_inputs(list(input_uris(run).values()))
    missing_secrets = await observer.missing_secrets(secret_refs(run))
    prints = await observer.fingerprints(_external(tasks))
    progress = await observer.progress(progress_uris(run, tasks, children))
    observed = observation(children, markers, missing_inputs, missing_secrets, prints, progress)
    actions = decide(run, observed, status, generation=generation, config=config, tasks=tasks)
    await act(actions, executor)
    return _outcome(observed, actions)


def observe_sync(run: AlignmentRun, observer: Observer, tasks: dict[str, StageTask]) -> Observed:
    """What an observer of plain calls sees of `run`, in reconcile_once's order."""
    children = observer.children()
    markers = observer.markers({s: t.output for s, t in tasks.items()})
    return observation(children, markers, observer.missing_inputs(list(input_uris(run).values())),
                       observer.missing_secrets(secret_refs(run)), observer.fingerprints(_external(tasks)),
                       observer.progress(progress_uris(run, tasks, children)))


def reconcile_once_sync(run: AlignmentRun, observer: Observer, executor: Executor, status: dict | None, *,
                        generation: int, config: OperatorConfig,
                        tasks: dict[str, StageTask]) -> Outcome:
    """The same pass with an observer and an executor of plain calls (local/)."""
    observed = observe_sync(run, observer, tasks)
    actions = decide(run, observed, status, generation=generation, config=config, tasks=tasks)
    for _ in apply(actions, executor):
        pass
    return _outcome(observed, actions)




def resync_after(outcome: Outcome, interval: float, idle: float, progress: float | None = None) -> float:
    """Seconds after this pass until the run should be reconciled again if nothing else wakes
    it (an executor whose children's changes arrive as events, like kube/'s watch):

      * the planner's requeue (a backoff running), at most `idle`;
      * `interval` while the run waits on something no event announces: a Secret or an
        input that is missing, or no child active (a run that changed nothing else);
      * `idle` (a slow safety resync, for missed events) while it only waits on a child
        it has (or just created): that child's next phase arrives as an event; at most
        `progress` while a step that reports progress runs (its record is read each pass).
    A pass that failed (an API or store error, a block) is the caller's: `interval`."""
    if outcome.requeue is not None:
        return min(max(outcome.requeue, 0.0), idle)
    observed = outcome.observed
    if observed.missing_secrets or observed.missing_inputs:
        return interval
    waiting = (any(c.phase in ACTIVE for c in observed.children)
               or any(isinstance(a, CreateChild) for a in outcome.actions))
    if not waiting:
        return interval
    reporting = progress is not None and any(c.phase == Phase.RUNNING and c.kind not in SERVER_KINDS
                                             for c in observed.children)
    return min(idle, progress) if reporting else idle
