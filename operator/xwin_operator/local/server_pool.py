"""vLLM servers `xwin run` keeps between stages, so one model is loaded once per run.

On a cluster each serve step is its own Deployment, deleted when its sampler is done: an idle
GPU server between stages costs GPUs. On one machine the cost is the other way round: an idle
vLLM server costs some memory and no CPU, while a cold start costs about 30 s of CPU. The
recipe serves the SFT model three times (pairs' and bestOfN's `policy`, evaluate's
`model:sft`), so `xwin run` keeps a server when the planner deletes it if a later stage of the
run will serve the same model with the same `serving` settings, and that stage's serve step
adopts it instead of starting another:

    release (the planner deletes a serve child): `wanted_later` -> `ServerPool.park`, else stop
    start   (the planner creates a serve child): `ServerPool.take` -> reuse, else a cold start
    the run ends (success, failure, Ctrl-C):     `ServerPool.close` stops what is parked

Which stages serve what, and what `wanted_later` decides from, is the planner's: the stage
tasks (`planner.stage_tasks`) and the status it wrote. Samples do not depend on the server's
history: every request carries its own seed (`xwin_jobs.sampler.prompt_seed`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRunSpec
from ..core.descriptors import steps_of
from ..core.types import DONE, FINISHED



def server_key(model_uri: str, serving: Mapping[str, Any] | None) -> str:
    """What makes two serve steps interchangeable: the model and the server's settings."""
    return json.dumps([model_uri, dict(serving or {})], sort_keys=True)


def serve_keys(spec: AlignmentRunSpec, tasks: Mapping[str, StageTask]) -> list[tuple[str, str, str]]:
    """(stage, model input, server key) of every serve step of the run's stages, in order. Pure."""
    out = []
    for stage, task in tasks.items():
        for step in steps_of(spec, stage):
            if step.kind == "serve" and step.model_input in task.inputs:
                key = server_key(task.inputs[step.model_input], task.params.get("serving"))
                out.append((stage, step.model_input, key))
    return out


def wanted_later(spec: AlignmentRunSpec, tasks: Mapping[str, StageTask], status: dict | None,
                 stage: str, model_input: str) -> bool:
    """Whether another serve step of an unfinished stage serves what the serve step
    (`stage`, `model_input`) served: the server it leaves is worth keeping. Pure."""
    phases = {s.get("name"): s.get("phase") for s in (status or {}).get("stages", [])}
    keys = serve_keys(spec, tasks)
    mine = next((k for s, m, k in keys if (s, m) == (stage, model_input)), None)
    return mine is not None and any(
        k == mine and (s, m) != (stage, model_input) and phases.get(s) not in (*DONE, *FINISHED)
        for s, m, k in keys)


def running(server: Any) -> bool:
    """Whether a LocalVllmServer's process was started and has not exited."""
    proc = getattr(server, "proc", None)
    return proc is not None and proc.poll() is None


@dataclass
class Parked:
    server: Any          # xwin_jobs.vllm_server.LocalVllmServer, running
    scratch: Any         # the TemporaryDirectory its model was fetched into (or None)


class ServerPool:
    """Idle servers by `server_key`, for the length of one `xwin run`."""

    def __init__(self) -> None:
        self._parked: dict[str, Parked] = {}
        self._lock = threading.Lock()

    def park(self, key: str, parked: Parked) -> None:
        with self._lock:
            old, self._parked[key] = self._parked.get(key), parked
        if old is not None and old.server is not parked.server:
            _stop(old)

    def take(self, key: str) -> Parked | None:
        """The idle server for `key`, if one is parked and its process still runs."""
        with self._lock:
            parked = self._parked.pop(key, None)
        if parked is None:
            return None
        if not running(parked.server):
            _stop(parked)
            return None
        return parked

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._parked)

    def close(self) -> None:
        with self._lock:
            parked, self._parked = list(self._parked.values()), {}
        for p in parked:
            _stop(p)


def _stop(parked: Parked) -> None:
    try:
        parked.server.stop()
    finally:
        if parked.scratch is not None:
            parked.scratch.cleanup()
