"""The planner as a pure function: what `decide` asks for, for the situations an operator meets.

Each test builds the observed world (children by label, markers from the store) by hand and
checks the actions and the status a user would see with `kubectl get ar -o yaml`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from xwin_operator.core.children import child_name
from xwin_operator.core.config import OperatorConfig
from xwin_operator.core.planner import decide, input_uris, secret_refs
from xwin_operator.core.types import (ChildState, CreateChild, DeleteChild, EmitEvent, Observed,
                                      PatchStatus, RequeueAfter, SuspendChild)
from xwin_operator.kube.manifests import render
from xwin_operator.api.spec_io import parse_run

from plan_walk import T0, markers_for, simulate

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


# --- the happy path -----------------------------------------------------------------------


def test_a_new_run_creates_only_the_first_ready_stage():
    acts = plan(make_run())
    assert creates(acts) == ["PyTorchJob/demo-sft-1"]
    st = status_of(acts)
    assert st["phase"] == "Running" and st["stage"] == "sft" and st["observedGeneration"] == 7
    assert stage(st, "pairs")["phase"] == "Skipped" and stage(st, "pairs")["artifact"] == "s3://data/pairs.jsonl"
    assert stage(st, "rewardModel")["phase"] == "Pending"
    # the status written with the create already names the child: no second patch once it shows up
    assert stage(st, "sft")["children"] == ["PyTorchJob/demo-sft-1"] and stage(st, "sft")["startTime"] == T0
    assert cond(st, "Succeeded") == {"type": "Succeeded", "status": "False", "reason": "StageRunning",
                                     "message": st["message"], "lastTransitionTime": T0}
    assert EmitEvent("StageStarted", "stage sft started (attempt 1)") in acts


def test_deciding_again_creates_nothing_twice_and_patches_nothing_new():
    run = make_run()
    first = status_of(plan(run))
    again = plan(run, [child("sft", phase="Pending", created=None)], status=first)
    assert creates(again) == [] and of(again, EmitEvent) == []
    assert of(again, PatchStatus) == []


def test_a_finished_stage_starts_every_stage_that_waited_for_it():
    run = make_run()
    acts = plan(run, [child("sft", phase="Succeeded", finished=T0)], markers_for(run, "sft"))
    assert creates(acts) == ["PyTorchJob/demo-rewardmodel-1"]
    sft = stage(status_of(acts), "sft")
    assert sft["phase"] == "Succeeded" and sft["artifact"] == "s3://bucket/runs/team/demo/sft/"
    assert sft["metrics"] == {"trainLoss": 0.5} and sft["completionTime"] == T0
    assert sft["children"] == ["PyTorchJob/demo-sft-1"]
    assert any(e.reason == "StageSucceeded" and "trainLoss=0.5" in e.message for e in of(acts, EmitEvent))


def test_a_stage_done_by_an_earlier_operator_counts_from_its_marker_alone():
    run = make_run()
    acts = plan(run, [], markers_for(run, "sft", "rewardModel"))
    assert creates(acts) == ["Deployment/demo-bestofn-serve-1", "Service/demo-bestofn-serve-1"]
    st = status_of(acts)
    assert [stage(st, s)["phase"] for s in ("sft", "rewardModel", "bestOfN", "rejectionSampling")] == [
        "Succeeded", "Succeeded", "Running", "Pending"]
    assert stage(st, "rejectionSampling")["message"] == "waits for stage(s) bestOfN"


def test_every_stage_done_is_a_succeeded_run_and_a_steady_state():
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel", "bestOfN", "rejectionSampling", "dpo")
    acts = plan(run, [], markers)
    st = status_of(acts)
    assert st["phase"] == "Succeeded" and "stage" not in st
    assert cond(st, "Succeeded")["status"] == "True" and cond(st, "Succeeded")["reason"] == "AllStagesSucceeded"
    assert any(e.reason == "RunSucceeded" for e in of(acts, EmitEvent))
    assert plan(run, [], markers, status=copy.deepcopy(st), now="2024-05-02T00:00:00Z") == []


def test_a_marker_written_just_before_its_job_exits_does_not_kill_the_job():
    run = make_run()
    markers = markers_for(run, "sft")
    exiting = child("sft", phase="Running")  # the marker is there; the pod has not exited yet
    acts = plan(run, [exiting], markers)
    assert of(acts, DeleteChild) == []
    sft = stage(status_of(acts), "sft")
    assert sft["phase"] == "Succeeded" and sft["children"] == ["PyTorchJob/demo-sft-1"]
    assert creates(acts) == ["PyTorchJob/demo-rewardmodel-1"]
    # suspend leaves it alone too; an older attempt's leftover still goes
    kids = [child("sft", attempt=1, phase="Running"), child("sft", attempt=2, phase="Running")]
    assert of(plan(run, kids, markers), DeleteChild) == [DeleteChild("PyTorchJob", "demo-sft-1")]
    assert of(plan(make_run(suspend=True), [exiting], markers), SuspendChild) == []
    # once it exits it is a finished child, listed as before
    done = plan(run, [replace(exiting, phase="Succeeded", finished=T0)], markers, status=status_of(acts))
    assert of(done, DeleteChild) == [] and of(done, EmitEvent) == []


def test_a_sampling_stage_whose_marker_is_there_frees_its_server_but_lets_its_scorer_exit():
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel", "bestOfN")
    kids = [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service"),
            child("bestOfN", "sample", kind="Job", phase="Succeeded"), child("bestOfN", "score")]
    deletes = of(plan(run, kids, markers), DeleteChild)
    assert deletes == [DeleteChild("Deployment", "demo-bestofn-serve-1"),
                       DeleteChild("Service", "demo-bestofn-serve-1")]


# --- sampling: server, sampler, scorer ------------------------------------------------------


def test_the_sampler_starts_when_its_server_is_ready_and_the_server_goes_when_it_is_done():
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel")
    deployment = child("bestOfN", "serve", kind="Deployment", phase="Pending")
    service = child("bestOfN", "serve", kind="Service", phase="Running")
    acts = plan(run, [deployment, service], markers)
    assert not [c for c in creates(acts) if "bestofn" in c]

    ready = child("bestOfN", "serve", kind="Deployment", phase="Running")
    acts = plan(run, [ready, service], markers)
    (job,) = [m for m in manifests(run, acts) if m["kind"] == "Job"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job["metadata"]["name"] == "demo-bestofn-sample-1"
    assert env["OPENAI_BASE_URL"] == "http://demo-bestofn-serve-1:8000/v1"

    sampled = child("bestOfN", "sample", kind="Job", phase="Succeeded")
    acts = plan(run, [ready, service, sampled], markers)
    assert DeleteChild("Deployment", "demo-bestofn-serve-1") in acts
    assert DeleteChild("Service", "demo-bestofn-serve-1") in acts
    assert "PyTorchJob/demo-bestofn-score-1" in creates(acts)


def test_evaluate_starts_the_next_models_server_while_the_current_one_samples():
    """The next server's cold start overlaps the sampling; never more than two servers up."""
    run = make_run(RUN + "    evaluate: {models: [sft, rejectionSampling, dpo], "
                         "mtBench: {questions: s3://eval/mt.jsonl}}\n")
    markers = markers_for(run, "sft", "rewardModel", "bestOfN", "rejectionSampling", "dpo")

    def servers(step, phase):
        return [child("evaluate", step, kind=k, phase=phase) for k in ("Deployment", "Service")]

    acts = plan(run, servers("serve-sft", "Pending"), markers)   # cold start: nothing else yet
    assert not [c for c in creates(acts) if "evaluate" in c]
    kids = servers("serve-sft", "Running")
    acts = plan(run, kids, markers)
    assert creates(acts) == ["Job/demo-evaluate-sample-sft-1",
                             "Deployment/demo-evaluate-serve-rejectionsampling-1",
                             "Service/demo-evaluate-serve-rejectionsampling-1"]
    # sft sampled: its server goes, the next sampler starts, the third server comes up early
    kids += [child("evaluate", "sample-sft", kind="Job", phase="Succeeded")]
    kids += servers("serve-rejectionsampling", "Running")
    acts = plan(run, kids, markers)
    assert DeleteChild("Deployment", "demo-evaluate-serve-sft-1") in acts
    assert creates(acts) == ["Job/demo-evaluate-sample-rejectionsampling-1",
                             "Deployment/demo-evaluate-serve-dpo-1", "Service/demo-evaluate-serve-dpo-1"]
    # a next server that is still starting when the sampler ends: the stage waits for it
    kids = [k for k in kids if "serve-sft" not in k.name]
    kids += [child("evaluate", "sample-rejectionsampling", kind="Job", phase="Succeeded")]
    kids += servers("serve-dpo", "Pending")
    acts = plan(run, kids, markers)
    assert DeleteChild("Deployment", "demo-evaluate-serve-rejectionsampling-1") in acts
    assert not creates(acts)


