"""One run's reconcile, without kopf: observe -> decide -> act (the kopf handlers in handlers.py
trigger it).

`reconcile` runs core.loop's one pass (observe -> decide -> act) with this side's parts:
`KubeObserver` (the run's children as the child book holds them, the stages'
`_SUCCESS.json` markers and the run's inputs in the store, the Secrets the run names) and
`KubeActions` (the actions as kube.KubeApi calls, with at most one status patch per reconcile,
none when nothing changed: children first, then the status, then the Events, handed to the
client's event threads). When observing or acting fails (blocked.py: the store unreachable, the
API refusing a child or a lookup, a launcher's CRD missing) the run's status says so, with one
Warning Event per distinct reason; the resync retries.

When the resync reconciles a run again unasked (`RunGate.due`) is core.loop.resync_after's
call: at the planner's requeue (a backoff), every `interval` while the run waits on something
no event announces (a missing Secret or input, a block, a failed reconcile), and only every
`idle` (IDLE_FACTOR intervals, a safety net for missed events) while it waits on a child, whose
next phase arrives as a watch event: under a burst of new runs, the resync does not compete
with their first reconciles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from xwin_jobs.store import StoreError

from ..api.spec import API_GROUP, API_VERSION, KIND
from ..core.children import PlannedChild
from ..core.config import OperatorConfig
from ..core.loop import act, reconcile_once, resync_after
from ..core.planner import stage_tasks
from ..core.types import EmitEvent, now_iso
from ..core.children import LABEL_ATTEMPT, LABEL_RUN, LABEL_STAGE, LABEL_STEP, MANAGED_BY
from .admission import CompletionLane
from .blocked import Blocked, api_refusal, blocked_status, child_refusal, store_problem
from .client import ApiError, KubeApi
from .child_book import ChildBook
from .kubeconfig import Login, LoginError
from .manifests import render
from .observe import child_state, server_failed
from .run_body import parse_run
from .store_reader import StoreReader

FINISHED = ("Succeeded", "Failed")
SECRET_TTL = 30.0  # seconds a Secret found to exist is not looked up again
IDLE_FACTOR = 10  # a run waiting on its child is resynced every IDLE_FACTOR intervals (missed events)


class RunGone(Exception):
    """The run was deleted while it was being reconciled."""


@dataclass
class RunGate:
    """Per-run state of this process: one reconcile at a time, the newest body the watch
    delivered, the status it last wrote (newer than a body the watch has not caught up with),
    the child phases it last saw, when it was last reconciled, and when the resync should
    reconcile it again (`due`, time.monotonic(); see the module docstring)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    body: Mapping[str, Any] | None = None   # the newest body of the run seen by the watch
    generation: int | None = None           # the generation last reconciled
    run: Any = None                         # its spec parsed, for `generation` (spec changes bump it)
    tasks: dict | None = None               # planner.stage_tasks(run) for that generation
    status: dict | None = None
    phases: dict[tuple[str, str], str] = field(default_factory=dict)
    queued: bool = False
    last: float = 0.0
    due: float = 0.0
    blocked: str | None = None              # the reason of the block last reported (blocked.py)


@dataclass
class OperatorState:
    api: KubeApi
    store: StoreReader
    config: OperatorConfig
    login: Callable[[], Login]
    interval: float = 3.0     # the resync of runs waiting on what no event announces (seconds)
    gates: dict[str, RunGate] = field(default_factory=dict)
    book: ChildBook = field(default_factory=ChildBook)           # the children, from the watch
    listings: dict[str, asyncio.Task] = field(default_factory=dict)  # namespace -> its children listed
    secrets_found: dict[tuple[str, str], float] = field(default_factory=dict)  # -> when last found
    resync: asyncio.Task | None = None
    lane: CompletionLane = field(default_factory=CompletionLane)  # new runs first (admission.py)

    @property
    def idle(self) -> float:
        """The safety resync of a run waiting on its child (seconds)."""
        return IDLE_FACTOR * self.interval


