"""What the planner tests share: a run with every kind of stage, a `decide` call on a
hand-built observation, and readers of its actions and status."""

from __future__ import annotations

from xwin_operator.api.spec_io import parse_run
from xwin_operator.core.children import child_name
from xwin_operator.core.config import OperatorConfig
from xwin_operator.core.planner import decide
from xwin_operator.core.types import ChildState, CreateChild, Observed, PatchStatus
from xwin_operator.kube.manifests import render

from plan_walk import T0

RUN = """
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {name: demo, namespace: team}
spec:
  baseModel: s3://models/base/
  storage: {uri: s3://bucket/runs, secretRef: s3-creds}
  judge: {apiKeySecret: openai-key}
  defaults: {resources: {nodes: 1, gpusPerNode: 1}}
  retries: {maxAttempts: 3}
  stages:
    sft: {data: s3://data/sft.jsonl}
    pairs: {from: s3://data/pairs.jsonl}
    rewardModel: {init: sft}
    bestOfN: {prompts: s3://data/prompts.jsonl, n: 4}
    rejectionSampling: {init: sft}
    dpo: {init: rejectionSampling}
"""


def make_run(text: str = RUN, **spec_changes):
    run = parse_run(text)
    if spec_changes:
        data = run.model_dump(by_alias=True, exclude_none=True)
        for path, value in spec_changes.items():
            node = data["spec"]
            *parents, leaf = path.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        run = type(run).model_validate(data)
    return run


def child(stage, step="train", attempt=1, phase="Running", kind="PyTorchJob", **kw) -> ChildState:
    return ChildState(kind, child_name("demo", stage, step, attempt), stage, step, attempt, phase,
                      created=kw.pop("created", T0), **kw)


def plan(run, children=(), markers=None, status=None, now=T0, config=None, **observed):
    return decide(run, Observed(children=list(children), markers=markers or {}, now=now, **observed),
                  status, generation=7, config=config or OperatorConfig(backoff_seconds=60))


def creates(actions) -> list[str]:
    return [f"{a.child.kind}/{a.child.name}" for a in actions if isinstance(a, CreateChild)]


def manifests(run, actions) -> list[dict]:
    """The manifests the operator would create for the planned children."""
    return [render(run, a.child, "uid-1", OperatorConfig(backoff_seconds=60))
            for a in actions if isinstance(a, CreateChild)]


def of(actions, cls) -> list:
    return [a for a in actions if isinstance(a, cls)]


def status_of(actions) -> dict:
    (patch,) = of(actions, PatchStatus)
    return patch.status


def stage(status, name) -> dict:
    return next(s for s in status["stages"] if s["name"] == name)


def cond(status, type_) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)
