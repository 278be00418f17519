"""The loop around `decide`, written once for both executors: observe the children, then the
markers (and whatever else the executor probes), decide, act, and say what to wait for. Pure.

    outcome = await reconcile_once(run, observer, executor, status, generation=..., config=...,
                                   tasks=...)           # kube/: inside the kopf handlers
    outcome = run_sync(reconcile_once(...))            # local/: `xwin run`, no event loop
    wait = resync_after(outcome, interval, idle)       # kube/: when to reconcile it unasked

An executor supplies its observation (`Observer`) and its action implementations
(executor.Executor). Their methods may return plain values (local/) or awaitables (kube/):
`reconcile_once` awaits only what is awaitable, so with plain values it never suspends and
`run_sync` runs it to the end without an event loop.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Coroutine, Protocol, TypeVar

from xwin_jobs.fingerprint import MISSING, external_inputs
from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun
from .config import OperatorConfig
from .executor import Executor, apply
from .planner import decide, input_uris, secret_refs
from .types import Action, ChildState, CreateChild, Observed, PatchStatus, RequeueAfter, now_iso

T = TypeVar("T")


class Observer(Protocol):
    """What an executor observes of one run (each method may return an awaitable)."""

    def children(self) -> list[ChildState] | Awaitable[list[ChildState]]: ...
    def markers(self, outputs: dict[str, str]) -> dict[str, dict | None] | Awaitable[dict[str, dict | None]]:
        """stage -> its `_SUCCESS.json` in `outputs[stage]` (the stage's output folder), or None."""
    def missing_inputs(self, uris: list[str]) -> list[str] | Awaitable[list[str]]:
        """The external inputs among `uris` found not to exist ([] when not probed)."""
    def missing_secrets(self, refs: dict[str, str]) -> list[str] | Awaitable[list[str]]:
        """The Secret names among `refs` ({field path: name}) that do not exist ([] when none apply)."""
    def fingerprints(self, uris: list[str]) -> dict[str, str] | Awaitable[dict[str, str]]:
        """{URI: fingerprint} of the external inputs among `uris` the executor can see
        (xwin_jobs.fingerprint; MISSING when nothing is there)."""


@dataclass(frozen=True)
class Outcome:
    """One pass: what was observed, the actions taken, the status written (None when the
    planner left it as it was) and the shortest requeue asked for (None: none)."""

    observed: Observed
    actions: list[Action]
    status: dict | None
    requeue: float | None


async def _value(x: T | Awaitable[T]) -> T:
    return await x if inspect.isawaitable(x) else x


async def act(actions: list[Action], executor: Executor) -> None:
    """Each action through the executor, in order, each call finished before the next starts."""
    for call in apply(actions, executor):
        await _value(call)


async def observe(run: AlignmentRun, observer: Observer, tasks: dict[str, StageTask]) -> Observed:
    """The children FIRST, then the markers (a child seen Succeeded always has its marker in
    view), the missing inputs and Secrets, the external inputs' fingerprints, then the time."""
    children = list(await _value(observer.children()))
    markers = await _value(observer.markers({s: t.output for s, t in tasks.items()}))
    missing_inputs = list(await _value(observer.missing_inputs(list(input_uris(run).values()))))
    missing_secrets = list(await _value(observer.missing_secrets(secret_refs(run))))
    external = sorted({uri for t in tasks.values() for uri in external_inputs(t).values()})
    prints = dict(await _value(observer.fingerprints(external)))
    missing_inputs += [u for u, fp in prints.items() if fp == MISSING and u not in missing_inputs]
    return Observed(children=children, markers=markers, now=now_iso(), fingerprints=prints,
                    missing_secrets=missing_secrets, missing_inputs=missing_inputs)


async def reconcile_once(run: AlignmentRun, observer: Observer, executor: Executor, status: dict | None, *,
                         generation: int, config: OperatorConfig,
                         tasks: dict[str, StageTask]) -> Outcome:
    """observe -> decide -> act for `run`, whose last written status is `status`; `tasks` is
    planner.stage_tasks(run, config) (a caller may keep it per generation)."""
    observed = await observe(run, observer, tasks)
    actions = decide(run, observed, status, generation=generation, config=config, tasks=tasks)
    await act(actions, executor)
    patched = [a.status for a in actions if isinstance(a, PatchStatus)]
    waits = [a.seconds for a in actions if isinstance(a, RequeueAfter)]
    return Outcome(observed, actions, patched[-1] if patched else None, min(waits) if waits else None)


ACTIVE = ("Pending", "Running")


def resync_after(outcome: Outcome, interval: float, idle: float) -> float:
    """Seconds after this pass until the run should be reconciled again if nothing else wakes
    it (an executor whose children's changes arrive as events, like kube/'s watch):

      * the planner's requeue (a backoff running), at most `idle`;
      * `interval` while the run waits on something no event announces: a Secret or an
        input that is missing, or no child active (a run that changed nothing else);
      * `idle` (a slow safety resync, for missed events) while it only waits on a child
        it has (or just created): that child's next phase arrives as an event.
    A pass that failed (an API or store error, a block) is the caller's: `interval`."""
    if outcome.requeue is not None:
        return min(max(outcome.requeue, 0.0), idle)
    observed = outcome.observed
    if observed.missing_secrets or observed.missing_inputs:
        return interval
    waiting = (any(c.phase in ACTIVE for c in observed.children)
               or any(isinstance(a, CreateChild) for a in outcome.actions))
    return idle if waiting else interval


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (every observer and executor call it made
    returned a plain value), without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: an observer or executor call returned an awaitable that waits")
