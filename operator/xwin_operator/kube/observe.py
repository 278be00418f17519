"""A child object as the planner sees it: `child_state(body) -> ChildState`. Pure.

How each Kubernetes kind maps to the planner's phases (core/planner.py), from what each real
controller writes:
  * PyTorchJob (Training Operator): a True `Succeeded` / `Failed` condition -> Succeeded /
    Failed (reason and message from the condition); a True `Running` (or `Restarting`)
    condition -> Running; else Pending. `suspended` = spec.runPolicy.suspend.
  * Job: status.succeeded >= 1 (or a True `Complete` condition) -> Succeeded; a True `Failed`
    condition -> Failed; status.active -> Running; else Pending. `suspended` = spec.suspend.
    The exit code is read from a podFailurePolicy message ("... failed with exit code 1 ...").
  * TrainJob (Kubeflow Trainer v2): a True `Complete` / `Failed` condition -> Succeeded /
    Failed (reason, message, exit code as for a Job); a child Job of status.jobsStatus with
    active or ready pods -> Running; else Pending. `suspended` = spec.suspend.
  * Deployment: availableReplicas >= 1 -> Running (ready to serve); a `Progressing=False`
    condition with reason ProgressDeadlineExceeded -> Failed; else Pending.
  * Service: Running once it exists.
Objects without the `xwin.ai/stage` label are not children: None. A child the operator
stopped because it never started (annotation `xwin.ai/failed`) is Failed with that reason.
`suspended_by_us`: suspended and annotated `xwin.ai/suspended-by` (the operator's own
suspension, which it may undo; any other is Kueue's); `resumed`: the last transition of
its `Suspended` condition to False.

A vLLM server never ends on its own, so a Deployment that is not available is also looked at
through its pods (`server_failed`): a server container that terminated (now, or before a
restart) fails the Deployment, with the reason and message its pod's termination message gives
(`xwin_jobs.serve` writes them; server_exit.diagnose words them) and `permanent` for a model
the backend cannot serve, so the planner retries a crash and not an unsupported model.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from dataclasses import replace

from xwin_jobs.server_exit import backend_name, diagnose, model_arg, parse_line

from ..core.children import ANNOTATION_FAILED, ANNOTATION_SUSPENDED, LABEL_ATTEMPT, LABEL_STAGE, LABEL_STEP, MANAGED_BY
from ..core.types import ACTIVE, ChildState, Phase

_EXIT_CODE = re.compile(r"exit code (\d+)")


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}


def _true(conds: Mapping[str, Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    c = conds.get(type_)
    return c if c is not None and c.get("status") == "True" else None


def _exit_code(message: str) -> int | None:
    m = _EXIT_CODE.search(message or "")
    return int(m.group(1)) if m else None


def child_state(body: Mapping[str, Any]) -> ChildState | None:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    if LABEL_STAGE not in labels:
        return None
    kind = body.get("kind", "")
    spec, status = body.get("spec") or {}, body.get("status") or {}
    conds = _conditions(status)
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, "1"))
    except ValueError:
        attempt = 1
    phase, reason, message, finished, suspended = Phase.PENDING, "", "", None, False

    if kind == "PyTorchJob":
        suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
        done = _true(conds, "Succeeded") or _true(conds, "Failed")
        if done is not None:
            phase = Phase(done["type"])  # the condition Succeeded or Failed
            reason, message = done.get("reason", ""), done.get("message", "")
            finished = status.get("completionTime") or done.get("lastTransitionTime")
        elif _true(conds, "Running") or _true(conds, "Restarting"):
            phase = Phase.RUNNING
    elif kind == "TrainJob":
        suspended = bool(spec.get("suspend"))
        done = _true(conds, "Complete") or _true(conds, "Failed")
        if done is not None:
            phase = Phase.SUCCEEDED if done["type"] == "Complete" else Phase.FAILED
            reason, message = done.get("reason", ""), done.get("message", "")
            finished = done.get("lastTransitionTime")
        elif any(int(j.get("active") or 0) + int(j.get("ready") or 0) > 0 for j in status.get("jobsStatus") or []):
            phase = Phase.RUNNING
    elif kind == "Job":
        suspended = bool(spec.get("suspend"))
        failed = _true(conds, "Failed")
        if int(status.get("succeeded") or 0) >= 1 or _true(conds, "Complete"):
            phase, finished = Phase.SUCCEEDED, status.get("completionTime")
        elif failed is not None:
            phase, reason, message = Phase.FAILED, failed.get("reason", ""), failed.get("message", "")
            finished = failed.get("lastTransitionTime")
        elif int(status.get("active") or 0) > 0:
            phase = Phase.RUNNING
    elif kind == "Deployment":
        progressing = conds.get("Progressing") or {}
        if int(status.get("availableReplicas") or 0) >= 1:
            phase = Phase.RUNNING
        elif progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
            phase, reason, message = Phase.FAILED, "ProgressDeadlineExceeded", progressing.get("message", "")
            finished = progressing.get("lastTransitionTime")
    elif kind == "Service":
        phase = Phase.RUNNING
    else:
        return None

    annotations = meta.get("annotations") or {}
    stopped = _stopped(annotations.get(ANNOTATION_FAILED))
    if stopped is not None and phase in ACTIVE:
        phase, reason, message, finished = Phase.FAILED, stopped.get("reason", ""), stopped.get("message", ""), stopped.get("at")
    resumed = conds.get("Suspended") or {}
    return ChildState(kind=kind, name=meta.get("name", ""), stage=labels[LABEL_STAGE],
                      step=labels.get(LABEL_STEP, ""), attempt=attempt, phase=phase, reason=reason,
                      message=message, exit_code=_exit_code(message) if phase == Phase.FAILED else None,
                      created=meta.get("creationTimestamp"), finished=finished, suspended=suspended,
                      suspended_by_us=suspended and annotations.get(ANNOTATION_SUSPENDED) == MANAGED_BY,
                      stopped=stopped is not None,
                      resumed=resumed.get("lastTransitionTime") if resumed.get("status") == "False" else None,
                      uid=meta.get("uid"))


def _stopped(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = {"message": raw}
    return value if isinstance(value, dict) else {"message": str(value)}


def _terminated(pod: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """(container, its last termination) of a pod's first container, if it ever ended."""
    spec_containers = (pod.get("spec") or {}).get("containers") or [{}]
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state, last = status.get("state") or {}, status.get("lastState") or {}
        ended = state.get("terminated") or last.get("terminated")
        if ended:
            container = next((c for c in spec_containers if c.get("name") == status.get("name")),
                             spec_containers[0])
            return container, ended
    return None


def server_failed(child: ChildState, pods: list[Mapping[str, Any]]) -> ChildState:
    """A server Deployment's state given its pods: Failed when a server container terminated
    (named by the pod's termination message), else as it was. Pure."""
    for pod in pods:
        found = _terminated(pod)
        if found is None:
            continue
        container, ended = found
        code = ended.get("exitCode")
        message = str(ended.get("message") or "")
        exit = parse_line(message) or diagnose(
            message.splitlines(), int(code) if code is not None else None,
            model=model_arg([*(container.get("command") or []), *(container.get("args") or [])]),
            backend=backend_name("gpu"), oom_killed=ended.get("reason") == "OOMKilled")
        pod_name = (pod.get("metadata") or {}).get("name", "")
        return replace(child, phase=Phase.FAILED, reason=exit.reason, permanent=exit.permanent,
                       message=f"{exit.message} (pod {pod_name})", exit_code=code,
                       finished=ended.get("finishedAt") or child.finished)
    return child
