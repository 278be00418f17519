"""The kopf handlers of the AlignmentRun operator: observe -> decide -> act, nothing else.

Triggers, all running the same `reconcile` (serialised per run by a lock):
  * a run seen for the first time by this process (created, or listed when the operator
    starts) or whose `metadata.generation` moved (a spec change: suspend, stages, ...);
  * a resync every XWIN_RECONCILE_INTERVAL seconds (default 3) of each unfinished run not
    reconciled meanwhile (backoffs, missing Secrets and inputs heal without any event; a
    reconcile that failed on an API or store error is retried there);
  * a child changing phase (a PyTorchJob or Job finishing, a vLLM Deployment becoming
    available, a child deleted), so stages follow each other without waiting for the resync.

Only watch-event handlers (`kopf.on.event`) and indexes are registered, no change-detection
handlers (on.create/update/resume): the operator is level-based (state is recomputed from the
children, the markers and `.status.observedGeneration`), so kopf's per-object bookkeeping
(progress and last-handled-configuration annotations, each a PATCH that echoes back as one more
watch event, and a deep copy of every body for its diff) would be pure overhead: none is
written, and a killed operator has nothing of its own to recover. kopf's storages stay
configured under the `xwin.ai` prefix for any such handler added later; see `WatchOnlyDiffBase`.

`reconcile` observes the run's children from kopf indexes (the watch streams of the four child
kinds labelled `app.kubernetes.io/managed-by=xwin-operator`, grouped by `xwin.ai/run`; kopf
fills them completely before any handler runs, so a restarted operator sees every child it
made before), the stages' `_SUCCESS.json` markers and the run's inputs in the store, and the
Secrets the run names; `planner.decide` says what to do; `act` does it through kube.KubeApi,
with at most one status patch per reconcile (none when nothing changed). Transient API or
store errors are logged and retried by the resync: whatever is wrong may heal (a Secret
created, RBAC fixed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import kopf

from xwin_jobs.store import StoreError

from .builders import LABEL_RUN, MANAGED_BY, OperatorConfig
from .blocked import Blocked, api_refusal, blocked_status, child_refusal, store_problem
from .kube import ApiError, KubeApi, StoreReader
from .kubeconfig import Login, LoginError, MemFiles, load_login
from .observe import child_state, parse_run
from .planner import (CreateChild, DeleteChild, EmitEvent, Observed, PatchStatus, SuspendChild,
                      decide, input_uris, secret_refs, stage_tasks)
from .spec import API_GROUP, API_VERSION, KIND, PLURAL

RUNS = (API_GROUP, API_VERSION, PLURAL)
CHILD_RESOURCES = (("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
                   ("batch", "v1", "jobs"),
                   ("apps", "v1", "deployments"), ("", "v1", "services"))
CHILD_INDEXES = tuple(f"{plural}_by_run" for _, _, plural in CHILD_RESOURCES)
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
FINISHED = ("Succeeded", "Failed")
SECRET_TTL = 30.0  # seconds a Secret found to exist is not looked up again
SLOW_LANE = 32     # status patches and Event posts in flight at once (creates are not limited)
LOGIN_RETRY = 15.0  # seconds between tries of a login that failed


class RunGone(Exception):
    """The run was deleted while it was being reconciled."""


@dataclass
class RunGate:
    """Per-run state of this process: one reconcile at a time, the newest body the watch
    delivered, the status it last wrote (newer than a body the watch has not caught up with),
    the child phases it last saw, and when it was last reconciled."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    body: Mapping[str, Any] | None = None   # the newest body of the run seen by the watch
    generation: int | None = None           # the generation last reconciled
    run: Any = None                         # its spec parsed, for `generation` (spec changes bump it)
    tasks: dict | None = None               # planner.stage_tasks(run) for that generation
    status: dict | None = None
    phases: dict[tuple[str, str], str] = field(default_factory=dict)
    queued: bool = False
    last: float = 0.0
    blocked: str | None = None              # the reason of the block last reported (blocked.py)


@dataclass
class OperatorState:
    api: KubeApi
    store: StoreReader
    config: OperatorConfig
    login: Callable[[], Login]
    interval: float = 3.0
    gates: dict[str, RunGate] = field(default_factory=dict)
    indexes: Mapping[str, Any] = field(default_factory=dict)     # kopf's live child indexes
    secrets_found: dict[tuple[str, str], float] = field(default_factory=dict)  # -> when last found
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the indexes are complete
    resync: asyncio.Task | None = None
    # status patches and Events wait here, children creates do not: under a burst of new runs,
    # the children (what users wait for) go first
    slow_lane: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SLOW_LANE))


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(memo: Any) -> OperatorState:
    return memo.xwin


