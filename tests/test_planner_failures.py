"""The planner when things go wrong or are held: failed attempts and their backoff, missing
inputs and Secrets, suspend and resume (the rest of the planner: test_planner.py)."""

from __future__ import annotations

import pytest

from xwin_operator.core.planner import input_uris, secret_refs
from xwin_operator.core.types import DeleteChild, EmitEvent, PatchStatus, RequeueAfter, SuspendChild

from plan_walk import T0, markers_for
from planner_helpers import RUN, child, cond, creates, make_run, manifests, of, plan, stage, status_of


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


def test_a_failure_seen_only_after_its_backoff_is_still_reported_once():
    """The operator was down while attempt 1 failed and its backoff ran out: the pass that
    finds it starts attempt 2 at once, and still says why attempt 1 failed."""
    run = make_run()
    running = plan(run, [child("sft")], now="2024-05-01T09:59:00Z")
    failed = child("sft", phase="Failed", reason="BackoffLimitExceeded", exit_code=1,
                   finished="2024-05-01T10:00:00Z")
    acts = plan(run, [failed], status=status_of(running), now="2024-05-01T10:05:00Z")
    assert creates(acts) == ["PyTorchJob/demo-sft-2"]
    events = [(e.reason, e.message) for e in of(acts, EmitEvent)]
    assert [r for r, _ in events] == ["StageAttemptFailed", "StageRetrying"]
    assert events[0][1].startswith("attempt 1 of stage sft failed (") and "exit code 1" in events[0][1]


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
    kids = [child("rewardModel", suspended=True, suspended_by_us=True), child("dpo", suspended=True, suspended_by_us=True)]
    acts = plan(resumed, kids, markers_for(resumed, "sft"), status=st)
    assert set(of(acts, SuspendChild)) == {SuspendChild("PyTorchJob", "demo-rewardmodel-1", False),
                                           SuspendChild("PyTorchJob", "demo-dpo-1", False)}
    assert status_of(acts)["phase"] == "Running"


def test_a_child_kueue_holds_is_never_resumed_and_the_stage_says_it_waits_for_quota():
    run = make_run()
    held = "waiting for quota in Kueue queue 'gpus': insufficient unused quota for nvidia.com/gpu (Workload w)"
    kids = [child("rewardModel", phase="Pending", suspended=True, held=held)]
    acts = plan(run, kids, markers_for(run, "sft"))
    assert of(acts, SuspendChild) == [] and creates(acts) == []
    st = status_of(acts)
    assert stage(st, "rewardModel")["reason"] == "WaitingForQuota" and held in stage(st, "rewardModel")["message"]
    assert cond(st, "Progressing")["status"] == "False" and cond(st, "Progressing")["reason"] == "WaitingForQuota"
    assert [e.reason for e in of(acts, EmitEvent)].count("WaitingForQuota") == 1
    again = plan(run, kids, markers_for(run, "sft"), status=st)   # the same cause: no second Event
    assert "WaitingForQuota" not in [e.reason for e in of(again, EmitEvent)]


def test_suspend_deletes_vllm_servers_and_resume_waits_for_a_new_one_before_the_sampler():
    run = make_run(suspend=True)
    markers = markers_for(run, "sft", "rewardModel")
    kids = [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service"),
            child("bestOfN", "sample", kind="Job")]
    acts = plan(run, kids, markers)
    assert DeleteChild("Deployment", "demo-bestofn-serve-1") in acts
    assert SuspendChild("Job", "demo-bestofn-sample-1") in acts

    kids = [child("bestOfN", "sample", kind="Job", suspended=True, suspended_by_us=True)]
    acts = plan(make_run(), kids, markers)
    assert {"Deployment/demo-bestofn-serve-1", "Service/demo-bestofn-serve-1"} <= set(creates(acts))
    assert of(acts, SuspendChild) == []
    kids += [child("bestOfN", "serve", kind="Deployment"), child("bestOfN", "serve", kind="Service")]
    assert of(plan(make_run(), kids, markers), SuspendChild) == [SuspendChild("Job", "demo-bestofn-sample-1", False)]
