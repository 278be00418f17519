"""The Pod objects of the pods the test kubelet runs, as a real kubelet writes them (the
operator reads them: why a vLLM server ended, whether a job's pods started, what keeps them).

One Pod per process: a Deployment replica (`<deployment>-0`), a Job's pod, a PyTorchJob
replica (`<job>-<type>-<i>`), owned by its child (deleted with it), labelled with the pod
template's labels. A job's pod ends Succeeded or Failed (`pod_finished`); a server's
container status
follows the process: `running` while it runs; when it exits, `lastState.terminated` (exit
code, reason Completed / Error, finishedAt, and the termination message as the kubelet takes
it: the container's termination log file, else with `terminationMessagePolicy:
FallbackToLogsOnError` and a non-zero exit the last lines of its log), `restartCount` + 1 and
`state.waiting` CrashLoopBackOff until the next start.

The termination log is `<work>/pods/<pod>/termination-log`, given to the container as
XWIN_TERMINATION_LOG (a real kubelet mounts it at `terminationMessagePath`).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from .apiserver import now_iso
from .cluster import ApiError
from .paths import resource_path

if TYPE_CHECKING:
    from .runners import ChildRunner

PODS = "v1/pods"
FALLBACK_LINES, MAX_MESSAGE = 80, 4096


def termination_file(work: Path, pod_name: str) -> Path:
    path = work / "pods" / pod_name / "termination-log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")  # the kubelet's mount: empty until the container writes it
    return path


def termination_message(container: dict, exit_code: int, term_file: Path, log: Path) -> str:
    try:
        text = term_file.read_text()
    except OSError:
        text = ""
    if not text and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        try:
            with open(log, errors="replace") as f:
                text = "".join(deque(f, maxlen=FALLBACK_LINES))
        except OSError:
            text = ""
    return text[-MAX_MESSAGE:]


def _status(container: dict, *, state: dict, restarts: int, last: dict | None, ready: bool) -> dict:
    status = {"name": container.get("name", "main"), "image": container.get("image", ""),
              "ready": ready, "started": "running" in state, "restartCount": restarts, "state": state}
    if last:
        status["lastState"] = last
    return {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}],
            "containerStatuses": [status]}


async def _patch(runner: "ChildRunner", pod_name: str, status: dict) -> None:
    try:
        await runner.kubelet.cluster._request("patch", resource_path(PODS, runner.ns, pod_name, "status"),
                                              {"status": status})
    except ApiError as e:
        if e.status != 404:
            raise


async def pod_started(runner: "ChildRunner", pod_name: str, template: dict, restarts: int,
                      last: dict | None) -> None:
    """The Pod exists (created at the first start) and its container runs."""
    container = template["spec"]["containers"][0]
    if restarts == 0:
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": runner.ns,
                             "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                             "ownerReferences": [{"apiVersion": runner.body.get("apiVersion", ""),
                                                  "kind": runner.body.get("kind", ""),
                                                  "name": runner.name, "uid": runner.uid,
                                                  "controller": True}]},
                "spec": template.get("spec") or {}}
        try:
            await runner.kubelet.cluster._request("post", resource_path(PODS, runner.ns), body)
        except ApiError as e:
            if e.status != 409:
                raise
    state = {"running": {"startedAt": now_iso()}}
    await _patch(runner, pod_name, _status(container, state=state, restarts=restarts, last=last, ready=False))


async def pod_exited(runner: "ChildRunner", pod_name: str, template: dict, exit_code: int,
                     term_file: Path, log: Path, restarts: int) -> dict:
    """The container exited: its `lastState` (returned, for the next start) and a back-off."""
    container = template["spec"]["containers"][0]
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "finishedAt": now_iso(),
                  "message": termination_message(container, exit_code, term_file, log)}
    last = {"terminated": terminated}
    state = {"waiting": {"reason": "CrashLoopBackOff",
                         "message": f"back-off restarting failed container {container.get('name', '')}"}}
    await _patch(runner, pod_name, _status(container, state=state, restarts=restarts, last=last, ready=False))
    return last


async def pod_deleted(runner: "ChildRunner", pod_name: str) -> None:
    """The pod is gone (its controller deleted it: a Deployment scaled to 0)."""
    try:
        await runner.kubelet.cluster._request("delete", resource_path(PODS, runner.ns, pod_name))
    except ApiError as e:
        if e.status != 404:
            raise


async def pod_finished(runner: "ChildRunner", pod_name: str, template: dict, exit_code: int) -> None:
    """A job's pod ended (restartPolicy Never / ExitCode): Succeeded or Failed, its container terminated."""
    container = template["spec"]["containers"][0]
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "finishedAt": now_iso()}
    status = _status(container, state={"terminated": terminated}, restarts=0, last=None, ready=False)
    status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
    await _patch(runner, pod_name, status)
