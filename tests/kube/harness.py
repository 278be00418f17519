"""Running the real operator process against the fake cluster, and instant children.

* `OperatorProcess`: `python -m xwin_operator -n NS` as a subprocess (its own process group),
  KUBECONFIG pointing at the fake API server, output in a log file; `kill()` is SIGKILL (a
  crash at an arbitrary moment), `stop()` a graceful SIGTERM.
* `complete_with_marker`: an `instant` outcome for the test kubelet that does what a stage's
  last step does on success: write the stage's `_SUCCESS.json` for exactly its task's inputs.
* Small readers: `created_names`, `run_status`, `events_of`, `wait_phase`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .cluster import Cluster
from .kubelet import Outcome

RUNS = "xwin.ai/v1alpha1/alignmentruns"
CHILDREN = ("kubeflow.org/v1/pytorchjobs", "trainer.kubeflow.org/v1alpha1/trainjobs", "batch/v1/jobs",
            "apps/v1/deployments", "v1/services")
LAST_STEPS = ("train", "judge", "score")


class OperatorProcess:
    def __init__(self, cluster: Cluster, work: Path, *, namespace: str, interval: float = 0.5,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 argv: list[str] | None = None, user: dict | None = None):
        """`argv` replaces the whole command (e.g. another kopf operator to compare with);
        `user`: the kubeconfig's user (default: none, for a cluster without authentication)."""
        self.cluster, self.work, self.namespace, self.user = cluster, Path(work), namespace, user
        self.interval, self.extra_env, self.args = interval, dict(env or {}), args
        self.argv = argv or [sys.executable, "-m", "xwin_operator", "-n", namespace, *args]
        self.proc: subprocess.Popen | None = None
        self.log = self.work / "operator.log"
        self.starts = 0

    def start(self) -> "OperatorProcess":
        self.work.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.cluster.kubeconfig(self.work / "kubeconfig.json", user=self.user)
        # no /metrics unless a test asks (XWIN_METRICS_PORT in env): no fixed port shared by parallel runs
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "XWIN_RECONCILE_INTERVAL": str(self.interval),
               "PYTHONUNBUFFERED": "1", "XWIN_METRICS_PORT": "0", **self.extra_env}
        self.starts += 1
        with open(self.log, "a") as log:
            log.write(f"\n=== start #{self.starts}\n")
            log.flush()
            self.proc = subprocess.Popen(self.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last patch (what a node failure or OOM kill does)."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def peak_rss_mb(self) -> float:
        """The process's peak resident set (VmHWM), in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def container_env(child: dict) -> dict[str, str]:
    spec = child.get("spec") or {}
    if "trainer" in spec:  # a TrainJob
        return {e["name"]: e["value"] for e in spec["trainer"].get("env") or [] if "value" in e}
    template = ((spec.get("pytorchReplicaSpecs") or {}).get("Master") or {}).get("template") or spec.get("template") or {}
    containers = (template.get("spec") or {}).get("containers") or [{}]
    return {e["name"]: e["value"] for e in containers[0].get("env") or [] if "value" in e}


def write_marker_for(child: dict, metrics: dict | None = None) -> None:
    """The `_SUCCESS.json` the child's stage job would write (only for a stage's last step)."""
    from xwin_jobs.store import Store, write_marker
    from xwin_jobs.task import StageTask, upstream_digests

    env = container_env(child)
    if "XWIN_TASK" not in env or env.get("XWIN_STEP", "train") not in LAST_STEPS:
        return
    task = StageTask.load(env["XWIN_TASK"])
    store = Store(endpoint_url=env.get("AWS_ENDPOINT_URL"))
    upstream = upstream_digests(store, task)
    write_marker(store, task.output, {"stage": task.stage, "digest": task.digest(upstream), "inputDigests": upstream,
                                      "counts": {}, "metrics": metrics or {"instant": 1}})


def complete_with_marker(fail: Callable[[dict], bool] = lambda child: False):
    """An instant outcome: success plus the stage marker, or a failure (exit code 1) when
    `fail(child)` says so."""
    async def outcome(child: dict) -> Outcome:
        if fail(child):
            return Outcome("Failed", 1, "instant failure")
        await asyncio.to_thread(write_marker_for, child)
        return Outcome()
    return outcome


# --- reading the cluster ---------------------------------------------------------------------------


def created_names(cluster: Cluster, namespace: str) -> list[tuple[str, str]]:
    """(resource, name) of every child ever created in the namespace, once per creation, from the
    API server's history (a duplicate create would show as a second creation)."""
    def read() -> list[tuple[str, str]]:
        assert cluster.api is not None
        out = []
        for (res, ns, name), obj in list(cluster.api.objects.items()):
            if ns != namespace or f"{res.group}/{res.version}/{res.plural}".lstrip("/") not in CHILDREN:
                continue
            versions = list(obj.history)
            # a creation starts a history or follows a deletion marker (None)
            out += [(res.plural, name) for i, v in enumerate(versions) if v is not None and (i == 0 or versions[i - 1] is None)]
        return sorted(out)

    async def run() -> list:
        return read()
    return cluster.call(run)


def versions_of(cluster: Cluster, resource: str, namespace: str, name: str) -> list[dict | None]:
    """Every version the API server stored of one object, oldest first (None: a deletion)."""
    async def run() -> list:
        assert cluster.api is not None
        return [v for (res, ns, n), obj in list(cluster.api.objects.items())
                if ns == namespace and n == name and f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource
                for v in obj.history]
    return cluster.call(run)


def run_status(cluster: Cluster, namespace: str, name: str) -> dict:
    return (cluster.get(RUNS, namespace, name) or {}).get("status") or {}


def events_of(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return [e for e in cluster.list("v1/events", namespace)
            if (e.get("involvedObject") or {}).get("name") == name]


def wait_phase(cluster: Cluster, namespace: str, name: str, phases: tuple[str, ...] = ("Succeeded",),
               timeout: float = 60, operator: OperatorProcess | None = None) -> dict:
    def check() -> dict | None:
        if operator is not None and not operator.alive:
            raise RuntimeError(f"the operator exited:\n{operator.output()[-3000:]}")
        status = run_status(cluster, namespace, name)
        return status if status.get("phase") in phases else None
    try:
        return cluster.wait_for(check, timeout=timeout, what=f"{name} to reach {phases}")
    except TimeoutError:
        raise TimeoutError(f"{name} did not reach {phases}; status: {json.dumps(run_status(cluster, namespace, name))}"
                           + (f"\noperator log:\n{operator.output()[-4000:]}" if operator else "")) from None
