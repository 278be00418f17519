"""The planner as a pure function: what `decide` asks for, for the situations an operator meets
(failures, retries, Secrets and suspend: test_planner_failures.py).

Each test builds the observed world (children by label, markers from the store) by hand and
checks the actions and the status a user would see with `kubectl get ar -o yaml`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from xwin_operator.core.children import child_name
from xwin_operator.core.types import DeleteChild, EmitEvent, PatchStatus, SuspendChild

from plan_walk import T0, markers_for, simulate
from planner_helpers import RUN, child, cond, creates, make_run, manifests, of, plan, stage, status_of


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
