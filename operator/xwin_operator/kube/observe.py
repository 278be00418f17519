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
Objects without the `xwin.ai/stage` label are not children: None.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..core.children import LABEL_ATTEMPT, LABEL_STAGE, LABEL_STEP
from ..core.types import ChildState

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
    phase, reason, message, finished, suspended = "Pending", "", "", None, False

    if kind == "PyTorchJob":
        suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
        done = _true(conds, "Succeeded") or _true(conds, "Failed")
        if done is not None:
            phase = done["type"]
            reason, message = done.get("reason", ""), done.get("message", "")
            finished = status.get("completionTime") or done.get("lastTransitionTime")
        elif _true(conds, "Running") or _true(conds, "Restarting"):
            phase = "Running"
    elif kind == "TrainJob":
        suspended = bool(spec.get("suspend"))
        done = _true(conds, "Complete") or _true(conds, "Failed")
        if done is not None:
            phase = "Succeeded" if done["type"] == "Complete" else "Failed"
            reason, message = done.get("reason", ""), done.get("message", "")
            finished = done.get("lastTransitionTime")
        elif any(int(j.get("active") or 0) + int(j.get("ready") or 0) > 0 for j in status.get("jobsStatus") or []):
            phase = "Running"
    elif kind == "Job":
        suspended = bool(spec.get("suspend"))
        failed = _true(conds, "Failed")
        if int(status.get("succeeded") or 0) >= 1 or _true(conds, "Complete"):
            phase, finished = "Succeeded", status.get("completionTime")
        elif failed is not None:
            phase, reason, message = "Failed", failed.get("reason", ""), failed.get("message", "")
            finished = failed.get("lastTransitionTime")
        elif int(status.get("active") or 0) > 0:
            phase = "Running"
    elif kind == "Deployment":
        progressing = conds.get("Progressing") or {}
        if int(status.get("availableReplicas") or 0) >= 1:
            phase = "Running"
        elif progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
            phase, reason, message = "Failed", "ProgressDeadlineExceeded", progressing.get("message", "")
            finished = progressing.get("lastTransitionTime")
    elif kind == "Service":
        phase = "Running"
    else:
        return None

    return ChildState(kind=kind, name=meta.get("name", ""), stage=labels[LABEL_STAGE],
                      step=labels.get(LABEL_STEP, ""), attempt=attempt, phase=phase, reason=reason,
                      message=message, exit_code=_exit_code(message) if phase == "Failed" else None,
                      created=meta.get("creationTimestamp"), finished=finished, suspended=suspended)
