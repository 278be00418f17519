"""The kopf handlers of the AlignmentRun operator.

  * indexes (`@kopf.index`): the children of each child kind (PyTorchJob, TrainJob, Job,
    Deployment, Service labelled `app.kubernetes.io/managed-by=xwin-operator`) and their pods,
    by (namespace, run name), as the planner sees them (observe.child_state, a pod's summary);
    Kueue's Workloads by the uid of the child that owns them. kopf fills every index from its
    first listing before any handler runs, so a restarted operator sees every child it made
    before it plans a run again;
  * one daemon per unfinished run (`@kopf.daemon`, while `unfinished`): a plain loop around
    reconciler.py's pass (observe -> decide -> act), sleeping until a change wakes it or until
    the pass's own deadline (a backoff's end, a Secret or input that may appear, a slow safety
    resync). kopf stops it when the run finishes or is deleted (it keeps its finalizer
    `xwin.ai/finalizer` on the run meanwhile, and removes it then);
  * event handlers that wake a run's daemon: a child or a pod of it changed, or its spec
    (a new generation: suspend, stages, ...);
  * the operator's Prometheus metrics (metrics.py): served at /metrics on
    OperatorConfig.metrics_port from start-up to cleanup; every run the watch shows, finished
    or not, is counted by phase (`run_seen`), a deleted one leaves the gauges.

Settings come in one OperatorConfig through kopf's memo (`python -m xwin_operator` builds it
from its flags and XWIN_* variables). Logging in (kopf's and the client's) goes through
kubeconfig.load_login: the official client's loading, no key on disk.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

import kopf

from ..api.spec import API_GROUP, API_VERSION, PLURAL
from ..core.children import LABEL_RUN, MANAGED_BY
from ..core.config import OperatorConfig
from .client import KubeApi, verify_login
from .kubeconfig import Login, LoginError, MemFiles, load_login
from .metrics import Metrics, serve
from .observe import child_state
from .observer import Indexes
from .pod_status import pod_seen, pod_summary
from .reconciler import finished, reconcile_logged
from .state import Operator, RunState
from .store_reader import StoreReader

RUNS = (API_GROUP, API_VERSION, PLURAL)
CHILD_RESOURCES = (("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
                   ("batch", "v1", "jobs"), ("apps", "v1", "deployments"), ("", "v1", "services"))
WORKLOADS = ("kueue.x-k8s.io", "v1beta1", "workloads")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
LOGIN_RETRY = 15.0  # seconds between tries of a login that failed
LOG = logging.getLogger(__name__)


# --- start-up, login, shutdown -----------------------------------------------------------------


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff-base storage for an operator without change-detection handlers
    (on.create/update/resume/field), on kopf's public abstract storage: kopf builds a diff-base
    (a deep copy of the body) for every event of every watched object, which only those
    handlers read; this builds, reads and writes nothing (a sixth of the operator's busy CPU
    under bench_operator_churn went to those copies). Add such a handler and this must become
    kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP, key="last-handled-configuration")."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events tell the stage story
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # a run daemon told to stop (its run finished or deleted) ends its pass and exits within
    # this: kopf then removes the finalizer at once instead of after the cancellation backoff
    settings.background.instant_exit_timeout = 2.0
    config = memo.get("config") or OperatorConfig.from_env()
    memfiles = MemFiles()  # key material of the kubeconfig, in memory only

    def login() -> Login:
        return load_login(memfiles)

    metrics = Metrics()
    memo.xwin = op = Operator(api=KubeApi(login, on_error=metrics.api_error), store=StoreReader(), config=config,
                              login=login, metrics=metrics)
    if config.metrics_port:
        try:
            op.metrics_server = await serve(metrics, config.metrics_port)
        except OSError as e:   # runs matter more than their metrics: say so, and go on
            LOG.error(f"cannot serve metrics on port {config.metrics_port} (XWIN_METRICS_PORT): {e}")


@kopf.on.login()
def authenticate(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login, through the same official-client loading as the operator's own calls: a
    failure is one clear line (naming the kubeconfig, context, user and field), retried."""
    try:
        login = memo.xwin.login()
        verify_login(login)
        return kopf.ConnectionInfo(**login.connection_info())
    except LoginError as e:
        raise kopf.TemporaryError(f"cannot log in to the Kubernetes API: {e}", delay=LOGIN_RETRY) from None


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if memo.xwin.metrics_server is not None:
        await memo.xwin.metrics_server.cleanup()
        memo.xwin.metrics_server = None
    await memo.xwin.api.close()


# --- indexes ------------------------------------------------------------------------------------
# Every index and event handler here is `async def`: each is a few dict reads, and kopf runs a
# plain `def` handler in a worker thread (a thread hop per watch event).


def _by_run(namespace: str | None, labels: Mapping[str, str], value: Any) -> dict | None:
    run = labels.get(LABEL_RUN)
    return {(namespace, run): value} if run and value is not None else None