def test_a_failed_sampler_retries_with_a_new_server():
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel")
    kids = [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service"),
            child("bestOfN", "sample", kind="Job", phase="Failed", reason="BackoffLimitExceeded",
                  finished=T0)]
    acts = plan(run, kids, markers, now="2024-05-01T10:05:00Z")
    assert DeleteChild("Deployment", "demo-bestofn-serve-1") in acts
    assert {"Deployment/demo-bestofn-serve-2", "Service/demo-bestofn-serve-2"} <= set(creates(acts))


# --- failures and retries -------------------------------------------------------------------


def test_a_failed_attempt_waits_its_backoff_then_retries_as_a_new_child():
    run = make_run()
    failed = child("sft", phase="Failed", reason="BackoffLimitExceeded", exit_code=1,
                   finished="2024-05-01T10:00:00Z")
    acts = plan(run, [failed], now="2024-05-01T10:00:20Z")
    assert creates(acts) == []
    (wait,) = of(acts, RequeueAfter)
    assert wait.seconds == pytest.approx(40)
    st = status_of(acts)
    assert cond(st, "Succeeded")["reason"] == "Backoff" and "exit code 1" in st["message"]
    assert "StageAttemptFailed" in [e.reason for e in of(acts, EmitEvent)]
    later = plan(run, [failed], status=st, now="2024-05-01T10:00:40Z")
    assert of(later, PatchStatus) == [] and of(later, EmitEvent) == []  # no churn while waiting

    acts = plan(run, [failed], status=st, now="2024-05-01T10:01:01Z")
    assert creates(acts) == ["PyTorchJob/demo-sft-2"]
    assert stage(status_of(acts), "sft")["attempts"] == 2
    assert any(e.reason == "StageRetrying" and e.type == "Warning" for e in of(acts, EmitEvent))


