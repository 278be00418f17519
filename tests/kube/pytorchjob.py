"""The Kubeflow Training Operator as the test kubelet stands for it: a PyTorchJob's replicas
as local processes (or containers) with the env the Training Operator sets, its conditions
(Created, Running, Restarting, Suspended, Succeeded, Failed) with `restartPolicy: ExitCode`
and `runPolicy.backoffLimit`, and each replica's Pod object (pod_objects.py)."""

from __future__ import annotations

import asyncio

from .apiserver import now_iso
from .pod_objects import pod_finished, pod_started
from .pods import free_port, training_operator_env
from .runners import ChildRunner, condition, exit_code_of


class PyTorchJobRunner(ChildRunner):
    def suspended(self) -> bool:
        return bool(((self.body.get("spec") or {}).get("runPolicy") or {}).get("suspend"))

    def set_condition(self, cond: dict) -> list[dict]:
        conds = [c for c in self.status.get("conditions") or [] if c["type"] != cond["type"]]
        if cond["status"] == "True" and cond["type"] != "Created":  # one phase at a time, as the operator does
            conds = [{**c, "status": "False"} if c["type"] in ("Running", "Restarting", "Suspended") else c
                     for c in conds]
        return conds + [cond]

    async def run(self) -> None:
        job = f"{self.ns}/{self.name}"
        if any(c["type"] in ("Succeeded", "Failed") and c["status"] == "True" for c in self.status.get("conditions") or []):
            return  # finished before this kubelet saw it
        if not self.status.get("conditions"):
            await self.patch_status(conditions=self.set_condition(condition("Created", "PyTorchJobCreated", f"PyTorchJob {job} is created.")),
                                    startTime=now_iso(), defer=self.kubelet.instant is not None)
        specs = (self.body.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        backoff = int(((self.body.get("spec") or {}).get("runPolicy") or {}).get("backoffLimit", 0) or 0)
        nproc = int((self.body.get("spec") or {}).get("nprocPerNode") or 1)
        total = sum(int(s.get("replicas", 1)) for s in specs.values())
        restarts = 0
        while True:
            if self.suspended():
                self.kill()
                await self.patch_status(conditions=self.set_condition(condition("Suspended", "PyTorchJobSuspended", f"PyTorchJob {job} is suspended.")),
                                        replicaStatuses={t: {"active": 0} for t in specs})
                while self.suspended():
                    await self.wait_change_or()
                await self.patch_status(conditions=self.set_condition(condition("Suspended", "PyTorchJobResumed", f"PyTorchJob {job} is resumed.", "False")))
                continue
            if self.kubelet.instant is not None:
                await self.patch_status(conditions=self.set_condition(condition("Running", "PyTorchJobRunning", f"PyTorchJob {job} is running.")), defer=True)
                outcome = await self.instant_unless_suspended(self.suspended)
                if outcome is None:
                    continue
                codes = {"Master": outcome.exit_code}
            else:
                port, procs, pods = free_port(), [], []
                for rtype, rspec in sorted(specs.items(), key=lambda kv: kv[0] != "Master"):
                    for i in range(int(rspec.get("replicas", 1))):
                        env = training_operator_env(self.name, rtype.lower(), i, total, nproc, port)
                        lp = await self.process_for(f"{self.name}-{rtype.lower()}-{i}", rspec["template"], env)
                        if lp is None:
                            break
                        procs.append((rtype, await self.start(lp)))
                        pods.append(f"{self.name}-{rtype.lower()}-{i}")
                        await pod_started(self, pods[-1], rspec["template"], 0, None)
                if len(procs) < total:  # a pod cannot start yet (e.g. its Secret is missing)
                    self.kill()
                    await self.wait_change_or(asyncio.sleep(1.0))
                    continue
                await self.patch_status(conditions=self.set_condition(condition("Running", "PyTorchJobRunning", f"PyTorchJob {job} is running.")),
                                        replicaStatuses={t: {"active": int(s.get("replicas", 1))} for t, s in specs.items()})
                codes = await self._wait_replicas(procs)
                if codes is None:  # suspended (or changed) while running
                    continue
                for (rtype, _), name in zip(procs, pods):
                    await pod_finished(self, name, specs[rtype]["template"], codes.get(rtype, 0))
            failed = {t: c for t, c in codes.items() if c != 0}
            if not failed:
                await self.patch_status(conditions=self.set_condition(condition("Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {job} is successfully completed.")),
                                        replicaStatuses={t: {"succeeded": int(s.get("replicas", 1))} for t, s in specs.items()},
                                        completionTime=now_iso())
                return
            rtype, code = next(iter(failed.items()))
            retryable = specs.get(rtype, {}).get("restartPolicy") == "ExitCode" and code >= 128 \
                or specs.get(rtype, {}).get("restartPolicy") in ("OnFailure", "Always")
            if retryable and restarts < backoff:
                restarts += 1
                await self.patch_status(conditions=self.set_condition(condition("Restarting", "PyTorchJobRestarting", f"PyTorchJob {job} is restarting because 1 {rtype} replica(s) failed.")))
                continue
            reason, message = ("BackoffLimitExceeded", f"PyTorchJob {job} has failed because it has reached the specified backoff limit") \
                if retryable else ("PyTorchJobFailed", f"PyTorchJob {job} is failed because 1 {rtype} replica(s) failed.")
            await self.patch_status(conditions=self.set_condition(condition("Failed", reason, message)),
                                    replicaStatuses={rtype: {"failed": 1}}, completionTime=now_iso())
            return

    async def _wait_replicas(self, procs: list[tuple[str, asyncio.subprocess.Process]]) -> dict[str, int] | None:
        codes: dict[str, int] = {}
        pending = {p.pid: (t, p) for t, p in procs}
        while pending:
            changed = await self.wait_change_or(*(p.wait() for _, p in pending.values()))
            for pid, (t, p) in list(pending.items()):
                if p.returncode is not None:
                    del pending[pid]
                    code = exit_code_of(p.returncode)
                    if code != 0:
                        self.kill()
                        return {t: code}
                    codes.setdefault(t, 0)
            if changed and self.suspended():
                return None
        self.kill()
        return codes