async def children_complete(state: OperatorState, namespace: str) -> None:
    """Return once the book holds every child of the namespace that existed when it was first
    asked (child_book.py): its children listed once, by label, then awaited from the watch
    (listed again every second for those deleted meanwhile). A failed listing raises Blocked
    (or LoginError); the next reconcile lists again."""
    if state.book.complete(namespace):
        return
    task = state.listings.get(namespace)
    if task is None or task.done():
        task = state.listings[namespace] = asyncio.get_running_loop().create_task(_await_children(state, namespace))
    await asyncio.shield(task)


async def _await_children(state: OperatorState, namespace: str) -> None:
    book = state.book
    if not book.listed(namespace):
        book.expect(namespace, await _child_uids(state.api, namespace))
    while not book.complete(namespace):
        try:
            await asyncio.wait_for(book.wait(namespace), timeout=1.0)
        except asyncio.TimeoutError:
            book.still_there(namespace, await _child_uids(state.api, namespace))


async def _child_uids(api: KubeApi, namespace: str) -> set[str]:
    try:
        items = await api.list_children(namespace)
    except ApiError as e:  # the run's status says so (blocked.py); the resync lists again
        raise api_refusal(f"cannot list the children in namespace '{namespace}'", e.status, str(e)) from None
    return {item["metadata"]["uid"] for item in items
            if LABEL_RUN in (item["metadata"].get("labels") or {}) and child_state(item) is not None}


def finished(body: Mapping[str, Any], written: dict | None) -> bool:
    """Succeeded or Failed for the current spec (by the newest status known here)."""
    status = written if written is not None else (body.get("status") or {})
    return status.get("phase") in FINISHED and status.get("observedGeneration") == body["metadata"].get("generation")