async def children_index(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict | None:
    return _by_run(namespace, labels, child_state(body))


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.index(_group, _version, _plural, labels=MANAGED, id=_plural)(children_index)


@kopf.index("", "v1", "pods", labels=MANAGED)
async def pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict | None:
    return _by_run(namespace, labels, pod_summary(body))


@kopf.index(*WORKLOADS)
async def workloads(body: kopf.Body, **_: Any) -> dict | None:
    owners = [o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or []]
    status = body.get("status") or {}
    return {owners[0]: {"metadata": {"name": body["metadata"]["name"]},
                        "status": {"conditions": list(status.get("conditions") or [])}}} if owners else None


def indexes_of(kwargs: Mapping[str, Any]) -> Indexes:
    """The indexes among a handler's kwargs (kopf passes each by its id)."""
    return Indexes(children=tuple(kwargs[plural] for _, _, plural in CHILD_RESOURCES),
                   pods=kwargs["pods"], workloads=kwargs["workloads"])


# --- one daemon per unfinished run --------------------------------------------------------------


def unfinished(body: kopf.Body, **_: Any) -> bool:
    """kopf's filter of the run daemon: a run not yet Succeeded or Failed for its spec."""
    return not finished(body)


@kopf.daemon(*RUNS, when=unfinished, cancellation_backoff=10.0, cancellation_timeout=10.0)
async def run_daemon(stopped: kopf.DaemonStopped, name: str, namespace: str, body: kopf.Body,
                     memo: kopf.Memo, logger: logging.LoggerAdapter, **kwargs: Any) -> None:
    """The run's loop: a pass, then sleep until something wakes it or the pass's deadline.
    It never returns on its own (kopf would not start it again for this run): kopf stops it
    once the run's status says it finished, or it is deleted, and cancels it only if a pass
    has not ended `cancellation_backoff` seconds later (its Events are posted after its status)."""
    op: Operator = memo.xwin
    state = op.runs.setdefault((namespace, name), RunState())
    indexes = indexes_of(kwargs)
    try:
        while not stopped:
            state.wake.clear()
            if finished(_plain(body), state.status):   # written; kopf stops this once it sees it
                await _sleep(state.wake, stopped, op.idle)
                continue
            wait = await reconcile_logged(op, state, _plain(body), indexes, logger)
            await _sleep(state.wake, stopped, op.interval if wait is None else wait)
    finally:
        if op.runs.get((namespace, name)) is state:
            del op.runs[(namespace, name)]


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    woken = asyncio.ensure_future(wake.wait())
    ended = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait([woken, ended], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        ended.cancel()


def _plain(body: kopf.Body) -> dict:
    """The run's newest body as plain data (kopf's daemon body is a live view)."""
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


# --- what wakes a run ----------------------------------------------------------------------------


def _wake(memo: kopf.Memo, namespace: str | None, run: str | None, what: str | None = None,
          seen: Any = None) -> None:
    """Wake the run's daemon; with `what`, only if `seen` (what its pass would see of that
    object) differs from what the last event of it showed."""
    state = memo.xwin.runs.get((namespace, run))
    if state is None:
        return
    if what is not None:
        if state.seen.get(what, ...) == seen:
            return  # a change the planner does not see (a heartbeat of its status)
        state.seen[what] = seen
    state.wake.set()


def spec_changed(body: kopf.Body, **_: Any) -> bool:
    """A new generation the run's status has not answered yet (not the echo of our own patch)."""
    return body.get("metadata", {}).get("generation") != (body.get("status") or {}).get("observedGeneration")


@kopf.on.event(*RUNS, when=spec_changed)
async def run_changed(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, namespace, name)


@kopf.on.event(*RUNS)
async def run_seen(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every run in the metrics' phase count from its first sight (a finished one has no
    daemon; after a restart every run is first seen here); gone once deleted."""
    if type == "DELETED":
        memo.xwin.metrics.forget((namespace, name))
    else:
        memo.xwin.metrics.seen((namespace, name), body.get("status") or {})


async def child_changed(type: str | None, name: str, namespace: str | None, labels: Mapping[str, str],
                  body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A child of a run changed as the planner sees it (or is gone): its run's next pass sees it."""
    seen = None if type == "DELETED" else child_state(body)
    _wake(memo, namespace, labels.get(LABEL_RUN), f"{body.get('kind')}/{name}", seen)


async def pod_changed(type: str | None, name: str, namespace: str | None, labels: Mapping[str, str],
                body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A pod of a run started, ended, went away, or got stuck (pod_status.pod_seen)."""
    seen = None if type == "DELETED" else pod_seen(body)
    _wake(memo, namespace, labels.get(LABEL_RUN), f"Pod/{name}", seen)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_changed")(child_changed)
kopf.on.event("", "v1", "pods", labels=MANAGED)(pod_changed)


@kopf.on.event(*WORKLOADS)
async def workload_changed(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
    """Kueue admitted, evicted or re-queued a Workload: wake the run of the child owning it."""
    owners = {o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or []}
    for (ns, run), children in indexes_of(kwargs).children_items():
        if ns == namespace and any(c.uid in owners for c in children):
            _wake(memo, ns, run)
