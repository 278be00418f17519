"""What a child's pods and Kueue Workload say (kube/pod_status.py), on bodies shaped as the
scheduler, the kubelet and Kueue write them."""

from __future__ import annotations

from xwin_operator.core.types import ChildState
from xwin_operator.kube.pod_status import pod_cause, with_pods, workload_state

T0, T1, T2 = "2024-05-01T10:00:00Z", "2024-05-01T10:05:00Z", "2024-05-01T10:09:00Z"


def pod(name="r-sft-1-master-0", phase="Pending", created=T1, containers=(), init=(), conditions=(), limits=None):
    spec = {"containers": [{"name": "pytorch", "resources": {"limits": limits or {}}}]}
    return {"metadata": {"name": name, "creationTimestamp": created},
            "spec": spec, "status": {"phase": phase, "conditions": list(conditions),
                                     "containerStatuses": list(containers), "initContainerStatuses": list(init)}}


def waiting(reason, message="", name="pytorch", image="ghcr.io/xwin-align/xwin-trainer:0.1.0", **kw):
    return {"name": name, "image": image, "state": {"waiting": {"reason": reason, "message": message}}, **kw}


def child(**kw) -> ChildState:
    return ChildState(**{"kind": "PyTorchJob", "name": "r-sft-1", "stage": "sft", "step": "train", "attempt": 1,
                         "phase": "Pending", "created": T0, **kw})


def test_each_cause_is_named_as_kubernetes_names_it():
    unsched = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."}])
    assert pod_cause(unsched) == ("Unschedulable", "pod r-sft-1-master-0: unschedulable: 0/12 nodes are available: "
                                                   "12 Insufficient nvidia.com/gpu.")
    pull = pod(containers=[waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/y:bad"', image="ghcr.io/x/y:bad")])
    reason, message = pod_cause(pull)
    assert reason == "ImagePullBackOff" and "ghcr.io/x/y:bad" in message
    config = pod(containers=[waiting("CreateContainerConfigError", "couldn't find key OPENAI_API_KEY in Secret team/judge")])
    assert pod_cause(config) == ("CreateContainerConfigError", "pod r-sft-1-master-0: container pytorch: couldn't find "
                                                               "key OPENAI_API_KEY in Secret team/judge")
    crash = pod(phase="Running", containers=[waiting("CrashLoopBackOff", "back-off 5m0s", restartCount=4,
                                                     lastState={"terminated": {"exitCode": 1, "reason": "Error"}})])
    reason, message = pod_cause(crash)
    assert reason == "CrashLoopBackOff" and "4 restarts" in message and "exit code 1" in message
    oom = pod(phase="Running", limits={"memory": "200Gi"}, containers=[waiting(
        "CrashLoopBackOff", restartCount=1, lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})])
    reason, message = pod_cause(oom)
    assert reason == "OOMKilled" and "200Gi" in message and "resources.memory" in message
    assert pod_cause(pod(phase="Running", containers=[{"name": "pytorch", "state": {"running": {}}}])) is None


def test_the_pending_clock_runs_only_while_a_pod_has_not_started():
    assert with_pods(child(), []).waiting_since == T0                    # no pod yet: since the child was created
    assert with_pods(child(), [pod(created=T1)]).waiting_since == T1      # its pod created later
    started = pod(phase="Running", containers=[{"name": "pytorch", "state": {"running": {}}}])
    assert with_pods(child(phase="Running"), [started]).waiting_since is None
    downloading = pod(init=[{"name": "fetch-model", "state": {"running": {"startedAt": T1}}}])
    assert with_pods(child(kind="Deployment"), [downloading]).waiting_since is None  # an init container runs
    assert with_pods(child(resumed=T2), [pod(created=T1)]).waiting_since == T2        # resumed after a suspend
    replaced = [started, pod(name="r-sft-1-worker-0", created=T2)]
    assert with_pods(child(phase="Running"), replaced).waiting_since == T2            # a replaced pod's own clock


def test_a_child_kueue_holds_shows_its_workload_and_runs_no_clock():
    workload = {"metadata": {"name": "pytorchjob-r-sft-1-3b2a1"},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                           "message": "couldn't assign flavors to pod set master: insufficient unused "
                                                      "quota for nvidia.com/gpu in flavor h100, 8 more needed"}]}}
    c = with_pods(child(suspended=True), [], workload, queue="gpus")
    assert c.waiting_since is None
    assert "Kueue queue 'gpus'" in c.held and "8 more needed" in c.held and "pytorchjob-r-sft-1-3b2a1" in c.held
    assert with_pods(child(suspended=True, suspended_by_us=True), []).held == ""   # the operator's own suspension
    evicted = {"metadata": {"name": "w"}, "status": {"conditions": [
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a higher priority Workload"}]}}
    assert "evicted" in workload_state(evicted, "gpus") and "Preempted" in workload_state(evicted, "gpus")
    admitted = {"metadata": {"name": "w"}, "status": {"conditions": [
        {"type": "Admitted", "status": "True", "lastTransitionTime": T2}]}}
    assert with_pods(child(), [pod(created=T1)], admitted).waiting_since == T2   # the clock starts at admission


def test_pods_still_alive_are_counted_and_finished_ones_are_not():
    alive = [pod(phase="Running"), pod(name="b", phase="Pending")]
    gone = [pod(phase="Failed"), {**pod(name="c", phase="Running"),
                                  "metadata": {"name": "c", "deletionTimestamp": T2}}]
    assert with_pods(child(phase="Failed"), alive + gone).live_pods == 2