async def reconcile(state: OperatorState, gate: RunGate,
                    logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Reconcile the run of `gate` (its newest body), with its children as the book holds
    them once the lock is held (not when the trigger fired: a queued reconcile sees the
    newest children)."""
    async with gate.lock:
        gate.queued = False
        body = gate.body
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # being deleted: its children go with it (owner references); nothing to start
        meta = body["metadata"]
        if state.gates.get(meta["uid"]) is not gate:
            return  # deleted while this reconcile waited (the completion lane): nothing to start
        wait = state.interval  # a block or an error: retried by the resync
        try:
            await children_complete(state, meta["namespace"])
            wait = await _reconcile(state, gate, body, state.book.children(meta["namespace"], meta["name"]), logger)
            gate.blocked = None
        except Blocked as b:
            await report_blocked(state, gate, body, b, logger)
        except RunGone:
            state.gates.pop(meta["uid"], None)  # deleted meanwhile: nothing left to do
        finally:
            gate.last = time.monotonic()
            gate.due = gate.last + wait


async def report_blocked(state: OperatorState, gate: RunGate, body: Mapping[str, Any], blocked: Blocked,
                         logger: logging.Logger | logging.LoggerAdapter) -> None:
    """The run cannot progress: its status says why (phase never empty, a Progressing=False
    condition naming the field or endpoint) and, once per distinct reason, a Warning Event."""
    meta = body["metadata"]
    previous = gate.status if gate.status is not None else dict(body.get("status") or {})
    status = blocked_status(previous, blocked, now_iso())
    logger.warning(f"blocked: {blocked}")
    if status != previous:
        try:
            await state.api.patch_status(meta["namespace"], meta["name"], status)
        except ApiError as e:
            raise RunGone() if e.status == 404 else e from None
        gate.status = status
    if gate.blocked != blocked.reason:
        gate.blocked = blocked.reason
        post_events(state, meta, [EmitEvent(blocked.reason, blocked.message, "Warning")])


async def _reconcile(state: OperatorState, gate: RunGate, body: Mapping[str, Any], children: list,
                     logger: logging.Logger | logging.LoggerAdapter) -> float:
    """One pass; the seconds until the resync should reconcile the run again."""
    meta = body["metadata"]
    generation = int(meta.get("generation") or 1)
    current = dict(body.get("status") or {})
    previous = gate.status if gate.status is not None else current
    if gate.run is not None and gate.generation == generation:
        run, invalid = gate.run, []  # same spec: no need to validate it again
    else:
        run, invalid = parse_run(body, previous, generation, now_iso())
        gate.tasks = stage_tasks(run, state.config) if run is not None else None
    executor = KubeActions(state, gate, body, run, current, logger)
    wait = state.interval
    if run is None:
        await act(invalid, executor)
    else:
        outcome = await reconcile_once(run, KubeObserver(state, gate, run, children), executor, previous,
                                       generation=generation, config=state.config, tasks=gate.tasks)
        wait = resync_after(outcome, state.interval, state.idle)
    if executor.events:  # after the status they tell about, in order
        post_events(state, meta, executor.events)
    gate.generation, gate.run = generation, run
    return wait


class KubeObserver:
    """What the loop observes of a run on Kubernetes (core.loop.Observer): its children as the
    book held them when its reconcile started (remembered as the phases the run last saw),
    the markers of its stages and its missing external inputs in the store (an input found once
    is not probed again: StoreReader remembers it), and its missing Secrets."""

    def __init__(self, state: OperatorState, gate: RunGate, run: Any, children: list):
        self.state, self.gate, self._children = state, gate, children
        self.namespace, self.endpoint = run.metadata.namespace, run.spec.storage.endpoint
        self.run_name = run.metadata.name
        self.store_uri = state.config.store or run.spec.storage.uri

    async def children(self) -> list:
        """The book's children; a server Deployment not available is looked at through its
        pods (observe.server_failed: a vLLM server that ended fails it, named)."""
        self.gate.phases = {(c.kind, c.name): c.phase for c in self._children}
        if not any(c.kind == "Deployment" and c.phase == "Pending" for c in self._children):
            return self._children
        try:
            pods = await self.state.api.list_pods(self.namespace, {LABEL_RUN: self.run_name,
                                                                   "app.kubernetes.io/managed-by": MANAGED_BY})
        except ApiError as e:
            if e.status in (403, 404):  # no RBAC for pods (an older install): as before
                return self._children
            raise api_refusal(f"cannot list the pods of run '{self.run_name}'", e.status, str(e)) from None
        return [server_failed(c, [p for p in pods if _pod_of(p, c)])
                if c.kind == "Deployment" and c.phase == "Pending" else c for c in self._children]

    async def markers(self, outputs: dict[str, str]) -> dict[str, dict | None]:
        try:
            return await self.state.store.markers(self.endpoint, outputs)
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e) from None

    async def missing_inputs(self, uris: list[str]) -> list[str]:
        try:
            return await self.state.store.missing(self.endpoint, uris)
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e) from None

    async def fingerprints(self, uris: list[str]) -> dict[str, str]:
        try:
            meta = (self.gate.body or {}).get("metadata") or {}
            return await self.state.store.fingerprints(self.endpoint, uris,
                                                       (meta.get("uid"), meta.get("generation")))
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e) from None

    async def missing_secrets(self, refs: dict[str, str]) -> list[str]:
        missing: list[str] = []
        for path, name in refs.items():
            try:
                if name not in missing and not await secret_exists(self.state, self.namespace, name):
                    missing.append(name)
            except ApiError as e:
                raise api_refusal(f"cannot look up Secret '{name}' ({path})", e.status, str(e)) from None
        return missing


def _pod_of(pod: Mapping[str, Any], child: Any) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (labels.get(LABEL_STAGE), labels.get(LABEL_STEP), labels.get(LABEL_ATTEMPT)) == (
        child.stage, child.step, str(child.attempt))


async def secret_exists(state: OperatorState, namespace: str, name: str) -> bool:
    """Whether the Secret exists; one found is not asked for again for SECRET_TTL seconds (a
    missing one is asked for on every reconcile, so a Secret created heals the run at once)."""
    key, now = (namespace, name), time.monotonic()
    if now - state.secrets_found.get(key, -SECRET_TTL) < SECRET_TTL:
        return True
    if await state.api.secret_exists(namespace, name):
        state.secrets_found[key] = now
        return True
    state.secrets_found.pop(key, None)
    return False


class KubeActions:
    """The planner's actions as API calls (core.executor.Executor): children created, deleted
    and (un)suspended at once, the status patched, the Events collected for `post_events`
    (handed to the client's event threads once the actions are done); a requeue is the
    resync's (reconcile sets RunGate.due from core.loop.resync_after).

    Children first (a new child is the latency users wait for), then the one status patch (the
    planner emits at most one, and none when nothing changed), then the Events, in order. The
    status patch goes to the client's bulk threads and the Events to its event threads; creates
    have the client's main pool to themselves: under a burst of new runs, creating children is
    not queued behind the other runs' bookkeeping, nor a run's next reconcile (its child
    finishing) behind its Events."""

    def __init__(self, state: OperatorState, gate: RunGate, body: Mapping[str, Any], run: Any,
                 current: dict, logger: logging.Logger | logging.LoggerAdapter):
        self.state, self.gate, self.run, self.current, self.logger = state, gate, run, current, logger
        self.meta = body["metadata"]
        self.ns, self.name = self.meta["namespace"], self.meta["name"]
        self.events: list[EmitEvent] = []

    async def create(self, child: PlannedChild) -> None:
        m = render(self.run, child, self.meta["uid"], self.state.config)
        try:
            if await self.state.api.create(m):
                self.logger.info(f"created {child.kind}/{child.name}")
        except ApiError as e:
            raise child_refusal(child.kind, child.name, e.status, str(e), "spec.scheduling.launcher") from None

    async def delete(self, kind: str, name: str) -> None:
        try:
            if await self.state.api.delete(kind, self.ns, name):
                self.logger.info(f"deleted {kind}/{name}")
        except ApiError as e:
            raise api_refusal(f"cannot delete {kind}/{name}", e.status, str(e)) from None

    async def suspend(self, kind: str, name: str, suspend: bool) -> None:
        try:
            await self.state.api.set_suspended(kind, self.ns, name, suspend)
        except ApiError as e:
            raise api_refusal(f"cannot (un)suspend {kind}/{name}", e.status, str(e)) from None
        self.logger.info(f"{'suspended' if suspend else 'resumed'} {kind}/{name}")

    async def patch_status(self, status: dict) -> None:
        old_keys = set(self.current) | set(self.gate.status or {})
        patch = {**status, **{k: None for k in old_keys if k not in status}}
        try:
            await self.state.api.patch_status(self.ns, self.name, patch)
        except ApiError as e:
            raise RunGone() if e.status == 404 else e from None
        self.gate.status = dict(status)

    def event(self, reason: str, message: str, type_: str) -> None:
        self.events.append(EmitEvent(reason, message, type_))
        self.logger.info(f"{reason}: {message}")

    def requeue(self, seconds: float, reason: str) -> None:
        """Nothing to do here: the outcome's requeue sets when the resync comes back (RunGate.due)."""


def post_events(state: OperatorState, meta: Mapping[str, Any], events: list[EmitEvent]) -> None:
    """Post Events on the run, best effort (as Events are), without waiting: the client's event
    threads post them in order per run (KubeApi.post_events), at no cost to the event loop."""
    involved = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"]}
    state.api.post_events(involved, [(e.reason, e.message, e.type) for e in events])


async def reconcile_logged(state: OperatorState, gate: RunGate, why: str,
                           logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Reconcile; an API or store error is logged and left to the resync (which retries the run
    `interval` seconds later): one run's trouble never stops the others."""
    try:
        await reconcile(state, gate, logger)
    except (ApiError, StoreError) as e:
        logger.warning(f"reconcile ({why}): {e} (retried in {state.interval:g}s)")
    except LoginError as e:
        logger.error(f"cannot log in to the Kubernetes API: {e} (retried in {state.interval:g}s)")
