"""`.status` of an AlignmentRun, a pure function of the planner's stage plans, and the Events
of its transitions. Its phases are plain strings (Phase.value): it is written as it is. Pure.

Conditions (lastTransitionTime kept from the previous status while `status` is unchanged):
  * Succeeded: True (AllStagesSucceeded) | False, reason StageRunning, Pending, Backoff,
    Suspended, SecretNotFound, StageFailed, InputNotFound, NoMarker or UnsupportedModel (a
    model the serving backend cannot run: failed on its first attempt, not retried);
  * Suspended: True when spec.suspend holds the run;
  * SecretsReady: False (SecretNotFound) naming the field and the Secret (never its value);
  * Progressing: False while the stage in progress waits on something outside the run:
    Kueue's quota (WaitingForQuota, the Workload's state) or what keeps its pods from running
    (Unschedulable, ImagePullBackOff, CreateContainerConfigError, CrashLoopBackOff, OOMKilled;
    the pod and Kubernetes' message); absent otherwise (kube/blocked.py sets it while the
    operator cannot observe or act). Each such cause is one Warning Event;
  * SpecChangeNeedsNewRun: present (True) while a finished stage's settings differ from the
    spec: such a stage is never rerun silently; create a new run, or delete the stage's
    `_SUCCESS.json` to rerun it in this one.
"""

from __future__ import annotations

import time
from typing import Any

from xwin_jobs.progress import epoch
from xwin_jobs.server_exit import UNSUPPORTED_MODEL
from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun
from ..api.graph import stage_references, stages_of
from .progress import run_cost, run_progress, stage_cost, stage_progress
from .types import DONE, FINISHED, WAITING_REASONS, EmitEvent, Observed, PatchStatus, Phase, StagePlan, attempt_failed

_FAILED_REASONS = ("StageFailed", "InputNotFound", "NoMarker", UNSUPPORTED_MODEL)


def _stage_status(v: StagePlan, prev: dict[str, Any], suspended: bool, live: dict[str, Any] | None,
                  cost: dict[str, Any]) -> dict[str, Any]:
    phase = str(Phase.SUSPENDED if suspended and v.phase == Phase.RUNNING else v.phase)
    created = [c.created for c in v.children if c.created]
    finished = [c.finished for c in v.children if c.finished]
    out: dict[str, Any] = {"name": v.name, "phase": phase,
                           "attempts": max(v.attempts, int(prev.get("attempts") or 0))}
    start = prev.get("startTime") or (min(created) if created else None)
    if start:
        out["startTime"] = start
    if v.phase in FINISHED:
        end = (v.marker or {}).get("finishedAt") or prev.get("completionTime") or (
            max(finished) if finished else None)
        if end:
            out["completionTime"] = end
    if v.artifact:
        out["artifact"] = v.artifact
    out["children"] = [f"{c.kind}/{c.name}" for c in v.children]
    metrics = (v.marker or {}).get("metrics") or {}
    if metrics:
        out["metrics"] = dict(metrics)
    if v.phase == Phase.FAILED and v.reason or v.reason in WAITING_REASONS:
        out["reason"] = v.reason
    message = v.message
    if v.changed:
        message = (f"spec.stages.{v.name} changed after the stage finished: not rerun (create a new "
                   f"AlignmentRun, or delete {v.artifact}_SUCCESS.json to rerun it)")
    if message:
        out["message"] = message
    if live is not None and v.phase == Phase.RUNNING:
        out["progress"] = live
    if cost["gpuHours"] or cost["judgeUSD"] or cost["children"]:
        out["cost"] = cost
    return out


def _live_and_cost(run: AlignmentRun, v: StagePlan, prev: dict[str, Any], observed: Observed,
                   tasks: dict[str, StageTask], stall_seconds: float) -> tuple[dict | None, dict]:
    """A stage's `progress` (from its running step's record) and `cost`."""
    now = epoch(observed.now) if observed.now else time.time()
    record = observed.progress.get(v.name)
    live = stage_progress(record, now, stall_seconds) if record is not None else None
    usd = float(((v.marker or {}).get("metrics") or {}).get("estimatedCostUSD") or 0.0)
    if record is not None and record.unit == "comparisons":
        usd = max(usd, record.metrics.get("usd", 0.0))
    task = tasks.get(v.name)
    if task is None:  # a reused stage: nothing of it runs here
        return None, {"gpuHours": 0.0, "judgeUSD": 0.0, "children": {}}
    return live, stage_cost(run, v.name, task, v.children, prev.get("cost"), now, usd)


