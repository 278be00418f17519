"""Waiting states the planner cannot see: the operator could not observe or act for a run
(the store unreachable or refusing, the API refusing a child or a lookup, a launcher's CRD not
installed). Pure.

`Blocked(reason, message)` is raised by the handlers' observe/act with a message naming the
field or endpoint; `blocked_status` is the run's status while it lasts: the previous status
(never an empty phase: Pending when there was none) with the condition

    {type: Progressing, status: "False", reason: <reason>, message: <message>}

and `message` set to it. The next reconcile that gets through writes the planner's status,
which has no Progressing condition: the block is gone. The handlers post one Warning Event
per distinct reason while it lasts.
"""

from __future__ import annotations

from typing import Any

from ..core.types import Phase

CONDITION = "Progressing"
_LAUNCHER_CRDS = {"PyTorchJob": ("pytorchjobs.kubeflow.org", "the Kubeflow Training Operator (v1)"),
                  "TrainJob": ("trainjobs.trainer.kubeflow.org", "Kubeflow Trainer (v2)")}


class Blocked(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def store_problem(storage_uri: str, endpoint: str | None, error: Exception, key_source: str = "") -> Blocked:
    """The store could not be read (markers, inputs): unreachable, refusing the credentials...
    (`key_source`: whose key was used, in words; never the key)."""
    where = f"spec.storage.endpoint {endpoint}" if endpoint else "the operator's default S3 endpoint"
    text = str(error)
    reason = "StoreUnreachable" if "cannot reach" in text else "StoreError"
    using = f", with {key_source}" if key_source else ""
    return Blocked(reason, f"cannot read the store (spec.storage.uri {storage_uri}, {where}{using}): {text}")


def api_refusal(what: str, status: int, text: str) -> Blocked:
    """An API call other than a create failed (a Secret lookup, a delete, a suspend)."""
    reason = "ApiUnavailable" if status == 0 or status >= 500 else "ApiRefused"
    return Blocked(reason, f"{what}: {text}")


def child_refusal(kind: str, name: str, status: int, text: str, launcher_field: str) -> Blocked:
    """The API did not create a child: its kind not served (CRD missing), or refused."""
    if status == 404 and kind in _LAUNCHER_CRDS:
        crd, project = _LAUNCHER_CRDS[kind]
        return Blocked("LauncherNotInstalled",
                       f"cannot create {kind}/{name}: the {crd} CRD is not installed on this cluster "
                       f"(install {project}, or choose another {launcher_field})")
    if status == 0 or status >= 500:
        return Blocked("ApiUnavailable", f"cannot create {kind}/{name}: {text}")
    return Blocked("ChildRejected", f"the API server refused {kind}/{name}: {text}")


def blocked_status(previous: dict[str, Any] | None, blocked: Blocked, now: str) -> dict[str, Any]:
    """The run's status while `blocked` lasts (see the module docstring)."""
    status = dict(previous or {})
    if not status.get("phase"):
        status["phase"] = Phase.PENDING.value
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]
    old = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION), {})
    same = old.get("reason") == blocked.reason and old.get("status") == "False"
    conditions.append({"type": CONDITION, "status": "False", "reason": blocked.reason,
                       "message": blocked.message,
                       "lastTransitionTime": old.get("lastTransitionTime", now) if same else now})
    status["conditions"] = conditions
    status["message"] = blocked.message
    return status