# --- operator settings and credentials ------------------------------------------------------


class WatchOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base (`xwin.ai/last-handled-configuration`) for an operator without
    change-detection handlers: kopf computes it for every event of every watched object (a deep
    copy of the body) but only create/update/resume/delete handlers read it, and this operator
    registers none, so nothing is built, read or written. Register such a handler and this must
    go back to kopf.AnnotationsDiffBaseStorage."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger,
                    **indexes: Any) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = WatchOnlyDiffBase(prefix=API_GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events tell the stage story
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660

    memfiles = MemFiles()  # key material of the kubeconfig, in memory only

    def login() -> Login:
        return load_login(memfiles)

    state = OperatorState(api=KubeApi(login), store=StoreReader(),
                          config=OperatorConfig.from_env(), login=login,
                          interval=float(os.environ.get("XWIN_RECONCILE_INTERVAL", "3")), indexes=indexes)
    state.resync = asyncio.create_task(resync_forever(state, logging.getLogger("xwin_operator.resync")))
    memo.xwin = state


@kopf.on.login()
def authenticate(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login, through the same official-client loading as the operator's own calls: a
    failure is one clear line (naming the kubeconfig, context, user and field), retried."""
    try:
        return kopf.ConnectionInfo(**_state(memo).login().connection_info())
    except LoginError as e:
        raise kopf.TemporaryError(f"cannot log in to the Kubernetes API: {e}", delay=LOGIN_RETRY) from None


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    if state.resync is not None:
        state.resync.cancel()
    await state.api.close()


# --- what is observed: indexes of the children ----------------------------------------------


async def _index_child(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict | None:
    state = child_state(body)  # async: kopf runs a sync handler through a thread pool
    return {(namespace, labels[LABEL_RUN]): state} if state is not None and LABEL_RUN in labels else None


for (_group, _version, _plural), _index_id in zip(CHILD_RESOURCES, CHILD_INDEXES):
    kopf.index(_group, _version, _plural, labels=MANAGED, id=_index_id)(_index_child)


def _children(indexes: Mapping[str, Any], namespace: str, name: str) -> list:
    key, out = (namespace, name), []
    for index_id in CHILD_INDEXES:
        index = indexes[index_id]
        if key in index:   # kopf's O(1) membership test; .get() raises and catches KeyError
            out.extend(index[key])
    return out


# --- reconcile: observe -> decide -> act -----------------------------------------------------


async def reconcile(state: OperatorState, gate: RunGate,
                    logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Reconcile the run of `gate` (its newest body), with its children as the indexes hold
    them once the lock is held (not when the trigger fired: a queued reconcile sees the
    newest children)."""
    async with gate.lock:
        gate.queued = False
        body = gate.body
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # being deleted: its children go with it (owner references); nothing to start
        meta = body["metadata"]
        try:
            await _reconcile(state, gate, body, _children(state.indexes, meta["namespace"], meta["name"]), logger)
            gate.blocked = None
        except Blocked as b:
            await report_blocked(state, gate, body, b, logger)
        except RunGone:
            state.gates.pop(meta["uid"], None)  # deleted meanwhile: nothing left to do
        finally:
            gate.last = time.monotonic()


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
            async with state.slow_lane:
                await state.api.patch_status(meta["namespace"], meta["name"], status)
        except ApiError as e:
            raise RunGone() if e.status == 404 else e from None
        gate.status = status
    if gate.blocked != blocked.reason:
        gate.blocked = blocked.reason
        await post_events(state, meta, [EmitEvent(blocked.reason, blocked.message, "Warning")], logger)


async def _reconcile(state: OperatorState, gate: RunGate, body: Mapping[str, Any], children: list,
                     logger: logging.Logger | logging.LoggerAdapter) -> None:
    meta = body["metadata"]
    uid = meta["uid"]
    generation = int(meta.get("generation") or 1)
    current = dict(body.get("status") or {})
    previous = gate.status if gate.status is not None else current
    if gate.run is not None and gate.generation == generation:
        run, actions = gate.run, []  # same spec: no need to validate it again
    else:
        run, actions = parse_run(body, previous, generation, now_iso())
        gate.tasks = stage_tasks(run, state.config) if run is not None else None
    if run is not None:
        observed = await observe(state, run, gate.tasks, children)
        gate.phases = {(c.kind, c.name): c.phase for c in children}
        actions = decide(run, observed, previous, uid=uid, generation=generation, config=state.config,
                         tasks=gate.tasks)
    await act(state, gate, body, actions, current, logger)
    gate.generation, gate.run = generation, run


async def observe(state: OperatorState, run: Any, tasks: dict, children: list) -> Observed:
    """The markers of the run's stages (`tasks`: planner.stage_tasks, each with its output
    folder), its missing Secrets and its missing external inputs (an input found once is not
    probed again: StoreReader remembers it)."""
    spec, meta = run.spec, run.metadata
    endpoint = spec.storage.endpoint
    try:
        markers = await state.store.markers(endpoint, {s: t.output for s, t in tasks.items()})
        missing_inputs = await state.store.missing(endpoint, list(input_uris(run).values()))
    except StoreError as e:
        raise store_problem(state.config.store or spec.storage.uri, endpoint, e) from None
    missing_secrets = []
    for path, name in secret_refs(run).items():
        try:
            if name not in missing_secrets and not await secret_exists(state, meta.namespace, name):
                missing_secrets.append(name)
        except ApiError as e:
            raise api_refusal(f"cannot look up Secret '{name}' ({path})", e.status, str(e)) from None
    return Observed(children=list(children), markers=markers, now=now_iso(),
                    missing_secrets=missing_secrets, missing_inputs=missing_inputs)


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


async def act(state: OperatorState, gate: RunGate, body: Mapping[str, Any], actions: list,
              current: dict, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Children first (a new child is the latency users wait for), then the one status patch
    (the planner emits at most one, and none when nothing changed), then the Events, in order.
    The status patch and the Events go through `slow_lane` (SLOW_LANE requests at once, of the
    API client's 64): under a burst of new runs, creating children is not queued behind the
    other runs' bookkeeping."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    api = state.api
    events: list[EmitEvent] = []
    for action in actions:
        if isinstance(action, CreateChild):
            m = action.manifest
            kind, child = m["kind"], m["metadata"]["name"]
            try:
                if await api.create(m):
                    logger.info(f"created {kind}/{child}")
            except ApiError as e:
                raise child_refusal(kind, child, e.status, str(e), "spec.scheduling.launcher") from None
        elif isinstance(action, DeleteChild):
            try:
                if await api.delete(action.kind, ns, action.name):
                    logger.info(f"deleted {action.kind}/{action.name}")
            except ApiError as e:
                raise api_refusal(f"cannot delete {action.kind}/{action.name}", e.status, str(e)) from None
        elif isinstance(action, SuspendChild):
            try:
                await api.set_suspended(action.kind, ns, action.name, action.suspend)
            except ApiError as e:
                raise api_refusal(f"cannot (un)suspend {action.kind}/{action.name}", e.status, str(e)) from None
            logger.info(f"{'suspended' if action.suspend else 'resumed'} {action.kind}/{action.name}")
        elif isinstance(action, PatchStatus):
            old_keys = set(current) | set(gate.status or {})
            patch = {**action.status, **{k: None for k in old_keys if k not in action.status}}
            try:
                async with state.slow_lane:
                    await api.patch_status(ns, name, patch)
            except ApiError as e:
                raise RunGone() if e.status == 404 else e from None
            gate.status = dict(action.status)
        elif isinstance(action, EmitEvent):
            events.append(action)
            logger.info(f"{action.reason}: {action.message}")
    if events:  # after the status they tell about, in order
        await post_events(state, meta, events, logger)


async def post_events(state: OperatorState, meta: Mapping[str, Any], events: list[EmitEvent],
                      logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Events on the run, in order; best effort, as Events are."""
    involved = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"]}
    async with state.slow_lane:
        for e in events:
            try:
                await state.api.post_event(involved, e.reason, e.message, e.type)
            except ApiError as err:
                logger.warning(f"could not post Event {e.reason}: {err}")


async def reconcile_logged(state: OperatorState, gate: RunGate, why: str,
                           logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Reconcile; an API or store error is logged and left to the resync (which retries every
    unfinished run not reconciled for `interval` seconds): one run's trouble never stops the others."""
    try:
        await reconcile(state, gate, logger)
    except (ApiError, StoreError) as e:
        logger.warning(f"reconcile ({why}): {e} (retried in {state.interval:g}s)")
    except LoginError as e:
        logger.error(f"cannot log in to the Kubernetes API: {e} (retried in {state.interval:g}s)")


# --- triggers ------------------------------------------------------------------------------------


def finished(body: Mapping[str, Any], written: dict | None) -> bool:
    """Succeeded or Failed for the current spec (by the newest status known here)."""
    status = written if written is not None else (body.get("status") or {})
    return status.get("phase") in FINISHED and status.get("observedGeneration") == body["metadata"].get("generation")


async def resync_forever(state: OperatorState, logger: logging.Logger) -> None:
    """The periodic trigger: every unfinished run not reconciled for `interval` seconds is
    reconciled again (backoffs expire, Secrets and inputs appear, failed reconciles and missed
    events heal).

    One loop for all runs rather than a kopf timer per run: kopf gives every object with a
    timer or daemon a finalizer, so runs could not be deleted while the operator is down, and
    a thousand timers firing together cost more than the work they trigger."""
    await state.ready.wait()
    limit = asyncio.Semaphore(16)

    async def one(gate: RunGate) -> None:
        async with limit:
            try:
                await reconcile_logged(state, gate, "resync", logger)
            except Exception:  # noqa: BLE001 - one run's bug must not stop the others' resync
                meta = (gate.body or {}).get("metadata", {})
                logger.exception(f"[{meta.get('namespace')}/{meta.get('name')}] resync failed")

    while True:
        await asyncio.sleep(state.interval / 2)
        now, due = time.monotonic(), []
        for gate in list(state.gates.values()):
            body = gate.body
            if body is None or body["metadata"].get("deletionTimestamp"):
                continue
            if now - gate.last < state.interval or gate.lock.locked():
                continue
            if not finished(body, gate.status):
                due.append(gate)
        await asyncio.gather(*(one(g) for g in due))


def _run_matters(type: str | None, body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> bool:
    """kopf's filter of run events (called for each, cheaper than a handler call): keeps the
    newest body of the run, and says whether `run_event` has anything to do: a run deleted, a
    run this process sees first (created, or listed at start-up: resume), or a new generation
    (a spec change). The echo of the run's own status patch, or a metadata-only change, wakes
    nothing."""
    state = _state(memo)
    if type == "DELETED":
        return True
    state.ready.set()  # kopf runs filters and handlers only once every index is filled
    gate = state.gates.get(uid)
    if gate is None:
        gate = state.gates[uid] = RunGate()
    gate.body = body
    return gate.generation is None or gate.generation != body.get("metadata", {}).get("generation")


@kopf.on.event(*RUNS, when=_run_matters)
async def run_event(type: str | None, uid: str, memo: kopf.Memo, logger: logging.LoggerAdapter,
                    **_: Any) -> None:
    """A run created, listed at start-up, changed (new generation) or deleted (see _run_matters)."""
    state = _state(memo)
    if type == "DELETED":
        state.gates.pop(uid, None)
    elif uid in state.gates:
        await reconcile_logged(state, state.gates[uid], "run event", logger)


def _child_gate(type: str | None, body: Mapping[str, Any], name: str, memo: kopf.Memo, **_: Any) -> RunGate | None:
    """The gate of the child's run when the child's phase moved from what the run last saw
    to one the planner acts on, and no reconcile of the run is queued yet; else None."""
    state = _state(memo)
    owners = [o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or [] if o.get("kind") == KIND]
    gate = state.gates.get(owners[0]) if owners else None
    if gate is None or gate.body is None or gate.queued:
        return None  # not seen by this process yet (its first run event reconciles it), or queued
    child = child_state(body)
    phase = "Deleted" if type == "DELETED" or child is None else child.phase
    kind = body.get("kind", "")
    if gate.phases.get((kind, name)) == phase or not decisive(kind, phase):
        return None  # nothing the planner acts on (a child created or started by us echoes back)
    return gate


def _child_matters(**kwargs: Any) -> bool:
    """kopf's filter of child events: most (a child created or started, echoing back) need
    no handler call at all."""
    return _child_gate(**kwargs) is not None


async def _child_event(logger: logging.LoggerAdapter, memo: kopf.Memo, **kwargs: Any) -> None:
    """Reconcile the parent run when a child's phase moved from what the run last saw."""
    gate = _child_gate(memo=memo, **kwargs)
    if gate is not None:
        gate.queued = True
        await reconcile_logged(_state(memo), gate, "child event", logger)


def decisive(kind: str, phase: str) -> bool:
    """Child phases the planner acts on: finished, gone, or a vLLM server ready to serve."""
    return phase in ("Succeeded", "Failed", "Deleted") or (kind == "Deployment" and phase == "Running")


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, when=_child_matters, id=f"{_plural}_event")(_child_event)
