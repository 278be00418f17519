"""The kopf handlers of the AlignmentRun operator: observe -> decide -> act, nothing else.

Triggers, all running the same `reconcile` (serialised per run by a lock):
  * a run seen for the first time by this process (created, or listed when the operator
    starts) or whose `metadata.generation` moved (a spec change: suspend, stages, ...);
  * a resync of each unfinished run when its reconcile said (reconciler.py, RunGate.due):
    XWIN_RECONCILE_INTERVAL seconds (default 3) after it while it waits on what no event
    announces (missing Secrets and inputs heal without any event; a reconcile that failed on
    an API or store error or was blocked is retried there), at a backoff's end, and ten
    intervals after it while it only waits on its children (a safety net for missed events);
  * a child changing phase (a PyTorchJob or Job finishing, a vLLM Deployment becoming
    available, a child deleted), so stages follow each other without waiting for the resync;
    while new runs are arriving, at most a few of these at once (admission.py: new runs first).

Only watch-event handlers (`kopf.on.event`) are registered, no indexes and no change-detection
handlers (on.create/update/resume): the operator is level-based (state is recomputed from the
children, the markers and `.status.observedGeneration`), so kopf's per-object bookkeeping
(progress and last-handled-configuration annotations, each a PATCH that echoes back as one more
watch event, and a deep copy of every body for its diff) would be pure overhead: none is
written, and a killed operator has nothing of its own to recover. kopf's storages stay
configured under the `xwin.ai` prefix for any such handler added later (progress); the diff-base
is `WatchOnlyDiffBase`, on kopf's public abstract storage.

`reconcile` observes the run's children from the child book (child_book.py: the watch streams
of the five child kinds labelled `app.kubernetes.io/managed-by=xwin-operator`, grouped by
`xwin.ai/run`, fed by the child event filters; a namespace's first reconcile lists its children
once and waits until the watch has shown each, so a restarted operator sees every child it made
before: kopf indexes promised the same at the price of kopf's handler machinery for every child
event), the stages' `_SUCCESS.json` markers and the run's inputs in the store, and the
Secrets the run names; `planner.decide` says what to do; the actions become kube.KubeApi calls,
with at most one status patch per reconcile (none when nothing changed): core.loop's one pass,
with reconciler.py's observer and actions. When observing or
acting fails (the store unreachable, the API refusing a child or a lookup, a launcher's CRD
missing: blocked.py) the run's status says so (a Progressing=False condition naming the field
or endpoint, never an empty phase) with one Warning Event per distinct reason, and the resync
retries: whatever is wrong may heal (a Secret created, RBAC fixed). Logging in (kopf's and the
client's) goes through kubeconfig.load_login: the official client's loading, no key on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Mapping

import kopf

from ..api.spec import API_GROUP, API_VERSION, KIND, PLURAL
from ..core.children import MANAGED_BY
from ..core.config import OperatorConfig
from ..core.types import ChildState
from .client import KubeApi, verify_login
from .kubeconfig import Login, LoginError, MemFiles, load_login
from .observe import child_state
from .reconciler import OperatorState, RunGate, finished, reconcile_logged
from .store_reader import StoreReader

RUNS = (API_GROUP, API_VERSION, PLURAL)
CHILD_RESOURCES = (("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
                   ("batch", "v1", "jobs"),
                   ("apps", "v1", "deployments"), ("", "v1", "services"))
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
LOGIN_RETRY = 15.0  # seconds between tries of a login that failed


def _state(memo: Any) -> OperatorState:
    return memo.xwin


# --- operator settings and credentials ------------------------------------------------------


class WatchOnlyDiffBase(kopf.DiffBaseStorage):
    """kopf's diff-base storage for an operator without change-detection handlers, written
    against kopf's public abstract storage (`fetch`, `store`; `build` may be overridden): kopf
    computes a diff-base for every event of every watched object (a deep copy of the body), but
    only create/update/resume/delete handlers read it, and this operator registers none, so
    nothing is built, read or written. Register such a handler and this must become
    kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP, key="last-handled-configuration")."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger,
                    **_: Any) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = WatchOnlyDiffBase()
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events tell the stage story
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660

    memfiles = MemFiles()  # key material of the kubeconfig, in memory only

    def login() -> Login:
        return load_login(memfiles)

    state = OperatorState(api=KubeApi(login), store=StoreReader(), config=OperatorConfig.from_env(), login=login,
                          interval=float(os.environ.get("XWIN_RECONCILE_INTERVAL", "3")))
    state.resync = asyncio.create_task(resync_forever(state, logging.getLogger("xwin_operator.resync")))
    memo.xwin = state