def test_the_backoff_doubles_per_attempt():
    run = make_run()
    kids = [child("sft", attempt=a, phase="Failed", finished=T0) for a in (1, 2)]
    (wait,) = of(plan(run, kids, now=T0), RequeueAfter)
    assert wait.seconds == pytest.approx(120)


def test_the_last_attempt_failing_fails_the_run_naming_stage_child_and_reason():
    run = make_run()
    kids = [child("sft", attempt=a, phase="Failed", reason="BackoffLimitExceeded",
                  message="pod exited", exit_code=1, finished=T0) for a in (1, 2, 3)]
    acts = plan(run, kids)
    st = status_of(acts)
    assert creates(acts) == [] and st["phase"] == "Failed" and st["stage"] == "sft"
    assert "stage sft failed after 3 attempt(s)" in st["message"]
    assert "PyTorchJob/demo-sft-3: BackoffLimitExceeded (exit code 1): pod exited" in st["message"]
    assert cond(st, "Succeeded")["status"] == "False" and cond(st, "Succeeded")["reason"] == "StageFailed"
    assert any(e.reason == "RunFailed" and e.type == "Warning" for e in of(acts, EmitEvent))


def test_a_failed_init_stage_fails_the_run_naming_the_field_that_needs_it():
    run = make_run()
    kids = [child("rejectionSampling", attempt=a, phase="Failed", reason="OOMKilled", finished=T0)
            for a in (1, 2, 3)] + [child("evaluate", phase="Running")]
    acts = plan(run, kids, markers_for(run, "sft", "rewardModel", "bestOfN"))
    st = status_of(acts)
    assert st["phase"] == "Failed" and "spec.stages.dpo.init" in st["message"]
    assert DeleteChild("PyTorchJob", "demo-evaluate-1") in acts  # nothing keeps holding GPUs
    assert creates(acts) == []


def test_a_missing_from_uri_fails_the_run_naming_the_field():
    run = make_run()
    assert input_uris(run)["spec.stages.pairs.from"] == "s3://data/pairs.jsonl"
    acts = plan(run, [], markers_for(run, "sft"), missing_inputs=["s3://data/pairs.jsonl"])
    st = status_of(acts)
    assert st["phase"] == "Failed" and cond(st, "Succeeded")["reason"] == "InputNotFound"
    assert "spec.stages.pairs.from: s3://data/pairs.jsonl does not exist" in st["message"]


# --- secrets ----------------------------------------------------------------------------------


