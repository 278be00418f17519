"""A test Kueue for the fake API server: what the operator sees of Kueue, no quota arithmetic.

* Its webhook (the API server's mutating admission) creates every child labelled
  `kueue.x-k8s.io/queue-name` suspended (PyTorchJob `spec.runPolicy.suspend`, Job and TrainJob
  `spec.suspend`), as Kueue's job webhooks do.
* Its controller gives each such child a Workload (owned by the child, labelled with its uid)
  whose `QuotaReserved` condition is False with Kueue's message, and holds the child there.
* `admit(name)` reserves quota and admits the Workload, then unsuspends the child (Kueue's
  job reconciler); `evict(name)` marks it Evicted (Preempted) and suspends the child again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .apiserver import now_iso
from .cluster import ApiError, Cluster
from .paths import resource_path

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"
JOBS = {"kubeflow.org/v1/pytorchjobs": "PyTorchJob", "batch/v1/jobs": "Job",
        "trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob"}
PENDING_MESSAGE = ("couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu "
                   "in flavor h100, 8 more needed")


def _suspend_patch(resource: str, suspend: bool) -> dict:
    return {"spec": {"runPolicy": {"suspend": suspend}}} if resource.endswith("pytorchjobs") else {"spec": {"suspend": suspend}}


def _condition(type_: str, status: str, reason: str, message: str) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": now_iso()}


class TestKueue:
    __test__ = False  # not a pytest class

    def __init__(self, cluster: Cluster, namespace: str):
        self.cluster, self.namespace = cluster, namespace
        self._task: asyncio.Future | None = None
        self.children: dict[str, tuple[str, str]] = {}   # child name -> (resource, uid)

    def webhook(self, resource: str, body: dict) -> None:
        labels = (body.get("metadata") or {}).get("labels") or {}
        if resource in JOBS and QUEUE_LABEL in labels:
            spec = body.setdefault("spec", {})
            if resource.endswith("pytorchjobs"):
                spec.setdefault("runPolicy", {})["suspend"] = True
            else:
                spec["suspend"] = True

    def start(self) -> "TestKueue":
        assert self.cluster.api is not None
        self.cluster.api.admission.append(self.webhook)
        self._task = self.cluster.spawn(self._run)
        return self

    def stop(self) -> None:
        if self._task is not None:
            self.cluster.loop.call_soon_threadsafe(self._task.cancel)

    async def _run(self) -> None:
        while True:  # a slow controller loop is enough: it only creates Workloads
            for resource in JOBS:
                try:
                    items = (await self.cluster._request("get", resource_path(resource, self.namespace))).get("items") or []
                except ApiError:
                    continue
                for job in items:
                    meta = job["metadata"]
                    if QUEUE_LABEL in (meta.get("labels") or {}) and meta["name"] not in self.children:
                        self.children[meta["name"]] = (resource, meta["uid"])
                        await self._workload(resource, job)
            await asyncio.sleep(0.2)

    async def _workload(self, resource: str, job: dict) -> None:
        meta = job["metadata"]
        body = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": f"{JOBS[resource].lower()}-{meta['name']}-1a2b3", "namespace": self.namespace,
                             "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                             "ownerReferences": [{"apiVersion": job.get("apiVersion", ""), "kind": JOBS[resource],
                                                  "name": meta["name"], "uid": meta["uid"], "controller": True}]},
                "spec": {"queueName": meta["labels"][QUEUE_LABEL]}}
        await self.cluster._request("post", resource_path(WORKLOADS, self.namespace), body)
        await self._status(body["metadata"]["name"], [_condition("QuotaReserved", "False", "Pending", PENDING_MESSAGE)])

    async def _status(self, workload: str, conditions: list[dict]) -> None:
        await self.cluster._request("patch", resource_path(WORKLOADS, self.namespace, workload, "status"),
                                    {"status": {"conditions": conditions}})

    def workload_of(self, child: str) -> str:
        resource, _ = self.children[child]
        return f"{JOBS[resource].lower()}-{child}-1a2b3"

    def admit(self, child: str) -> None:
        resource, _ = self.children[child]

        async def run() -> None:
            await self._status(self.workload_of(child), [
                _condition("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
                _condition("Admitted", "True", "Admitted", "The workload is admitted")])
            await self.cluster._request("patch", resource_path(resource, self.namespace, child), _suspend_patch(resource, False))
        self.cluster.call(run)

    def evict(self, child: str) -> None:
        resource, _ = self.children[child]

        async def run() -> None:
            await self._status(self.workload_of(child), [
                _condition("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload"),
                _condition("QuotaReserved", "False", "Pending", PENDING_MESSAGE),
                _condition("Admitted", "False", "NoReservation", "The workload has no reservation")])
            await self.cluster._request("patch", resource_path(resource, self.namespace, child), _suspend_patch(resource, True))
        self.cluster.call(run)

    def suspends(self, child: str) -> list[Any]:
        """The child's suspend flag in every version the API server stored, oldest first."""
        resource, _ = self.children[child]
        out = []
        for v in self.cluster.history(resource, self.namespace, child):
            if v is not None:
                spec = v.get("spec") or {}
                out.append((spec.get("runPolicy") or {}).get("suspend") if "runPolicy" in spec else spec.get("suspend"))
        return out
