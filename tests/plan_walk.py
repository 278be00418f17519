"""What `decide` alone plans for a run: the CreateChild names, in order, when every child
succeeds at once and every stage's last step writes its marker. Pure (no processes, no store);
the tests compare it with what `xwin run` actually created, so both walk the same graph."""

from __future__ import annotations

from xwin_operator.graph import stages_of
from xwin_operator.planner import (ChildState, CreateChild, DeleteChild, Observed, OperatorConfig,
                                   PatchStatus, decide)
from xwin_operator.steps import steps_of
from xwin_operator.tasks import run_root, stage_task, stage_uri

NOW = "2024-01-01T00:00:00Z"


def planned_creates(run, store: str, limit: int = 200) -> list[str]:
    """Kind/name of every child decide creates, in order, until the run succeeds."""
    spec, meta = run.spec, run.metadata
    config = OperatorConfig(store=store, backoff_seconds=0)
    root = run_root(spec, meta.namespace, meta.name, store)
    planned = [s for s in stages_of(spec) if not getattr(spec.stages, s).reused]
    by_uri = {stage_uri(root, s): s for s in planned}
    tasks = {s: stage_task(run, s, store) for s in planned}
    children: dict[tuple[str, str], ChildState] = {}
    markers: dict[str, dict | None] = {s: None for s in planned}
    status, created = None, []
    for _ in range(limit):
        actions = decide(run, Observed(list(children.values()), dict(markers), NOW), status,
                         uid="u", generation=1, config=config)
        for a in actions:
            if isinstance(a, CreateChild):
                m, labels = a.manifest, a.manifest["metadata"]["labels"]
                name, kind = m["metadata"]["name"], m["kind"]
                created.append(f"{kind}/{name}")
                stage, step = labels["xwin.ai/stage"], labels["xwin.ai/step"]
                done = "Running" if kind in ("Deployment", "Service") else "Succeeded"
                children[kind, name] = ChildState(kind, name, stage, step, int(labels["xwin.ai/attempt"]),
                                            done, created=NOW, finished=NOW)
                if done == "Succeeded" and step == steps_of(spec, stage)[-1].name:
                    task = tasks[stage]
                    upstream = {uri: markers[by_uri[uri]]["digest"] for uri in task.markers}
                    markers[stage] = {"stage": stage, "digest": task.digest(upstream)}
            elif isinstance(a, DeleteChild):
                children.pop((a.kind, a.name), None)
            elif isinstance(a, PatchStatus):
                status = a.status
        if (status or {}).get("phase") in ("Succeeded", "Failed"):
            assert status["phase"] == "Succeeded", status
            return created
    raise AssertionError(f"decide did not finish the run in {limit} passes: {status}")