def test_a_missing_storage_secret_holds_every_child_back_and_says_which_field():
    run = make_run()
    assert secret_refs(run) == {"spec.storage.secretRef": "s3-creds", "spec.judge.apiKeySecret": "openai-key"}
    acts = plan(run, missing_secrets=["s3-creds"])
    st = status_of(acts)
    assert creates(acts) == [] and st["phase"] == "Pending"
    c = cond(st, "SecretsReady")
    assert c["status"] == "False" and c["reason"] == "SecretNotFound"
    assert "spec.storage.secretRef: Secret 's3-creds' not found in namespace 'team'" in c["message"]
    assert creates(plan(run, status=st)) == ["PyTorchJob/demo-sft-1"]  # the Secret appeared


def test_a_missing_judge_secret_holds_only_the_judge_back():
    text = RUN.replace("pairs: {from: s3://data/pairs.jsonl}", "pairs: {prompts: s3://data/p.jsonl}")
    run = make_run(text)
    markers = markers_for(run, "sft")
    kids = [child("pairs", "serve", kind="Deployment", phase="Succeeded"),
            child("pairs", "sample", kind="Job", phase="Succeeded")]
    acts = plan(run, kids, markers, missing_secrets=["openai-key"])
    assert creates(acts) == []
    assert stage(status_of(acts), "pairs")["message"].startswith("spec.judge.apiKeySecret")
    acts = plan(run, kids, markers)
    job = manifests(run, acts)[0]
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai-key",
                                                                     "key": "OPENAI_API_KEY"}}} in env


# --- suspend ----------------------------------------------------------------------------------


def test_suspend_stops_creating_and_suspends_running_children_then_resumes():
    run = make_run(suspend=True)
    kids = [child("rewardModel"), child("dpo", phase="Pending")]
    acts = plan(run, kids, markers_for(run, "sft"))
    assert creates(acts) == []
    assert set(of(acts, SuspendChild)) == {SuspendChild("PyTorchJob", "demo-rewardmodel-1"),
                                           SuspendChild("PyTorchJob", "demo-dpo-1")}
    st = status_of(acts)
    assert st["phase"] == "Suspended" and cond(st, "Suspended")["status"] == "True"
    assert stage(st, "rewardModel")["phase"] == "Suspended"

    resumed = make_run()
    kids = [child("rewardModel", suspended=True), child("dpo", suspended=True)]
    acts = plan(resumed, kids, markers_for(resumed, "sft"), status=st)
    assert set(of(acts, SuspendChild)) == {SuspendChild("PyTorchJob", "demo-rewardmodel-1", False),
                                           SuspendChild("PyTorchJob", "demo-dpo-1", False)}
    assert status_of(acts)["phase"] == "Running"


