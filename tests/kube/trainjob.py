"""The Kubeflow Trainer v2 controller as the test kubelet stands for it: `TrainJobRunner` runs
a TrainJob's `trainer.numNodes` pods as local processes, each the trainer's command and env
in the pod the operator's runtime patch describes (volumes, mounts, security), with the torch
runtime's PET_* rendezvous variables; it writes back what Trainer writes: `jobsStatus` of the
`node` job (active, ready, succeeded, failed, suspended) and the conditions Suspended,
Complete and Failed. `spec.suspend` kills the pods and resumes them later. No restarts inside
an attempt (the runtime's JobSet failure policy is left at its default).
"""

from __future__ import annotations

import asyncio

from .pods import free_port, training_operator_env
from .runners import ChildRunner, condition


def pod_template(body: dict) -> dict:
    """The trainer's container in the pod of the `node` job's runtime patch."""
    spec = body.get("spec") or {}
    trainer = spec.get("trainer") or {}
    pod: dict = {}
    for patch in spec.get("runtimePatches") or []:
        for job in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get("replicatedJobs") or []:
            if job.get("name") == "node":
                pod = ((job.get("template") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    patched = next((c for c in pod.get("containers") or [] if c.get("name") == "node"), {})
    container = {**patched, "name": "node", "image": trainer.get("image", ""),
                 "command": trainer.get("command") or [], "args": trainer.get("args") or [],
                 "env": list(trainer.get("env") or []) + list(patched.get("env") or [])}
    return {"spec": {**pod, "containers": [container]}}


class TrainJobRunner(ChildRunner):
    def suspended(self) -> bool:
        return bool((self.body.get("spec") or {}).get("suspend"))

    def set_condition(self, cond: dict) -> list[dict]:
        return [c for c in self.status.get("conditions") or [] if c["type"] != cond["type"]] + [cond]

    def jobs(self, **counts: int) -> list[dict]:
        return [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0, **counts}]

    async def run(self) -> None:
        if any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in self.status.get("conditions") or []):
            return  # finished before this kubelet saw it
        trainer = (self.body.get("spec") or {}).get("trainer") or {}
        nodes, nproc = int(trainer.get("numNodes") or 1), int(trainer.get("numProcPerNode") or 1)
        while True:
            if self.suspended():
                self.kill()
                await self.patch_status(conditions=self.set_condition(condition("Suspended", "Suspended", "TrainJob is suspended")),
                                        jobsStatus=self.jobs(suspended=1))
                while self.suspended():
                    await self.wait_change_or()
                await self.patch_status(conditions=self.set_condition(condition("Suspended", "Resumed", "TrainJob is resumed", "False")))
                continue
            if self.kubelet.instant is not None:
                await self.patch_status(jobsStatus=self.jobs(active=1), defer=True)
                outcome = await self.instant_unless_suspended(self.suspended)
                if outcome is None:
                    continue
                code = outcome.exit_code
            else:
                port, procs, template = free_port(), [], pod_template(self.body)
                for i in range(nodes):
                    env = training_operator_env(self.name, "worker" if i else "master", max(0, i - 1) if i else 0,
                                                nodes, nproc, port)
                    lp = await self.process_for(f"{self.name}-node-0-{i}", template, env)
                    if lp is None:
                        break
                    procs.append(await self.start(lp))
                if len(procs) < nodes:  # a pod cannot start yet (e.g. its Secret is missing)
                    self.kill()
                    await self.wait_change_or(asyncio.sleep(1.0))
                    continue
                await self.patch_status(jobsStatus=self.jobs(active=1, ready=1))
                code = 0
                pending = list(procs)
                while pending and code == 0:
                    changed = await self.wait_change_or(*(p.wait() for p in pending))
                    for p in [p for p in pending if p.returncode is not None]:
                        pending.remove(p)
                        code = code or (128 - p.returncode if p.returncode < 0 else p.returncode)
                    if changed and self.suspended():
                        break
                self.kill()
                if pending and code == 0:
                    continue  # suspended while running
            if code == 0:
                await self.patch_status(conditions=self.set_condition(condition("Complete", "JobsCompleted", "TrainJob is completed")),
                                        jobsStatus=self.jobs(succeeded=1))
            else:
                await self.patch_status(conditions=self.set_condition(condition(
                    "Failed", "JobsFailed", f"TrainJob failed: node pod failed with exit code {code}")),
                                        jobsStatus=self.jobs(failed=1))
            return
