"""Driving `decide` alone through a whole run: a pure world where every child does its job one
pass after it is created, and the last step of a stage writes the marker its job would write.

    status, created, deleted = simulate(run, fail_once={"rewardModel"})
    planned_creates(run, store)   # ["PyTorchJob/tiny-sft-1", ...], in order, until Succeeded

The planner tests walk the full recipe with it; the `xwin run` and demo tests compare what the
local executor really created with `planned_creates`, so both walk the same graph. No
processes, no store.
"""

from __future__ import annotations

from xwin_operator.core.config import OperatorConfig
from xwin_operator.core.planner import decide
from xwin_operator.core.types import ChildState, CreateChild, DeleteChild, Observed, PatchStatus
from xwin_operator.core.descriptors import steps_of
from xwin_operator.core.inputs import run_root, stage_uri
from xwin_operator.core.tasks import stage_task

T0 = "2024-05-01T10:00:00Z"


def markers_for(run, *stages: str, store: str | None = None) -> dict:
    """The `_SUCCESS.json` each stage would write for the current spec, in order."""
    out: dict = {}
    root = run_root(run.spec, run.metadata.namespace, run.metadata.name, store)
    by_uri = {stage_uri(root, s): s for s in run.spec.stages.present()}
    for stage in stages:
        task = stage_task(run, stage, store)
        upstream = {uri: out[by_uri[uri]]["digest"] for uri in task.markers}
        out[stage] = {"stage": stage, "digest": task.digest(upstream), "finishedAt": T0,
                      "metrics": {"trainLoss": 0.5}}
    return out


def simulate(run, store: str | None = None, fail_once: set[str] = frozenset(),
             max_passes: int = 80) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]:
    """Drive `decide` until the run finishes (the stages in `fail_once` fail their first
    attempt). Returns (status, (kind, name) of every child created in order, every deletion);
    a child created twice is an AssertionError."""
    world: dict[tuple[str, str], ChildState] = {}
    done: list[str] = []
    status, created, deleted = None, [], []
    config = OperatorConfig(store=store or "", backoff_seconds=0)
    made = [s for s in run.spec.stages.present() if not getattr(run.spec.stages, s).reused]
    for n in range(max_passes):
        now = f"2024-05-01T10:{n // 60:02d}:{n % 60:02d}Z"
        for key, c in list(world.items()):   # the controllers move each child on
            if c.phase != "Pending":
                continue
            if c.kind in ("Deployment", "Service"):
                phase = "Running"
            elif c.stage in fail_once and c.attempt == 1:
                phase = "Failed"
            else:
                phase = "Succeeded"
            world[key] = ChildState(**{**c.__dict__, "phase": phase, "finished": now})
            if phase == "Succeeded" and c.step == steps_of(run.spec, c.stage)[-1].name:
                done.append(c.stage)
        markers = {s: None for s in made}
        markers.update(markers_for(run, *[s for s in made if s in done], store=store))
        actions = decide(run, Observed(children=list(world.values()), markers=markers, now=now),
                         status, generation=1, config=config)
        for a in actions:
            if isinstance(a, CreateChild):
                c, labels = a.child, a.child.labels
                key = (c.kind, c.name)
                assert key not in world, f"{key} created twice"
                created.append(key)
                world[key] = ChildState(c.kind, c.name, labels["xwin.ai/stage"],
                                        labels["xwin.ai/step"], int(labels["xwin.ai/attempt"]),
                                        "Pending", created=now)
            elif isinstance(a, DeleteChild):
                deleted.append((a.kind, a.name))
                world.pop((a.kind, a.name), None)
            elif isinstance(a, PatchStatus):
                status = a.status
        if status and status["phase"] in ("Succeeded", "Failed"):
            return status, created, deleted
    raise AssertionError(f"the run did not finish in {max_passes} passes: {status and status['message']}")


def planned_creates(run, store: str) -> list[str]:
    """Kind/name of every child decide creates, in order, when every child succeeds."""
    status, created, _ = simulate(run, store)
    assert status["phase"] == "Succeeded", status
    return [f"{kind}/{name}" for kind, name in created]
