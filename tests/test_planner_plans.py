"""The planner's shape: phases as one enum that is written as plain strings, frozen per-stage
plans built from one context, and manifests rendered from the planned child alone."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from pathlib import Path

import pytest
import yaml

from xwin_operator.api.graph import stages_of
from xwin_operator.api.spec_io import load_run
from xwin_operator.api.status_model import AlignmentRunStatus, StageStatus
from xwin_operator.core.children import planned_children
from xwin_operator.core.config import OperatorConfig
from xwin_operator.core.descriptors import steps_of
from xwin_operator.core.planner import carried_out, missing_secret_refs, plan_all, plan_context
from xwin_operator.core.tasks import stage_task
from xwin_operator.core.types import ACTIVE, DONE, FINISHED, RUN_PHASES, EmitEvent, Observed, Phase, StagePlan
from xwin_operator.kube.manifests import render, sizing

from planner_helpers import child, make_run, of, plan, status_of
from plan_walk import T0, markers_for, simulate

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [REPO / "manifests/samples/tiny.yaml", REPO / "manifests/samples/xwin-7b.yaml"]


def _plain(value) -> None:
    """Only plain JSON types, every string a str itself (no Enum member)."""
    assert not isinstance(value, Enum), value
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            _plain(v)
    elif isinstance(value, list):
        for v in value:
            _plain(v)
    elif isinstance(value, str):
        assert type(value) is str, repr(value)


def test_a_phase_is_its_string_and_the_sets_are_phases():
    assert Phase.RUNNING == "Running" and "Running" in ACTIVE and Phase.FAILED in FINISHED
    assert {"Running": 1}[Phase.RUNNING] == 1 and f"{Phase.SKIPPED}" == "Skipped"
    assert str(Phase.SUCCEEDED) == "Succeeded" and type(str(Phase.SUCCEEDED)) is str
    assert set(DONE) == {"Succeeded", "Skipped"}
    # the status model (the CRD's schema) allows exactly these
    assert set(typing.get_args(AlignmentRunStatus.model_fields["phase"].annotation)) == set(RUN_PHASES)
    assert set(typing.get_args(StageStatus.model_fields["phase"].annotation)) == set(Phase)


def test_what_decide_writes_holds_plain_strings_only():
    run = make_run(suspend=False)
    passes = [plan(run),
              plan(run, [child("sft", phase="Failed", finished=T0)]),
              plan(make_run(suspend=True), [child("sft")]),
              plan(run, markers=markers_for(run, "sft"), missing_secrets=["s3-creds"])]
    for actions in passes:
        status = status_of(actions)
        _plain(status)
        yaml.safe_dump(status)       # refuses an Enum member
        for event in of(actions, EmitEvent):
            _plain(event.message)
    status, _, _ = simulate(run)
    _plain(status)


def test_a_stage_plan_is_frozen_and_planning_leaves_its_inputs_alone():
    run = make_run()
    children = [child("sft", phase="Failed", finished=T0)]
    observed = Observed(children=list(children), markers={}, now=T0)
    ctx = plan_context(run, observed, None, OperatorConfig(backoff_seconds=0), generation=1)
    plans = plan_all(ctx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plans["sft"].phase = Phase.FAILED  # type: ignore[misc]
    assert isinstance(plans["sft"].children, tuple) and isinstance(plans["sft"].creates, tuple)
    assert observed.children == children
    assert plan_all(ctx) == plans    # a pure function of the context


def test_a_missing_secret_holds_a_stage_back_in_a_new_plan():
    run = make_run()
    observed = Observed(children=[], markers={}, now=T0, missing_secrets=["s3-creds"])
    ctx = plan_context(run, observed, None, OperatorConfig(), generation=1)
    plans = plan_all(ctx)
    assert plans["sft"].creates and plans["sft"].phase == Phase.RUNNING
    held = carried_out(ctx, plans, missing_secret_refs(run, observed))
    assert held["sft"].reason == "SecretNotFound" and held["sft"].phase == Phase.PENDING
    assert not held["sft"].creates
    assert plans["sft"].creates and plans["sft"].reason == "StageRunning"   # the original stays


def test_a_created_child_is_listed_in_the_carried_out_plan():
    run = make_run()
    ctx = plan_context(run, Observed(children=[], markers={}, now=T0), None, OperatorConfig(), generation=1)
    plans = plan_all(ctx)
    done = carried_out(ctx, plans, {})
    assert [c.name for c in done["sft"].children] == [c.name for c in plans["sft"].creates]
    assert plans["sft"].children == ()


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sized_step_finds_its_settings_in_the_task(path):
    """The planner resolves the settings that size a step's pods into the task (the task's
    JSON, and so its digest, as before): the manifests read them nowhere else."""
    run = load_run(path)
    for stage in stages_of(run.spec):
        if getattr(run.spec.stages, stage).reused:
            continue
        task = stage_task(run, stage)
        for step in steps_of(run.spec, stage):
            for c in planned_children(run, stage, step, 1, task):
                if step.resources != "none":
                    assert sizing(c) is task.params[{"training": "resources", "scoring": "scoringResources",
                                                      "serving": "serving"}[step.resources]]
                assert render(run, c, "uid", OperatorConfig())["kind"] == c.kind


def test_render_uses_the_planned_child_s_own_name_labels_and_task():
    run = make_run()
    task = stage_task(run, "sft")
    (planned,) = planned_children(run, "sft", steps_of(run.spec, "sft")[0], 1, task)
    sized = dataclasses.replace(task, params={**task.params, "resources": {
        **task.params["resources"], "gpusPerNode": 4, "nodes": 3}})
    other = dataclasses.replace(planned, name="custom-name", labels={**planned.labels, "extra": "yes"}, task=sized)
    m = render(run, other, "uid-1", OperatorConfig())
    assert m["metadata"]["name"] == "custom-name" and m["metadata"]["labels"]["extra"] == "yes"
    assert m["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and m["spec"]["nprocPerNode"] == "4"
    bare = dataclasses.replace(planned, task=dataclasses.replace(task, params={
        k: v for k, v in task.params.items() if k != "resources"}))
    with pytest.raises(KeyError, match="resources"):
        render(run, bare, "uid-1", OperatorConfig())


def test_a_server_renders_as_two_children_of_one_name():
    run = load_run(SAMPLES[1])
    task = stage_task(run, "pairs")
    serve, sample = steps_of(run.spec, "pairs")[:2]
    deployment, service = planned_children(run, "pairs", serve, 2, task)
    (sampler,) = planned_children(run, "pairs", sample, 2, task)
    assert render(run, deployment, "u", OperatorConfig())["kind"] == "Deployment"
    assert render(run, service, "u", OperatorConfig())["kind"] == "Service"
    assert sampler.server == service.name
    env = {e["name"]: e.get("value") for e in render(run, sampler, "u", OperatorConfig())[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPENAI_BASE_URL"] == f"http://{service.name}:8000/v1"


def test_stage_plan_defaults_are_a_pending_stage():
    p = StagePlan("sft")
    assert p.phase == Phase.PENDING and p.creates == () and p.deletes == ()