def _condition(prev: dict[str, dict], now: str, type_: str, status: str, reason: str,
               message: str) -> dict[str, Any]:
    old = prev.get(type_)
    when = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": when or now}


def build_status(run: AlignmentRun, views: dict[str, StagePlan], prev_status: dict | None, generation: int,
                 observed: Observed, missing_secrets: dict[str, str],
                 tasks: dict[str, StageTask] | None = None, stall_seconds: float = 900.0) -> dict[str, Any]:
    """The run's whole `.status` from its stages' plans (`views`, in pipeline order), the
    previous status (times kept, attempts never fewer) and what was observed."""
    prev_status = prev_status or {}
    prev_stages = {s.get("name"): s for s in prev_status.get("stages", [])}
    prev_conds = {c.get("type"): c for c in prev_status.get("conditions", [])}
    suspended = bool(run.spec.suspend)
    ordered = list(views.values())
    failed = [v for v in ordered if v.phase == Phase.FAILED]
    done = all(v.phase in DONE for v in ordered)
    active = [v for v in ordered if v.phase == Phase.RUNNING]
    started = any(v.children or v.phase in (Phase.RUNNING, Phase.SUCCEEDED) for v in ordered)

    if failed:
        phase, current = Phase.FAILED, failed[0]
        message = "; ".join(v.message for v in failed) + _needed_by(run, failed)
        reason = current.reason if current.reason in _FAILED_REASONS else "StageFailed"
    elif done:
        phase, current, reason, message = Phase.SUCCEEDED, None, "AllStagesSucceeded", "every stage succeeded"
    else:
        current = (active or [v for v in ordered if v.phase not in DONE])[0]
        phase = Phase.SUSPENDED if suspended else (Phase.RUNNING if started else Phase.PENDING)
        reason = "Suspended" if suspended else (current.reason or "Pending")
        message = ("suspended (spec.suspend): no new children; running ones are suspended"
                   if suspended else current.message)
    now = observed.now or prev_conds.get("Succeeded", {}).get("lastTransitionTime") or ""
    conditions = [_condition(prev_conds, now, "Succeeded", "True" if phase == Phase.SUCCEEDED else "False",
                             reason, message)]
    conditions.append(_condition(prev_conds, now, "Suspended", "True" if suspended and phase == Phase.SUSPENDED
                                 else "False", "SpecSuspend" if suspended else "NotSuspended",
                                 "spec.suspend is true" if suspended else ""))
    if missing_secrets:
        conditions.append(_condition(prev_conds, now, "SecretsReady", "False", "SecretNotFound", "; ".join(
            f"{p}: Secret '{n}' not found in namespace '{run.metadata.namespace}'"
            for p, n in missing_secrets.items())))
    else:
        conditions.append(_condition(prev_conds, now, "SecretsReady", "True", "SecretsFound", ""))
    if phase in (Phase.RUNNING, Phase.PENDING) and not suspended and current is not None and current.reason in WAITING_REASONS:
        conditions.append(_condition(prev_conds, now, "Progressing", "False", current.reason, current.message))
    changed = [v.name for v in ordered if v.changed]
    if changed:
        conditions.append(_condition(prev_conds, now, "SpecChangeNeedsNewRun", "True", "FinishedStageChanged",
                                     "settings of finished stage(s) " + ", ".join(changed) +
                                     " changed; they are not rerun: create a new AlignmentRun"))
    tasks = tasks or {}
    stages = [_stage_status(v, prev_stages.get(v.name, {}), suspended,
                            *_live_and_cost(run, v, prev_stages.get(v.name, {}), observed, tasks, stall_seconds))
              for v in ordered]
    status: dict[str, Any] = {
        "phase": str(phase), "observedGeneration": generation, "message": message, "stages": stages,
        "conditions": conditions}
    if current is not None:
        status["stage"] = current.name
    clock = epoch(observed.now) if observed.now else time.time()
    status["progress"] = run_progress(run, tasks, stages, status["phase"], status.get("stage"), clock)
    status["cost"] = run_cost(stages)
    return status


def _needed_by(run: AlignmentRun, failed: list[StagePlan]) -> str:
    """'; needed by spec.stages.dpo.init' for the fields that name a failed stage."""
    names = {v.name for v in failed}
    fields = [f"spec.stages.{s}.{f}" for s in stages_of(run.spec)
              for f, ref in stage_references(run.spec, s).items() if ref in names]
    return f" (needed by {', '.join(fields)})" if fields else ""


_EVENT = {Phase.RUNNING: ("StageStarted", "Normal"), Phase.SUCCEEDED: ("StageSucceeded", "Normal"),
          Phase.FAILED: ("StageFailed", "Warning"), Phase.SUSPENDED: ("StageSuspended", "Normal"),
          Phase.SKIPPED: ("StageReused", "Normal")}
