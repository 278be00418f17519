"""What the reconciler observes of one run on Kubernetes (core.loop.Observer): its children
as kopf's indexes hold them (handlers.py), each with what its pods and Kueue Workload say
(pod_status.with_pods; a server Deployment's ended vLLM server: observe.server_failed), the
stages' `_SUCCESS.json` markers, its missing external inputs and their fingerprints in the
store (read with the run's own key: store_credentials.py), and its missing Secrets. A failed
lookup raises blocked.Blocked naming the field or endpoint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from xwin_jobs.progress import ProgressReader
from xwin_jobs.store import StoreError

from ..core.children import LABEL_ATTEMPT, LABEL_STAGE, LABEL_STEP
from ..core.types import ChildState, Phase
from .blocked import api_refusal, store_problem
from .client import ApiError
from .observe import server_failed
from .pod_status import with_pods

if TYPE_CHECKING:
    from .state import Operator



@dataclass(frozen=True)
class Indexes:
    """kopf's indexes the handlers keep (live views): the children of each child kind and the
    pods, by (namespace, run name); Kueue's Workloads by the uid of the child that owns them."""

    children: tuple[Mapping[Any, Iterable[ChildState]], ...]
    pods: Mapping[Any, Iterable[Mapping[str, Any]]]
    workloads: Mapping[Any, Iterable[Mapping[str, Any]]]

    def children_of(self, namespace: str, run: str) -> list[ChildState]:
        return [c for index in self.children for c in index.get((namespace, run), ())]

    def children_items(self) -> Iterable[tuple[Any, Iterable[ChildState]]]:
        """((namespace, run), its children of one kind) for every run the indexes hold."""
        return [item for index in self.children for item in index.items()]

    def pods_of(self, namespace: str, run: str) -> list[Mapping[str, Any]]:
        return list(self.pods.get((namespace, run), ()))

    def workload_of(self, uid: str | None) -> Mapping[str, Any] | None:
        return next(iter(self.workloads.get(uid, ())), None) if uid else None


class KubeObserver:
    """What the loop observes of a run on Kubernetes (core.loop.Observer): its children as the
    indexes hold them when its reconcile started, with their pods and Workloads; the markers
    of its stages and its missing external inputs in the store (an input found once is not
    probed again: StoreReader remembers it); its missing Secrets."""

    def __init__(self, op: Operator, run: Any, indexes: Indexes, scope: Any = None,
                 progress: ProgressReader | None = None):
        """`scope`: the run's (uid, generation), which fingerprints are cached within;
        `progress`: the run's reader of its steps' progress records (RunState.progress)."""
        self.op, self.run, self.indexes, self.scope = op, run, indexes, scope
        self.progress_reader = progress or ProgressReader()
        self.namespace, self.endpoint = run.metadata.namespace, run.spec.storage.endpoint
        self.run_name = run.metadata.name
        self.key_source = "the operator's own credentials"
        self.store_uri = op.config.store or run.spec.storage.uri

    def children(self) -> list[ChildState]:
        """The run's children, each as its pods and its Kueue Workload show it
        (pod_status.with_pods: held by Kueue, why its pods cannot run, how long none has
        started, its pods still alive); a server Deployment not available is looked at
        through its pods too (observe.server_failed: a vLLM server that ended fails it, named)."""
        pods = self.indexes.pods_of(self.namespace, self.run_name)
        queue = self.run.spec.scheduling.queueName or ""
        out = []
        for c in self.indexes.children_of(self.namespace, self.run_name):
            if c.kind == "Service":
                out.append(c)
                continue
            mine = [p for p in pods if _pod_of(p, c)]
            if c.kind == "Deployment" and c.phase == Phase.PENDING:
                c = server_failed(c, mine)
            out.append(with_pods(c, mine, self.indexes.workload_of(c.uid), queue=queue))
        return out

    async def _key(self) -> Any:
        """The run's store key (its storage.secretRef), or None: the operator's environment."""
        assert self.op.credentials is not None
        ref = self.run.spec.storage.secretRef
        key = await self.op.credentials.get(self.namespace, ref)
        self.key_source = (f"the key in Secret '{ref}' (spec.storage.secretRef)" if key is not None else
                           "the operator's own credentials" + (f" (Secret '{ref}' not found)" if ref else ""))
        return key

    async def markers(self, outputs: dict[str, str]) -> dict[str, dict | None]:
        try:
            return await self.op.store.markers(self.endpoint, outputs, await self._key())
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e, self.key_source) from None

    async def missing_inputs(self, uris: list[str]) -> list[str]:
        try:
            return await self.op.store.missing(self.endpoint, uris, await self._key())
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e, self.key_source) from None

    async def fingerprints(self, uris: list[str]) -> dict[str, str]:
        try:
            return await self.op.store.fingerprints(self.endpoint, uris, self.scope, await self._key())
        except StoreError as e:
            raise store_problem(self.store_uri, self.endpoint, e, self.key_source) from None

    async def progress(self, uris: dict[str, str]) -> dict[str, Any]:
        """The running steps' records, in a worker thread (one GET each); never an error."""
        if not uris:
            return {}
        store = self.op.store.store(self.endpoint, await self._key())
        return await asyncio.to_thread(self.progress_reader.read, store, uris)

    async def missing_secrets(self, refs: dict[str, str]) -> list[str]:
        missing: list[str] = []
        for path, name in refs.items():
            try:
                if name not in missing and not await secret_exists(self.op, self.namespace, name):
                    missing.append(name)
            except ApiError as e:
                raise api_refusal(f"cannot look up Secret '{name}' ({path})", e.status, str(e)) from None
        return missing


def _pod_of(pod: Mapping[str, Any], child: Any) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (labels.get(LABEL_STAGE), labels.get(LABEL_STEP), labels.get(LABEL_ATTEMPT)) == (
        child.stage, child.step, str(child.attempt))


async def secret_exists(op: Operator, namespace: str, name: str) -> bool:
    """Whether the Secret exists; one found is not asked for again for the config's
    secret_ttl_seconds (a missing one is asked for on every reconcile, so a Secret created heals
    the run at once)."""
    key, now, ttl = (namespace, name), time.monotonic(), op.config.secret_ttl_seconds
    if now - op.secrets_found.get(key, -ttl) < ttl:
        return True
    if await op.api.secret_exists(namespace, name):
        op.secrets_found[key] = now
        return True
    op.secrets_found.pop(key, None)
    return False