@kopf.on.login()
def authenticate(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login, through the same official-client loading as the operator's own calls: a
    failure is one clear line (naming the kubeconfig, context, user and field), retried."""
    try:
        login = _state(memo).login()
        verify_login(login)
        return kopf.ConnectionInfo(**login.connection_info())
    except LoginError as e:
        raise kopf.TemporaryError(f"cannot log in to the Kubernetes API: {e}", delay=LOGIN_RETRY) from None


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    if state.resync is not None:
        state.resync.cancel()
    await state.api.close()


# --- reconcile: observe -> decide -> act -----------------------------------------------------


# --- triggers ------------------------------------------------------------------------------------


async def resync_forever(state: OperatorState, logger: logging.Logger) -> None:
    """The periodic trigger: every unfinished run whose `due` time (set by its last reconcile:
    reconciler.py) has passed is reconciled again (backoffs expire, Secrets and inputs appear,
    failed reconciles and missed events heal).

    One loop for all runs rather than a kopf timer per run: kopf gives every object with a
    timer or daemon a finalizer, so runs could not be deleted while the operator is down, and
    a thousand timers firing together cost more than the work they trigger."""
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
            if now < gate.due or gate.lock.locked():
                continue
            if not finished(body, gate.status):
                due.append(gate)
        await asyncio.gather(*(one(g) for g in due))


def _run_matters(type: str | None, event: Mapping[str, Any], uid: str, memo: kopf.Memo, **_: Any) -> bool:
    """kopf's filter of run events (called for each, cheaper than a handler call): keeps the
    newest body of the run, and says whether `run_event` has anything to do: a run deleted, a
    run this process sees first (created, or listed at start-up: resume), or a new generation
    (a spec change). The echo of the run's own status patch, or a metadata-only change, wakes
    nothing.

    Bodies are kept and read as the watch event's plain dict (`event["object"]`), not kopf's
    `body` view: every read through the view resolves its path again (profiled with 1000 runs
    at once, copying the status out of the view took three quarters of the time of planning)."""
    state = _state(memo)
    if type == "DELETED":
        return True
    body = event["object"]
    gate = state.gates.get(uid)
    if gate is None:  # its run event reconciles it; the resync only if that fails to
        gate = state.gates[uid] = RunGate(due=time.monotonic() + state.interval)
        state.lane.arrived()
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


def _child_gate(state: OperatorState, body: Mapping[str, Any], name: str, child: ChildState | None) -> RunGate | None:
    """The gate of the child's run when the child's phase moved from what the run last saw
    to one the planner acts on, and no reconcile of the run is queued yet; else None (`child`:
    None when it was deleted)."""
    owners = [o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or [] if o.get("kind") == KIND]
    gate = state.gates.get(owners[0]) if owners else None
    if gate is None or gate.body is None or gate.queued:
        return None  # not seen by this process yet (its first run event reconciles it), or queued
    phase = "Deleted" if child is None else child.phase
    kind = body.get("kind", "")
    before = gate.phases.get((kind, name))
    if before == phase or not decisive(kind, phase, before):
        return None  # nothing the planner acts on (a child created or started by us echoes back)
    return gate


def _child_matters(type: str | None, event: Mapping[str, Any], name: str, memo: kopf.Memo, **_: Any) -> bool:
    """kopf's filter of child events: every event goes into the child book (what reconciles
    read), and most (a child created or started, echoing back) need no handler call at all.
    The body is the event's plain dict, as for runs (`_run_matters`)."""
    state = _state(memo)
    body = event["object"]
    return _child_gate(state, body, name, state.book.saw(type, body)) is not None


async def _child_event(type: str | None, event: Mapping[str, Any], name: str, logger: logging.LoggerAdapter,
                       memo: kopf.Memo, **_: Any) -> None:
    """Reconcile the parent run when a child's phase moved from what the run last saw, in the
    completion lane: while new runs arrive, their first reconciles go first (admission.py)."""
    state = _state(memo)
    body = event["object"]
    child = None if type == "DELETED" else child_state(body)
    gate = _child_gate(state, body, name, child)
    if gate is not None:
        gate.queued = True
        async with state.lane:
            await reconcile_logged(state, gate, "child event", logger)


def decisive(kind: str, phase: str, before: str | None = None) -> bool:
    """Child phases the planner acts on: finished, gone, a vLLM server ready to serve, or one
    that was and is no more (its server ended: the reconcile reads why from its pods)."""
    return phase in ("Succeeded", "Failed", "Deleted") or (kind == "Deployment" and (
        phase == "Running" or phase == "Pending" and before == "Running"))


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, when=_child_matters, id=f"{_plural}_event")(_child_event)