_RUN_EVENT = {Phase.SUCCEEDED: ("RunSucceeded", "Normal"), Phase.FAILED: ("RunFailed", "Warning"),
              Phase.SUSPENDED: ("RunSuspended", "Normal"), Phase.RUNNING: ("RunRunning", "Normal")}


def _metrics_text(metrics: dict[str, Any]) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in list(metrics.items())[:6] if not isinstance(v, (dict, list))]
    return f" ({', '.join(items)})" if items else ""


def status_actions(run: AlignmentRun, views: dict[str, StagePlan], prev_status: dict | None,
                   new_status: dict[str, Any]) -> list:
    """PatchStatus when anything changed, and an Event for every stage and run transition
    (a new run going Running gets only its first stage's StageStarted: one Event, not two)."""
    prev_status = prev_status or {}
    prev_stages = {s.get("name"): s for s in prev_status.get("stages", [])}
    events: list = []
    for s in new_status["stages"]:
        old = prev_stages.get(s["name"], {})
        view, told = views[s["name"]], (old.get("message") or "")
        # once per failed attempt (the failed child's details may still change while it waits)
        if view.reason in ("Backoff", "AttemptCleanup") and not told.startswith(attempt_failed(s["attempts"], s["name"])):
            events.append(EmitEvent("StageAttemptFailed", s["message"], "Warning"))
            continue
        before = int(old.get("attempts") or 0)
        if view.failed_attempt and s["attempts"] > before >= 1 and not told.startswith(attempt_failed(before, s["name"])):
            events.append(EmitEvent("StageAttemptFailed", view.failed_attempt, "Warning"))  # its backoff unseen
        if s.get("reason") in WAITING_REASONS and s.get("reason") != old.get("reason"):
            events.append(EmitEvent(s["reason"], s.get("message", ""), "Warning"))  # once per cause
        if s["phase"] == old.get("phase", Phase.PENDING) and s["attempts"] <= int(old.get("attempts") or 0):
            continue
        if s["phase"] == Phase.RUNNING and old.get("phase") == Phase.RUNNING:
            events.append(EmitEvent("StageRetrying", f"stage {s['name']}: attempt {s['attempts']} of "
                                    f"{run.spec.retries.maxAttempts}", "Warning"))
            continue
        if s["phase"] not in _EVENT:
            continue
        reason, type_ = _EVENT[s["phase"]]
        text = f"stage {s['name']} {s['phase'].lower()}"
        if s["phase"] == Phase.RUNNING:
            text = f"stage {s['name']} started (attempt {s['attempts']})"
        elif s["phase"] == Phase.SUCCEEDED:
            text += _metrics_text(s.get("metrics", {})) + (f": {s['artifact']}" if s.get("artifact") else "")
        elif s.get("message"):  # the planner's message may already say "stage X failed ..."
            prefix = f"stage {s['name']} {s['phase'].lower()} "
            text = s["message"] if s["message"].startswith(prefix) else f"{text}: {s['message']}"
        events.append(EmitEvent(reason, text, type_))
    events += _secret_events(prev_status, new_status)
    starting = prev_status.get("phase", Phase.PENDING) == Phase.PENDING and any(e.reason == "StageStarted" for e in events)
    if new_status["phase"] != prev_status.get("phase") and new_status["phase"] in _RUN_EVENT and not (
            new_status["phase"] == Phase.RUNNING and starting):  # a new run's first StageStarted says it
        reason, type_ = _RUN_EVENT[new_status["phase"]]
        spent = f" (cost: {new_status['cost']['summary']})" if new_status["phase"] in FINISHED \
            and new_status.get("cost") else ""
        events.append(EmitEvent(reason, f"run {new_status['phase'].lower()}: {new_status['message']}{spent}", type_))
    ours = {k: prev_status.get(k) for k in new_status if k in prev_status}
    patch = [] if ours == new_status else [PatchStatus(new_status)]
    return patch + events


def _secret_events(prev_status: dict, new_status: dict) -> list:
    """A Warning Event when Secrets go missing (or other ones do): once, not every resync."""
    old = next((c for c in prev_status.get("conditions") or [] if c.get("type") == "SecretsReady"), {})
    new = next((c for c in new_status["conditions"] if c["type"] == "SecretsReady"), {})
    if new.get("status") == "False" and (old.get("status"), old.get("message")) != ("False", new.get("message")):
        return [EmitEvent(new["reason"], new["message"], "Warning")]
    return []
