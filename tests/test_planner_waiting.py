"""The planner on a stage whose pods cannot run: the cause in the stage's status, a condition
and one Event; an attempt none of whose pods started within scheduling.pendingTimeoutSeconds
failed (stopped and kept as its record) and retried; the next attempt only once the failed
one's pods are gone."""

from __future__ import annotations

from xwin_operator.core.types import CreateChild, EmitEvent, FailChild

from plan_walk import markers_for
from planner_helpers import child, cond, creates, make_run, of, plan, stage, status_of

UNSCHEDULABLE = "pod demo-rewardmodel-1-master-0: unschedulable: 0/12 nodes are available: 12 Insufficient nvidia.com/gpu."
T_LATER = "2024-05-01T11:00:01Z"   # T0 + 3601 s: past the 3600 s default of a GPU step


def test_a_pod_that_cannot_be_scheduled_is_named_in_the_stage_a_condition_and_one_event():
    run = make_run()
    kids = [child("rewardModel", phase="Pending", cause="Unschedulable", cause_message=UNSCHEDULABLE,
                  waiting_since="2024-05-01T10:00:00Z")]
    acts = plan(run, kids, markers_for(run, "sft"), now="2024-05-01T10:10:00Z")
    st = status_of(acts)
    rm = stage(st, "rewardModel")
    assert rm["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in rm["message"]
    assert (cond(st, "Progressing")["status"], cond(st, "Progressing")["reason"]) == ("False", "Unschedulable")
    assert [e.type for e in of(acts, EmitEvent) if e.reason == "Unschedulable"] == ["Warning"]
    assert of(acts, FailChild) == []   # 10 minutes: within the default for a GPU step


def test_an_attempt_that_never_starts_fails_at_the_pending_timeout_and_is_retried():
    run = make_run()
    kids = [child("rewardModel", phase="Pending", cause="Unschedulable", cause_message=UNSCHEDULABLE,
                  waiting_since="2024-05-01T10:00:00Z")]
    acts = plan(run, kids, markers_for(run, "sft"), now=T_LATER)
    [stop] = of(acts, FailChild)
    assert (stop.kind, stop.name, stop.reason) == ("PyTorchJob", "demo-rewardmodel-1", "PendingTimeout")
    assert "3600s" in stop.message and "insufficient nvidia.com/gpu" in stop.message.lower()
    assert creates(acts) == []   # the backoff first; the child is stopped, not deleted (its record)
    st = status_of(acts)
    assert stage(st, "rewardModel")["phase"] == "Running" and "PendingTimeout" in stage(st, "rewardModel")["message"]
    assert any(e.reason == "StageAttemptFailed" and "PendingTimeout" in e.message for e in of(acts, EmitEvent))

    # the child now reads Failed (its annotation); its pods are gone: attempt 2 after the backoff
    failed = child("rewardModel", phase="Failed", reason="PendingTimeout", message=stop.message, finished=T_LATER)
    later = "2024-05-01T11:05:00Z"
    acts = plan(run, [failed], markers_for(run, "sft"), status=st, now=later)
    assert creates(acts) == ["PyTorchJob/demo-rewardmodel-2"]


def test_the_next_attempt_waits_until_the_failed_attempts_pods_are_gone():
    run = make_run()
    failed = child("rewardModel", phase="Failed", reason="PyTorchJobFailed", finished="2024-05-01T10:00:00Z",
                   live_pods=2)
    acts = plan(run, [failed], markers_for(run, "sft"), now="2024-05-01T10:30:00Z")
    assert creates(acts) == []
    assert "demo-rewardmodel-1" in stage(status_of(acts), "rewardModel")["message"]
    gone = child("rewardModel", phase="Failed", reason="PyTorchJobFailed", finished="2024-05-01T10:00:00Z")
    acts = plan(run, [gone], markers_for(run, "sft"), now="2024-05-01T10:30:00Z")
    assert creates(acts) == ["PyTorchJob/demo-rewardmodel-2"]


def test_the_pending_timeout_follows_the_spec_and_zero_waits_forever():
    kids = [child("rewardModel", phase="Pending", waiting_since="2024-05-01T10:00:00Z")]
    short = make_run(scheduling__pendingTimeoutSeconds=60)
    acts = plan(short, kids, markers_for(short, "sft"), now="2024-05-01T10:01:01Z")
    assert [a.name for a in of(acts, FailChild)] == ["demo-rewardmodel-1"]
    assert "no pod of it was created or started" in of(acts, FailChild)[0].message
    never = make_run(scheduling__pendingTimeoutSeconds=0)
    assert of(plan(never, kids, markers_for(never, "sft"), now="2024-06-01T10:00:00Z"), FailChild) == []


def test_time_held_by_kueue_or_a_suspended_run_does_not_count():
    run = make_run()
    held = [child("rewardModel", phase="Pending", suspended=True, held="waiting for quota in Kueue")]
    assert of(plan(run, held, markers_for(run, "sft"), now="2024-06-01T10:00:00Z"), FailChild) == []
    paused = make_run(suspend=True)
    kids = [child("rewardModel", phase="Pending", waiting_since="2024-05-01T10:00:00Z")]
    assert of(plan(paused, kids, markers_for(paused, "sft"), now="2024-06-01T10:00:00Z"), FailChild) == []


def test_a_cpu_step_has_the_shorter_default():
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel")
    kids = [child("bestOfN", "serve", kind="Deployment", phase="Running"),
            child("bestOfN", "serve", kind="Service"),
            child("bestOfN", "sample", kind="Job", phase="Running", waiting_since="2024-05-01T10:00:00Z")]
    acts = plan(run, kids, markers, now="2024-05-01T10:15:01Z")   # 901 s: past the 900 s default of a CPU step
    assert [a.name for a in of(acts, FailChild)] == ["demo-bestofn-sample-1"]
    assert not [a for a in acts if isinstance(a, CreateChild)]


def test_a_failed_server_deployment_whose_pod_restarts_is_stopped_and_kept_as_the_attempts_record():
    """Its pod would restart, hold its GPUs and bring the attempt back once the server answers."""
    run = make_run()
    markers = markers_for(run, "sft", "rewardModel")
    died = child("bestOfN", "serve", kind="Deployment", phase="Failed", reason="ServerKilled",
                 message="the vLLM server was killed by SIGKILL", finished="2024-05-01T10:00:00Z", live_pods=1)
    kids = [died, child("bestOfN", "serve", kind="Service"), child("bestOfN", "sample", kind="Job")]
    acts = plan(run, kids, markers, now="2024-05-01T10:00:01Z")
    [stop] = of(acts, FailChild)
    assert (stop.kind, stop.name, stop.reason) == ("Deployment", "demo-bestofn-serve-1", "ServerKilled")
    assert creates(acts) == []
    # stopped (marked failed: the annotation), its pod still terminating: not stopped twice
    stopping = child("bestOfN", "serve", kind="Deployment", phase="Failed", reason="ServerKilled",
                     finished="2024-05-01T10:00:00Z", live_pods=1, stopped=True)
    acts = plan(run, [stopping], markers, now="2024-05-01T10:05:00Z")
    assert of(acts, FailChild) == [] and creates(acts) == []
    # its pod gone: attempt 2
    gone = child("bestOfN", "serve", kind="Deployment", phase="Failed", reason="ServerKilled",
                 finished="2024-05-01T10:00:00Z", stopped=True)
    acts = plan(run, [gone], markers, now="2024-05-01T10:05:00Z")
    assert creates(acts) == ["Deployment/demo-bestofn-serve-2", "Service/demo-bestofn-serve-2"]
