"""What a child's pods and its Kueue Workload say about it, as the planner reads it. Pure.

    child = with_pods(child, pods, workload)   # a ChildState with held / cause / waiting_since / live_pods

* `cause` (first found, pods by name; init containers first): the reason a pod cannot run, in
  Kubernetes' own words, with a message naming what to fix:
    Unschedulable               the scheduler's message ("0/12 nodes are available: 12 Insufficient nvidia.com/gpu.")
    ImagePullBackOff / ErrImagePull / InvalidImageName   the image and the kubelet's message
    CreateContainerConfigError  the kubelet's message (the Secret and the key it lacks)
    CrashLoopBackOff            the container, its restarts, last exit code and reason
    OOMKilled                   the container and its memory limit
* `waiting_since`: while a pod has not started (phase Pending and no init container started
  either: a long model download in an init container counts as started), or no pod exists
  yet, the time it became free to run: the latest of the child's creation, its admission by
  Kueue, its resumption, and the oldest unstarted pod's creation (a pod replaced later starts
  its own clock). None once every pod runs, or while Kueue holds it.
* `held`: a child suspended by someone other than the operator (Kueue, waiting for quota),
  with the Workload's state: QuotaReserved / Admitted / Evicted and Kueue's message.
* `live_pods`: its pods not finished (Pending or Running, not being deleted).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Mapping

from ..core.types import ACTIVE, POD_CAUSES, ChildState

UNSCHEDULABLE, CONFIG_ERROR, CRASH_LOOP, OOM_KILLED = (
    "Unschedulable", "CreateContainerConfigError", "CrashLoopBackOff", "OOMKilled")
PULL_REASONS = tuple(c for c in POD_CAUSES if "Image" in c)
assert {UNSCHEDULABLE, CONFIG_ERROR, CRASH_LOOP, OOM_KILLED} <= set(POD_CAUSES)


def pod_seen(pod: Mapping[str, Any]) -> tuple:
    """What the planner can see of one pod (its cause, started, alive): a pod event that
    leaves this unchanged needs no new pass."""
    return pod_cause(pod), _started(pod), _live(pod), (pod.get("status") or {}).get("phase")


def pod_summary(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a pod (kopf's pods index): what `with_pods` and
    observe.server_failed read, nothing else (no env, no volumes)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}

    def containers(key: str) -> list[dict[str, Any]]:
        return [{k: c[k] for k in ("name", "command", "args", "resources") if k in c} for c in spec.get(key) or []]
    return {"metadata": {k: meta[k] for k in ("name", "labels", "creationTimestamp", "deletionTimestamp") if k in meta},
            "spec": {"containers": containers("containers"), "initContainers": containers("initContainers")},
            "status": {k: status[k] for k in ("phase", "conditions", "containerStatuses", "initContainerStatuses")
                       if k in status}}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if isinstance(c, Mapping) and c.get("type") == type_), None)


def _started(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "", "Pending"):
        return True
    return any((s.get("state") or {}).get("running") or (s.get("state") or {}).get("terminated")
               for s in status.get("initContainerStatuses") or [])


def _live(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in (None, "", "Pending", "Running") and \
        not _meta(pod).get("deletionTimestamp")


def _limit(pod: Mapping[str, Any], container: str) -> str:
    spec = pod.get("spec") or {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if c.get("name") == container:
            return str(((c.get("resources") or {}).get("limits") or {}).get("memory") or "")
    return ""


def _container_cause(pod: Mapping[str, Any], s: Mapping[str, Any]) -> tuple[str, str] | None:
    name, where = s.get("name", ""), f"pod {_meta(pod).get('name', '')}"
    waiting = (s.get("state") or {}).get("waiting") or {}
    last = (s.get("lastState") or {}).get("terminated") or (s.get("state") or {}).get("terminated") or {}
    reason = waiting.get("reason", "")
    if reason in PULL_REASONS:
        return reason, f"{where}: container {name} cannot pull image {s.get('image', '')}: {waiting.get('message', reason)}"
    if reason == CONFIG_ERROR:
        return reason, f"{where}: container {name}: {waiting.get('message', reason)}"
    if last.get("reason") == OOM_KILLED:
        limit = _limit(pod, name)
        return OOM_KILLED, (f"{where}: container {name} was killed for using more memory than "
                            f"{'its limit ' + limit if limit else 'the node has'} (OOMKilled, exit code "
                            f"{last.get('exitCode', 137)}); raise resources.memory")
    if reason == CRASH_LOOP:
        return reason, (f"{where}: container {name} keeps crashing ({s.get('restartCount', 0)} restarts; "
                        f"last exit code {last.get('exitCode', '?')}, {last.get('reason') or 'Error'}"
                        + (f": {str(last['message']).strip()[-300:]}" if last.get("message") else "") + ")")
    return None


def pod_cause(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of what keeps one pod from running, or None."""
    status = pod.get("status") or {}
    for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        found = _container_cause(pod, s)
        if found:
            return found
    scheduled = _condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == UNSCHEDULABLE:
        return UNSCHEDULABLE, f"pod {_meta(pod).get('name', '')}: unschedulable: {scheduled.get('message', '')}".rstrip(": ")
    return None


def _latest(*times: str | None) -> str | None:
    known = [t for t in times if t]
    return max(known) if known else None   # ISO UTC "Z" times sort as strings


def workload_state(workload: Mapping[str, Any] | None, queue: str) -> str:
    """The state of a child Kueue holds, in words (its Workload's conditions)."""
    where = f"Kueue queue '{queue}'" if queue else "Kueue"
    if workload is None:
        return f"suspended until {where} admits it (no Workload seen yet)"
    name = _meta(workload).get("name", "")
    evicted, reserved, admitted = (_condition(workload, t) for t in ("Evicted", "QuotaReserved", "Admitted"))
    if evicted and evicted.get("status") == "True":
        return (f"evicted by {where} ({evicted.get('reason', '')}: {evicted.get('message', '')}); "
                f"waits to be admitted again (Workload {name})")
    if reserved and reserved.get("status") == "True" and not (admitted and admitted.get("status") == "True"):
        message = (admitted or {}).get("message") or "waiting for admission checks"
        return f"quota reserved in {where}, not admitted yet: {message} (Workload {name})"
    message = (reserved or {}).get("message") or "waiting for quota"
    return f"waiting for quota in {where}: {message} (Workload {name})"


def with_pods(child: ChildState, pods: Iterable[Mapping[str, Any]], workload: Mapping[str, Any] | None = None,
              *, queue: str = "") -> ChildState:
    """The child as its pods and Workload show it (see the module docstring). `pods` are this
    child's (by its labels); `queue`: its Kueue LocalQueue."""
    pods = sorted(pods, key=lambda p: _meta(p).get("name", ""))
    live = sum(1 for p in pods if _live(p))
    cause = next((c for c in map(pod_cause, pods) if c), None) if child.phase in ACTIVE else None
    held, since = "", None
    if child.suspended and not child.suspended_by_us and child.phase in ACTIVE:
        held = workload_state(workload, queue)
    elif child.phase in ACTIVE and not child.suspended:
        unstarted = [_meta(p).get("creationTimestamp") for p in pods if _live(p) and not _started(p)]
        if unstarted or not pods:
            admitted = _condition(workload, "Admitted") if workload else None
            admitted_at = admitted.get("lastTransitionTime") if admitted and admitted.get("status") == "True" else None
            since = _latest(child.created, admitted_at, child.resumed, min((t for t in unstarted if t), default=None))
    return replace(child, held=held, cause=cause[0] if cause else "", cause_message=cause[1] if cause else "",
                   waiting_since=since, live_pods=live)
