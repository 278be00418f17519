"""One run's reconcile on Kubernetes: observe -> decide -> act, called by the run's kopf daemon
(handlers.py), one at a time per run.

`reconcile` runs core.loop's one pass with this side's parts: `KubeObserver` (observer.py: the
run's children and pods from kopf's indexes, the stages' markers and the run's inputs in the
store, the Secrets the run names) and `KubeActions` (the actions as KubeApi calls: children
first, then at most one status patch, none when nothing changed, then the Events). When
observing or acting fails (blocked.py: the store unreachable, the API refusing a child or a
lookup, a launcher's CRD missing) the run's status says so, with one Warning Event per
distinct reason. It returns how long the daemon may sleep before the next pass if nothing
wakes it (core.loop.resync_after: a backoff's end, `interval` while waiting on what no event
announces, `idle` while waiting on a child, whose changes wake the daemon). Each pass is
timed, and each status it writes observed, in the operator's metrics (metrics.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from xwin_jobs.store import StoreError

from ..api.spec import API_GROUP, API_VERSION, KIND
from ..core.children import PlannedChild
from ..core.loop import act, reconcile_once, resync_after
from ..core.planner import stage_tasks
from ..core.types import FINISHED, EmitEvent, now_iso
from .blocked import Blocked, api_refusal, blocked_status, child_refusal
from .client import ApiError
from .kubeconfig import LoginError
from .manifests import render
from .metrics import observe_status
from .observer import Indexes, KubeObserver
from .run_body import parse_run
from .state import Operator, RunState

Logger = logging.Logger | logging.LoggerAdapter


class RunGone(Exception):
    """The run was deleted while it was being reconciled."""


def finished(body: Mapping[str, Any], written: dict | None = None) -> bool:
    """Succeeded or Failed for the current spec (by the newest status known here)."""
    status = written if written is not None else (body.get("status") or {})
    return status.get("phase") in FINISHED and status.get("observedGeneration") == body["metadata"].get("generation")


async def reconcile(op: Operator, state: RunState, body: Mapping[str, Any], indexes: Indexes,
                    logger: Logger) -> float:
    """One pass for the run of `body`; the seconds until the next one if nothing wakes it."""
    if body["metadata"].get("deletionTimestamp"):
        return op.interval  # being deleted: its children go with it (owner references)
    started = time.perf_counter()
    try:
        wait = await _reconcile(op, state, body, indexes, logger)
        state.blocked = None
        return wait
    except Blocked as b:
        await report_blocked(op, state, body, b, logger)
        return op.interval
    finally:
        op.metrics.reconcile_duration.observe(time.perf_counter() - started)


async def reconcile_logged(op: Operator, state: RunState, body: Mapping[str, Any], indexes: Indexes,
                           logger: Logger) -> float | None:
    """`reconcile`, with an API or store error logged and retried after `interval` (one run's
    trouble never stops the others); None when the run is gone."""
    try:
        return await reconcile(op, state, body, indexes, logger)
    except RunGone:
        return None
    except (ApiError, StoreError) as e:
        logger.warning(f"reconcile: {e} (retried in {op.interval:g}s)")
    except LoginError as e:
        logger.error(f"cannot log in to the Kubernetes API: {e} (retried in {op.interval:g}s)")
    return op.interval


async def report_blocked(op: Operator, state: RunState, body: Mapping[str, Any], blocked: Blocked,
                         logger: Logger) -> None:
    """The run cannot progress: its status says why (phase never empty, a Progressing=False
    condition naming the field or endpoint) and, once per distinct reason, a Warning Event."""
    meta = body["metadata"]
    previous = state.status if state.status is not None else dict(body.get("status") or {})
    status = blocked_status(previous, blocked, now_iso())
    logger.warning(f"blocked: {blocked}")
    if status != previous:
        try:
            await op.api.patch_status(meta["namespace"], meta["name"], status)
        except ApiError as e:
            raise RunGone() if e.status == 404 else e from None
        state.status = status
        observe_status(op.metrics, (meta["namespace"], meta["name"]), previous, status)
    if state.blocked != blocked.reason:
        state.blocked = blocked.reason
        await post_events(op, meta, [EmitEvent(blocked.reason, blocked.message, "Warning")])


async def _reconcile(op: Operator, state: RunState, body: Mapping[str, Any], indexes: Indexes,
                     logger: Logger) -> float:
    meta = body["metadata"]
    generation = int(meta.get("generation") or 1)
    current = dict(body.get("status") or {})
    previous = state.status if state.status is not None else current
    if state.run is not None and state.generation == generation:
        run, invalid = state.run, []  # same spec: no need to validate it again
    else:
        run, invalid = parse_run(body, previous, generation, now_iso())
        state.tasks = stage_tasks(run, op.config) if run is not None else None
    executor = KubeActions(op, state, body, run, current, logger)
    wait = op.interval
    if run is None:
        await act(invalid, executor)
    else:
        observer = KubeObserver(op, run, indexes, (meta.get("uid"), generation), state.progress)
        outcome = await reconcile_once(run, observer, executor, previous, generation=generation,
                                       config=op.config, tasks=state.tasks)
        wait = resync_after(outcome, op.interval, op.idle, op.config.progress_seconds)
    if executor.events:  # after the status they tell about, in order
        await post_events(op, meta, executor.events)
    state.generation, state.run = generation, run
    return wait


class KubeActions:
    """The planner's actions as API calls (core.executor.Executor): children created, deleted,
    (un)suspended and stopped at once, the status patched, the Events collected for
    `post_events` once the actions are done; a requeue is the daemon's sleep (reconcile returns it)."""

    def __init__(self, op: Operator, state: RunState, body: Mapping[str, Any], run: Any,
                 current: dict, logger: Logger):
        self.op, self.state, self.run, self.current, self.logger = op, state, run, current, logger
        self.meta = body["metadata"]
        self.ns, self.name = self.meta["namespace"], self.meta["name"]
        self.events: list[EmitEvent] = []

    async def create(self, child: PlannedChild) -> None:
        m = render(self.run, child, self.meta["uid"], self.op.config)
        try:
            if await self.op.api.create(m):
                self.logger.info(f"created {child.kind}/{child.name}")
        except ApiError as e:
            raise child_refusal(child.kind, child.name, e.status, str(e), "spec.scheduling.launcher") from None

    async def delete(self, kind: str, name: str) -> None:
        try:
            if await self.op.api.delete(kind, self.ns, name):
                self.logger.info(f"deleted {kind}/{name}")
        except ApiError as e:
            raise api_refusal(f"cannot delete {kind}/{name}", e.status, str(e)) from None

    async def suspend(self, kind: str, name: str, suspend: bool) -> None:
        try:
            await self.op.api.set_suspended(kind, self.ns, name, suspend)
        except ApiError as e:
            raise api_refusal(f"cannot (un)suspend {kind}/{name}", e.status, str(e)) from None
        self.logger.info(f"{'suspended' if suspend else 'resumed'} {kind}/{name}")

    async def fail(self, kind: str, name: str, reason: str, message: str) -> None:
        try:
            await self.op.api.fail_child(kind, self.ns, name, reason, message)
        except ApiError as e:
            raise api_refusal(f"cannot stop {kind}/{name}", e.status, str(e)) from None
        self.logger.warning(f"stopped {kind}/{name}: {reason}: {message}")

    async def patch_status(self, status: dict) -> None:
        old_keys = set(self.current) | set(self.state.status or {})
        patch = {**status, **{k: None for k in old_keys if k not in status}}
        try:
            await self.op.api.patch_status(self.ns, self.name, patch)
        except ApiError as e:
            raise RunGone() if e.status == 404 else e from None
        previous = self.state.status if self.state.status is not None else self.current
        self.state.status = dict(status)
        observe_status(self.op.metrics, (self.ns, self.name), previous, self.state.status)

    async def event(self, reason: str, message: str, type_: str) -> None:
        self.events.append(EmitEvent(reason, message, type_))
        self.logger.info(f"{reason}: {message}")

    async def requeue(self, seconds: float, reason: str) -> None:
        """Nothing to do here: the outcome's requeue is how long the daemon sleeps."""


async def post_events(op: Operator, meta: Mapping[str, Any], events: list[EmitEvent]) -> None:
    """Post Events on the run, in order, best effort (as Events are)."""
    involved = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"]}
    await op.api.post_events(involved, [(e.reason, e.message, e.type) for e in events])
