"""A watched AlignmentRun body as the planner's input: `parse_run` validates it with the spec
model, or says once, in its status and an Event, which fields the CRD schema let through wrongly.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from ..api.graph import GraphError, dependencies
from ..api.spec import AlignmentRun
from ..core.types import EmitEvent, PatchStatus, Phase


def spec_errors(exc: Exception) -> list[str]:
    """'field.path: message' for each problem of a pydantic ValidationError of an AlignmentRun."""
    out: list[str] = []
    for err in getattr(exc, "errors", lambda: [])():
        nested = (err.get("ctx") or {}).get("errors")
        if nested:
            out += [f"{path}: {msg}" for path, msg in nested]
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append(f"{loc}: {err.get('msg', 'invalid')}")
    return out or [str(exc)]


def parse_run(body: Mapping[str, Any], previous: dict | None, generation: int,
              now: str) -> tuple[Any, list]:
    """(AlignmentRun, []) or, for a spec the CRD schema let through but the spec model rejects
    (or whose stages read each other in a cycle, which no CEL rule can see), (None,
    [PatchStatus(Failed, naming each field), EmitEvent]) — never an exception, so a bad spec is
    reported once instead of crash-looping. Fixing the spec re-runs the handlers."""
    meta = body.get("metadata") or {}
    try:
        run = AlignmentRun.model_validate({"apiVersion": body.get("apiVersion", "xwin.ai/v1alpha1"),
                                           "kind": "AlignmentRun",
                                           "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                                           "spec": _plain(body.get("spec") or {})})
        dependencies(run.spec)
        return run, []
    except ValidationError as e:
        message = "invalid spec: " + "; ".join(spec_errors(e))
    except GraphError as e:
        message = f"invalid spec: {e}"
    previous = previous or {}
    condition = {"type": "Succeeded", "status": "False", "reason": "InvalidSpec", "message": message,
                 "lastTransitionTime": now}
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Succeeded"), None)
    if old and old.get("reason") == "InvalidSpec" and old.get("message") == message:
        condition["lastTransitionTime"] = old.get("lastTransitionTime", now)
    status = {"phase": Phase.FAILED.value, "observedGeneration": generation, "message": message,
              "stages": previous.get("stages") or [], "conditions": [condition]}
    if all(previous.get(k) == v for k, v in status.items()):
        return None, []
    return None, [PatchStatus(status), EmitEvent("InvalidSpec", message, "Warning")]


def _plain(value: Any) -> Any:
    """kopf's body views -> plain dicts and lists (what pydantic validates)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
