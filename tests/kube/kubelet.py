"""A test kubelet (plus the controllers it stands for) for the fake API server.

It watches PyTorchJobs, Jobs, Deployments and Services over the API and, for each child:
  * runs each pod's command as a local process (see pods.py), or with `runtime="podman"` as a
    container of the image it names (podman.py, after `make images`): every TrainJob node
    (trainjob.py) and every PyTorchJob replica with
    MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK (and torchrun's PET_*) as the Kubeflow Training
    Operator sets them; a Job's single pod; a Deployment's initContainers (to completion), then
    its server on a loopback port that its Service name resolves to for the pods started after
    it (with `server_python` when given: the vLLM virtualenv);
  * writes back the status the real controller would: PyTorchJob conditions (Created, Running,
    Restarting, Suspended, Succeeded, Failed) with `restartPolicy: ExitCode` semantics and
    `runPolicy.backoffLimit`; Job active/succeeded/failed counts and Complete/Failed/Suspended
    conditions with `podFailurePolicy` FailJob rules and `backoffLimit`; Deployment
    readyReplicas/availableReplicas and the Available condition once `/health` answers;
  * honours suspension (PyTorchJob `runPolicy.suspend`, Job `spec.suspend`): processes are
    killed and restarted when resumed; deleting a child kills its processes.

`instant=fn` skips processes: `fn(child)` returns an `Outcome` at once (for benchmarks and
fast tests); `fn` may write the stage's marker the way the real job would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import aiohttp

from .paths import resource_path
from .cluster import ApiError, Cluster
from .podman import remove_container
from .pods import default_base_env
from .pytorchjob import PyTorchJobRunner
from .runners import DeploymentRunner, InstantFn, JobRunner, Outcome  # noqa: F401
from .trainjob import TrainJobRunner

REPO_ROOT = str(Path(__file__).resolve().parents[2])
CHILD_RESOURCES = {"kubeflow.org/v1/pytorchjobs": "PyTorchJob", "trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob",
                   "batch/v1/jobs": "Job", "apps/v1/deployments": "Deployment"}


class Kubelet:
    def __init__(self, cluster: Cluster, *, work: Path, namespace: str | None = None,
                 cwd: str = REPO_ROOT, python: str = sys.executable,
                 python_for_image: Callable[[str], str] | None = None, server_python: str | None = None,
                 extra_env: dict[str, str] | None = None, instant: InstantFn | None = None,
                 runtime: str = "process"):
        """`runtime`: "process" (each container's command as a local process, the image
        replaced by a local interpreter) or "podman" (each container in the image it names,
        as podman.py runs it: `make images` first)."""
        if runtime not in ("process", "podman"):
            raise ValueError(f"runtime must be process or podman, got {runtime!r}")
        self.runtime = runtime
        self.cluster, self.work, self.namespace, self.cwd = cluster, Path(work), namespace, cwd
        self.python_for_image = python_for_image or (lambda image: python)
        self.server_python = server_python  # Deployments' servers (vLLM); None: by image
        self.extra_env = dict(extra_env or {})
        self.instant = instant
        self.base_env = default_base_env()
        self.services: dict[tuple[str, str], dict] = {}
        self.ports: dict[tuple[str, str], int] = {}          # (ns, deployment) -> ready local port
        self.runners: dict[tuple[str, str, str], Any] = {}
        self.starts: Counter[tuple[str, str]] = Counter()    # (kind, name) -> pod processes started
        self.pids: set[int] = set()
        self.containers: set[str] = set()                    # podman mode: containers started
        self._task: asyncio.Future | None = None

    # --- lifecycle (called from the test thread) ------------------------------------------
    def start(self) -> "Kubelet":
        self.work.mkdir(parents=True, exist_ok=True)
        self._task = self.cluster.spawn(self.run)
        return self

    def stop(self) -> None:
        if self._task is not None:
            async def cancel() -> None:
                for runner in list(self.runners.values()):
                    runner.task.cancel()
                self._task.cancel()
            try:
                self.cluster.call(cancel)
            except Exception:  # noqa: BLE001 - the loop may already be gone
                pass
        self.kill_all()

    def kill_all(self) -> None:
        for pid in list(self.pids):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.pids.clear()
        for name in list(self.containers):
            remove_container(name)
        self.containers.clear()

    # --- watching ------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(*(self._watch(res) for res in ["v1/services", *CHILD_RESOURCES]))

    async def _watch(self, resource: str) -> None:
        path = resource_path(resource, self.namespace)
        while True:
            try:
                assert self.cluster.api is not None
                async with self.cluster.api.request("get", path, params={"watch": "true"},
                                                    timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    async for line in resp.content:
                        if line.strip():
                            self._dispatch(resource, json.loads(line))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                await asyncio.sleep(0.2)

    def _dispatch(self, resource: str, event: dict) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if resource == "v1/services":
            if event["type"] == "DELETED":
                self.services.pop((ns, name), None)
            else:
                self.services[(ns, name)] = obj
            return
        key = (resource, ns, name)
        runner = self.runners.get(key)
        if event["type"] == "DELETED":
            if runner is not None and runner.uid == meta.get("uid"):
                runner.task.cancel()
                del self.runners[key]
            return
        if runner is not None and runner.uid != meta.get("uid"):  # re-created with the same name
            runner.task.cancel()
            runner = None
        if runner is None:
            cls = {"PyTorchJob": PyTorchJobRunner, "TrainJob": TrainJobRunner, "Job": JobRunner,
                   "Deployment": DeploymentRunner}
            runner = cls[CHILD_RESOURCES[resource]](self, resource, obj)
            self.runners[key] = runner
        else:
            runner.update(obj)

    # --- helpers for runners -------------------------------------------------------------------
    def service_ports(self, namespace: str) -> dict[str, int]:
        """Service name -> local port of the ready Deployment its selector matches."""
        out: dict[str, int] = {}
        for (ns, svc_name), svc in self.services.items():
            selector = (svc.get("spec") or {}).get("selector") or {}
            for (dns, dep_name), port in self.ports.items():
                runner = self.runners.get(("apps/v1/deployments", dns, dep_name))
                labels = (((runner.body.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels", {}) if runner else {}
                if ns == namespace == dns and selector and all(labels.get(k) == v for k, v in selector.items()):
                    out[svc_name] = port
        return out

    async def secrets_for(self, namespace: str, template: dict) -> dict[str, dict | None]:
        names = {e["valueFrom"]["secretKeyRef"]["name"]
                 for c in (template.get("spec") or {}).get("containers", [])
                 for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})}
        found: dict[str, dict | None] = {}
        for n in names:
            try:
                found[n] = await self.cluster._request("get", resource_path("v1/secrets", namespace, n))
            except ApiError as e:
                if e.status != 404:
                    raise
                found[n] = None
        return found