def test_suspend_deletes_vllm_servers_and_resume_waits_for_a_new_one_before_the_sampler():
    run = make_run(suspend=True)
    markers = markers_for(run, "sft", "rewardModel")
    kids = [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service"),
            child("bestOfN", "sample", kind="Job")]
    acts = plan(run, kids, markers)
    assert DeleteChild("Deployment", "demo-bestofn-serve-1") in acts
    assert SuspendChild("Job", "demo-bestofn-sample-1") in acts

    kids = [child("bestOfN", "sample", kind="Job", suspended=True)]
    acts = plan(make_run(), kids, markers)
    assert {"Deployment/demo-bestofn-serve-1", "Service/demo-bestofn-serve-1"} <= set(creates(acts))
    assert of(acts, SuspendChild) == []
    kids += [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service")]
    assert of(plan(make_run(), kids, markers), SuspendChild) == [SuspendChild("Job", "demo-bestofn-sample-1", False)]


# --- spec changes ---------------------------------------------------------------------------


def test_a_finished_stage_whose_spec_changed_is_reported_not_rerun():
    run = make_run()
    markers = markers_for(run, "sft")
    st = status_of(plan(run, [child("sft", phase="Succeeded")], markers))
    changed = make_run(stages__sft__training={"epochs": 5})
    acts = plan(changed, [child("sft", phase="Succeeded")], markers, status=st)
    assert "PyTorchJob/demo-sft-2" not in creates(acts)
    assert "PyTorchJob/demo-rewardmodel-1" in creates(acts)
    new = status_of(acts)
    assert stage(new, "sft")["phase"] == "Succeeded"
    c = cond(new, "SpecChangeNeedsNewRun")
    assert c["status"] == "True" and "sft" in c["message"]
    assert "_SUCCESS.json to rerun it" in stage(new, "sft")["message"]


def test_a_stale_marker_from_another_spec_is_not_taken_for_this_runs_result():
    old = make_run(stages__sft__training={"epochs": 9})
    acts = plan(make_run(), [], markers_for(old, "sft"))
    assert creates(acts) == ["PyTorchJob/demo-sft-1"]


def test_a_stage_reading_a_stage_that_reruns_runs_again_after_it():
    # `xwin run` after changing rejectionSampling's settings: its marker no longer matches, and
    # dpo's still matches the old rejectionSampling marker. dpo must wait and rerun, not count
    # as done on top of a model that is about to be replaced.
    old = make_run()
    changed = make_run(stages__rejectionSampling__training={"learningRate": 1.0e-6})
    markers = markers_for(old, "sft", "rewardModel", "bestOfN", "rejectionSampling", "dpo")
    st = status_of(plan(changed, [], markers))
    assert stage(st, "rejectionSampling")["phase"] == "Running"
    assert stage(st, "dpo")["phase"] == "Pending" and "rejectionSampling" in stage(st, "dpo")["message"]
    assert stage(st, "bestOfN")["phase"] == "Succeeded"
    # once rejectionSampling has its new marker, dpo's old one no longer matches: dpo runs
    new_rs = markers_for(changed, "sft", "rewardModel", "bestOfN", "rejectionSampling")["rejectionSampling"]
    rerun = {**markers, "rejectionSampling": new_rs}
    acts = plan(changed, [child("rejectionSampling", phase="Succeeded")], rerun, status=st)
    assert creates(acts) == ["PyTorchJob/demo-dpo-1"]


def test_children_of_a_stage_no_longer_run_are_deleted():
    run = make_run()
    st = status_of(plan(run, [child("sft")]))
    reused = make_run(stages__sft={"from": "s3://models/my-sft/"})
    acts = plan(reused, [child("sft")], status=st)
    assert DeleteChild("PyTorchJob", "demo-sft-1") in acts
    assert "PyTorchJob/demo-rewardmodel-1" in creates(acts)


def test_a_last_step_that_succeeded_without_a_marker_is_a_failure():
    run = make_run(retries={"maxAttempts": 1})
    st = status_of(plan(run, [child("sft", phase="Succeeded")]))
    assert st["phase"] == "Failed" and "_SUCCESS.json" in st["message"]


# --- names -----------------------------------------------------------------------------------


def test_child_names_are_deterministic_dns_labels():
    assert child_name("demo", "rewardModel", "train", 2) == "demo-rewardmodel-2"
    assert child_name("demo", "bestOfN", "serve", 1) == "demo-bestofn-serve-1"
    assert child_name("7b", "sft", "train", 1) == "x-7b-sft-1"  # Services/PyTorchJobs start with a letter
    long = child_name("a" * 63, "rejectionSampling", "train", 1)
    assert len(long) <= 52 and long == child_name("a" * 63, "rejectionSampling", "train", 1)
    assert long != child_name("a" * 63, "rejectionSampling", "train", 2)
    assert long[0].isalpha() and long.replace("-", "").isalnum() and long == long.lower()


# --- a whole run, level by level ---------------------------------------------------------------


def test_the_full_recipe_walks_every_stage_to_succeeded():
    text = (RUN.replace("pairs: {from: s3://data/pairs.jsonl}", "pairs: {prompts: s3://data/p.jsonl}")
            + "    evaluate: {models: [sft, dpo], mtBench: {questions: s3://eval/mt.jsonl}}\n")
    run = make_run(text)
    status, created, deleted = simulate(run, fail_once={"rewardModel", "bestOfN"})
    assert status["phase"] == "Succeeded"
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 7
    assert stage(status, "rewardModel")["attempts"] == 2
    assert ("PyTorchJob", "demo-rewardmodel-2") in created
    servers = {k for k in created if k[0] in ("Deployment", "Service")}
    assert servers == {(k, f"demo-{n}") for k in ("Deployment", "Service")
                       for n in ("pairs-serve-1", "bestofn-serve-1", "bestofn-serve-2",
                                 "evaluate-serve-sft-1", "evaluate-serve-dpo-1")}
    assert servers <= set(deleted), "a vLLM server outlived its sampler"
    assert created.index(("Job", "demo-evaluate-judge-1")) > created.index(("Job", "demo-evaluate-sample-dpo-1"))
