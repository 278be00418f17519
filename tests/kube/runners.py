"""The controllers the test kubelet stands for, one `ChildRunner` per child object:
`JobRunner` (the Job controller; PyTorchJobRunner, the Training Operator, is in pytorchjob.py) and
`DeploymentRunner` (Deployment controller plus readiness probes, and its pods' Pod objects:
pod_objects.py). Each runs its pods as local
processes (pods.py) or, with an `instant` outcome, none, and writes back the child's status.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aiohttp

from .apiserver import now_iso
from .paths import resource_path
from .cluster import ApiError
from .pod_objects import pod_deleted, pod_exited, pod_finished, pod_started, termination_file
from .podman import podman_process, remove_container, secret_values
from .pods import LocalProcess, PodConfigError, free_port, pod_process

if TYPE_CHECKING:
    from .kubelet import Kubelet


@dataclass
class Outcome:
    phase: str = "Succeeded"      # Succeeded | Failed
    exit_code: int = 0
    message: str = ""


InstantFn = Callable[[dict], "Outcome | Awaitable[Outcome]"]


def condition(type_: str, reason: str, message: str, status: str = "True") -> dict:
    now = now_iso()
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": now, "lastTransitionTime": now}


def exit_code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # -9 (SIGKILL) -> 137


class ChildRunner:
    """Drives one child: `run()` is its controller loop; `update()` feeds it new versions."""

    def __init__(self, kubelet: "Kubelet", resource: str, body: dict):
        self.kubelet, self.resource, self.body = kubelet, resource, body
        meta = body["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta.get("uid")
        self.changed = asyncio.Event()
        self.procs: list[asyncio.subprocess.Process] = []
        self.containers: list[str] = []   # podman mode: the containers of `procs`
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.pending: dict[str, Any] = {}
        self.task = asyncio.ensure_future(self._main())

    def update(self, body: dict) -> None:
        self.body = body
        self.changed.set()

    async def _main(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            pass
        finally:
            self.kill()

    async def run(self) -> None:
        raise NotImplementedError

    async def patch_status(self, defer: bool = False, **changes: Any) -> None:
        """Patch the status; `defer` keeps the changes for the next patch (an instant child that
        finishes at once reports its whole story in one write)."""
        self.status.update(changes)
        self.pending.update(changes)
        if defer:
            return
        changes, self.pending = self.pending, {}
        try:
            await self.kubelet.cluster._request(
                "patch", resource_path(self.resource, self.ns, self.name, "status"), {"status": changes})
        except ApiError as e:
            if e.status != 404:
                raise

    async def instant_outcome(self) -> Outcome:
        try:
            result = self.kubelet.instant(self.body)  # type: ignore[misc]
            return await result if inspect.isawaitable(result) else result
        except Exception as e:  # noqa: BLE001 - a crashing "pod", reported like one
            log = self.kubelet.work / "logs" / f"{self.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write("".join(traceback.format_exception(e)))
            return Outcome("Failed", 1, f"{type(e).__name__}: {e}")

    async def instant_unless_suspended(self, suspended: Callable[[], bool]) -> Outcome | None:
        """The instant outcome, or None when the child is suspended before it is ready."""
        task = asyncio.ensure_future(self.instant_outcome())
        try:
            await asyncio.wait([task], timeout=0.05)
            if not task.done() and self.pending:
                await self.patch_status()  # not instant after all: report it started
            while not task.done():
                self.changed.clear()
                change = asyncio.ensure_future(self.changed.wait())
                await asyncio.wait([task, change], return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                if not task.done() and suspended():
                    return None
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    async def start(self, proc: LocalProcess) -> asyncio.subprocess.Process:
        proc.log.parent.mkdir(parents=True, exist_ok=True)
        for folder in proc.folders:
            folder.mkdir(parents=True, exist_ok=True)
        with open(proc.log, "ab") as log:
            log.write(f"$ {' '.join(proc.argv)}\n".encode())
            log.flush()
            p = await asyncio.create_subprocess_exec(*proc.argv, env=proc.env, cwd=proc.cwd, stdout=log,
                                                     stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.kubelet.pids.add(p.pid)
        if proc.container:
            self.containers.append(proc.container)
            self.kubelet.containers.add(proc.container)
        self.kubelet.starts[(self.body.get("kind", ""), self.name)] += 1
        return p

    def kill(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.kubelet.pids.discard(p.pid)
        self.procs = []
        for name in self.containers:   # podman mode: the container outlives its killed client
            remove_container(name)
            self.kubelet.containers.discard(name)
        self.containers = []

    async def process_for(self, pod_name: str, template: dict, extra: dict[str, str] | None = None,
                          port: int | None = None, container: dict | None = None,
                          python: str | None = None) -> LocalProcess | None:
        """The local process of a pod's container (default: the first), or None while its
        config cannot be resolved (the kubelet's CreateContainerConfigError: retried until it can)."""
        try:
            secrets = await self.kubelet.secrets_for(self.ns, template)
            if self.kubelet.runtime == "podman":
                return podman_process(pod_name, template, container=container or template["spec"]["containers"][0],
                                      work=self.kubelet.work, secrets=secret_values(secrets),
                                      services=self.kubelet.service_ports(self.ns),
                                      extra_env={**self.kubelet.extra_env, **(extra or {})}, port=port)
            image = (container or template["spec"]["containers"][0]).get("image", "")
            return pod_process(pod_name, self.ns, template, python=python or self.kubelet.python_for_image(image),
                               cwd=self.kubelet.cwd, work=self.kubelet.work, base_env=self.kubelet.base_env,
                               extra_env={**self.kubelet.extra_env, **(extra or {})},
                               secrets=secrets.get, services=self.kubelet.service_ports(self.ns), port=port,
                               container=container)
        except PodConfigError:
            return None

    async def wait_change_or(self, *aws: Awaitable[Any], timeout: float | None = None) -> bool:
        """Wait for any of `aws` or a new version of the child; True when the child changed."""
        self.changed.clear()
        change = asyncio.ensure_future(self.changed.wait())
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            await asyncio.wait([change, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [change, *tasks]:
                if not t.done():
                    t.cancel()
        return change.done()


class JobRunner(ChildRunner):
    def suspended(self) -> bool:
        return bool((self.body.get("spec") or {}).get("suspend"))

    def fail_job_rule(self, code: int) -> int | None:
        rules = (((self.body.get("spec") or {}).get("podFailurePolicy") or {}).get("rules")) or []
        for i, rule in enumerate(rules):
            on = rule.get("onExitCodes")
            if rule.get("action") == "FailJob" and on:
                hit = code in on.get("values", [])
                if hit if on.get("operator", "In") == "In" else not hit:
                    return i
        return None

    async def run(self) -> None:
        spec = self.body.get("spec") or {}
        if any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in self.status.get("conditions") or []):
            return  # finished before this kubelet saw it
        backoff = int(spec.get("backoffLimit", 6))
        failed, attempt = 0, 0
        while True:
            if self.suspended():
                self.kill()
                await self.patch_status(active=0, conditions=[condition("Suspended", "JobSuspended", "Job suspended")])
                while self.suspended():
                    await self.wait_change_or()
                await self.patch_status(conditions=[condition("Suspended", "JobResumed", "Job resumed", "False")])
                continue
            if not self.status.get("startTime"):
                await self.patch_status(startTime=now_iso(), defer=self.kubelet.instant is not None)
            pod = f"{self.name}-{attempt}"
            if self.kubelet.instant is not None:
                await self.patch_status(active=1, defer=True)
                outcome = await self.instant_unless_suspended(self.suspended)
                if outcome is None:
                    continue
                code = outcome.exit_code
            else:
                lp = await self.process_for(pod, spec["template"])
                if lp is None:
                    await self.patch_status(active=1)
                    await self.wait_change_or(asyncio.sleep(1.0))
                    continue
                proc = await self.start(lp)
                await pod_started(self, pod, spec["template"], 0, None)
                await self.patch_status(active=1)
                while proc.returncode is None and not self.suspended():
                    await self.wait_change_or(proc.wait())
                if proc.returncode is None:
                    continue  # suspended while running: killed at the top of the loop
                code = exit_code_of(proc.returncode)
                await pod_finished(self, pod, spec["template"], code)
                self.kill()
            attempt += 1
            if code == 0:
                now = now_iso()
                await self.patch_status(active=0, succeeded=1, completionTime=now, conditions=[
                    condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                    condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")])
                return
            failed += 1
            rule = self.fail_job_rule(code)
            if rule is not None:
                reason = "PodFailurePolicy"
                message = f"Container main for pod {self.ns}/{pod} failed with exit code {code} matching FailJob rule at index {rule}"
            elif failed > backoff:
                reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            else:
                await self.patch_status(failed=failed, active=0)
                continue
            await self.patch_status(active=0, failed=failed, conditions=[
                condition("FailureTarget", reason, message), condition("Failed", reason, message)])
            return


class DeploymentRunner(ChildRunner):
    async def run(self) -> None:
        spec = self.body.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        await self.patch_status(observedGeneration=self.body["metadata"].get("generation", 1), replicas=replicas,
                                conditions=[condition("Progressing", "NewReplicaSetCreated", f'Created new replica set "{self.name}"')])
        if self.kubelet.instant is not None:
            await self.instant_outcome()
            self.kubelet.ports[(self.ns, self.name)] = 0
            await self._available(replicas)
            await asyncio.Event().wait()
        container = spec["template"]["spec"]["containers"][0]
        probe = ((container.get("readinessProbe") or {}).get("httpGet") or {}).get("path", "/")
        port = free_port()
        pod_name, restarts, last = f"{self.name}-0", 0, None
        term_file = termination_file(self.kubelet.work, pod_name)
        try:
            while True:
                if self.scaled_to_zero():  # its ReplicaSet deletes the pod, and starts one when scaled up
                    self.kill()
                    self.kubelet.ports.pop((self.ns, self.name), None)
                    await pod_deleted(self, pod_name)
                    await self.patch_status(replicas=0, readyReplicas=0, availableReplicas=0, unavailableReplicas=None)
                    while self.scaled_to_zero():
                        await self.wait_change_or()
                    restarts, last = 0, None
                    continue
                if not await self._init_containers(spec["template"]):
                    await asyncio.sleep(1.0)  # Init:CrashLoopBackOff, briefly
                    continue
                lp = await self.process_for(pod_name, spec["template"], port=port,
                                            python=self.kubelet.server_python,
                                            extra={"XWIN_TERMINATION_LOG": str(term_file)})
                if lp is None:
                    await self.wait_change_or(asyncio.sleep(1.0))
                    continue
                term_file.write_text("")
                proc = await self.start(lp)
                await pod_started(self, pod_name, spec["template"], restarts, last)
                while proc.returncode is None:
                    if await self._ready(port, probe):
                        if (self.ns, self.name) not in self.kubelet.ports:
                            self.kubelet.ports[(self.ns, self.name)] = port
                            await self._available(replicas)
                    if await self.wait_change_or(proc.wait(), timeout=0.5) and self.scaled_to_zero():
                        break
                if self.scaled_to_zero():
                    continue
                self.kubelet.ports.pop((self.ns, self.name), None)
                self.kill()
                restarts += 1
                last = await pod_exited(self, pod_name, spec["template"], exit_code_of(proc.returncode),
                                        term_file, lp.log, restarts)
                await self.patch_status(readyReplicas=0, availableReplicas=0, unavailableReplicas=replicas, conditions=[
                    condition("Available", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.", "False")])
                await asyncio.sleep(1.0)  # CrashLoopBackOff, briefly
        finally:
            self.kubelet.ports.pop((self.ns, self.name), None)

    def scaled_to_zero(self) -> bool:
        return int((self.body.get("spec") or {}).get("replicas", 1)) == 0

    async def _init_containers(self, template: dict) -> bool:
        """Run the pod's initContainers one after the other; True when all exited 0."""
        for init in (template.get("spec") or {}).get("initContainers") or []:
            lp = await self.process_for(f"{self.name}-0", template, container=init)
            if lp is None:
                return False
            proc = await self.start(lp)
            if await proc.wait() != 0:
                self.kill()
                return False
        return True

    async def _available(self, replicas: int) -> None:
        await self.patch_status(readyReplicas=replicas, availableReplicas=replicas, updatedReplicas=replicas,
                                unavailableReplicas=None, conditions=[
                                    condition("Available", "MinimumReplicasAvailable", "Deployment has minimum availability."),
                                    condition("Progressing", "NewReplicaSetAvailable", f'ReplicaSet "{self.name}" has successfully progressed.')])

    @staticmethod
    async def _ready(port: int, path: str) -> bool:
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return r.status < 400
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False
