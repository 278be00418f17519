"""The operator process against the fake API server, a test Kueue and Pod objects written as
the scheduler and kubelet write them: a child Kueue holds is never resumed by the operator
and the run says WaitingForQuota until it is admitted; an eviction by preemption is neither a
failure nor an attempt; a pod that cannot be scheduled is named in the stage, a condition and
one Event, its attempt fails at scheduling.pendingTimeoutSeconds, and the next attempt is
created only once the failed attempt's pods are gone; a Secret without the key is named."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from kube import Cluster, Kubelet, Outcome
from kube.fixtures import NS
from kube.harness import OperatorProcess, events_of, run_status, wait_phase, write_marker_for
from kube.kueue import TestKueue

from test_operator_handlers import condition, sft_run

holds: dict[str, asyncio.Event] = {}          # child name -> released when set
started: dict[str, int] = defaultdict(int)    # child name -> times the kubelet ran it


async def outcome(child: dict) -> Outcome:
    name = child["metadata"]["name"]
    started[name] += 1
    if name in holds:
        await holds[name].wait()
    await asyncio.to_thread(write_marker_for, child)
    return Outcome()


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    from xwin_operator.api.crd import crd

    work = tmp_path_factory.mktemp("operator-waiting")
    with Cluster(namespaces=(NS,), crds=(crd(),)) as cluster:
        kueue = TestKueue(cluster, NS).start()
        kubelet = Kubelet(cluster, work=work / "node", namespace=NS, instant=outcome).start()
        op = OperatorProcess(cluster, work / "operator", namespace=NS, interval=0.3,
                             env={**s3_server.env, "XWIN_BACKOFF_SECONDS": "0.5"}).start()
        from test_operator_handlers import ENDPOINT
        ENDPOINT[:] = [s3_server.endpoint_url]
        try:
            yield cluster, op, kueue, s3_server.make_bucket("waiting")
        finally:
            op.stop()
            kubelet.stop()
            kueue.stop()


def hold(cluster: Cluster, name: str) -> asyncio.Event:
    event = holds[name] = cluster.call(_event)
    return event


async def _event() -> asyncio.Event:
    return asyncio.Event()


def release(cluster: Cluster, name: str) -> None:
    async def run() -> None:
        holds[name].set()
    cluster.call(run)


def stage_of(cluster: Cluster, run: str, name: str = "sft") -> dict:
    return next((s for s in run_status(cluster, NS, run).get("stages") or [] if s["name"] == name), {})


def reasons(cluster: Cluster, run: str) -> list[str]:
    return [e["reason"] for e in events_of(cluster, NS, run)]


def pod_of(child: str, labels: dict, status: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{child}-master-0", "namespace": NS, "labels": labels}, "spec": {
                "containers": [{"name": "pytorch", "image": "ghcr.io/xwin-align/xwin-trainer:0.1.0"}]},
            "status": status}


def write_pod(cluster: Cluster, child: dict, status: dict) -> str:
    meta = child["metadata"]
    labels = {k: v for k, v in meta["labels"].items() if k.startswith("xwin.ai/") or k.startswith("app.kubernetes.io/")}
    body = pod_of(meta["name"], labels, {})
    cluster.create("v1/pods", body)
    cluster.patch("v1/pods", NS, body["metadata"]["name"], {"status": status}, subresource="status")
    return body["metadata"]["name"]


def the_child(cluster: Cluster, run: str, attempt: int = 1) -> dict:
    return cluster.wait_for(lambda: next((j for j in cluster.list("kubeflow.org/v1/pytorchjobs", NS,
                                                                  labels=f"xwin.ai/run={run}")
                                          if j["metadata"]["labels"]["xwin.ai/attempt"] == str(attempt)), None),
                            timeout=20, what=f"attempt {attempt} of {run}")


def test_kueue_holds_a_child_the_operator_never_resumes_and_an_eviction_is_not_a_failure(env):
    cluster, op, kueue, bucket = env
    run = sft_run("queued", bucket, scheduling={"queueName": "gpus"})
    cluster.create("xwin.ai/v1alpha1/alignmentruns", run)
    child = the_child(cluster, "queued")["metadata"]["name"]
    hold(cluster, child)   # created suspended (Kueue's webhook): not started before this
    cluster.wait_for(lambda: stage_of(cluster, "queued").get("reason") == "WaitingForQuota"
                     and "8 more needed" in stage_of(cluster, "queued").get("message", ""), timeout=20,
                     what="the stage to wait for quota, with Kueue's message")
    status = run_status(cluster, NS, "queued")
    progressing = condition(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "WaitingForQuota")
    assert "8 more needed" in progressing["message"] and kueue.workload_of(child) in progressing["message"]
    assert "8 more needed" in stage_of(cluster, "queued")["message"]
    time.sleep(3)   # several resyncs (interval 0.3 s; 3 s while waiting on a child)
    assert set(kueue.suspends(child)) == {True}, "the operator resumed a child Kueue holds"
    assert started[child] == 0
    assert reasons(cluster, "queued").count("WaitingForQuota") == 1

    kueue.admit(child)
    cluster.wait_for(lambda: started[child] == 1, timeout=20, what="the admitted child to run")
    cluster.wait_for(lambda: "Progressing" not in [c["type"] for c in run_status(cluster, NS, "queued")["conditions"]],
                     timeout=20, what="the run to stop waiting")
    kueue.evict(child)   # preempted while it runs: suspended by Kueue again
    cluster.wait_for(lambda: stage_of(cluster, "queued").get("reason") == "WaitingForQuota", timeout=20,
                     what="the evicted stage to wait for quota again")
    assert "evicted" in stage_of(cluster, "queued")["message"] and "Preempted" in stage_of(cluster, "queued")["message"]
    kueue.admit(child)
    release(cluster, child)
    status = wait_phase(cluster, NS, "queued", timeout=60, operator=op)
    assert stage_of(cluster, "queued")["attempts"] == 1, "an eviction counted as an attempt"
    assert "StageAttemptFailed" not in reasons(cluster, "queued")
    assert status["phase"] == "Succeeded"


def test_an_unschedulable_attempt_is_named_times_out_and_the_next_waits_for_its_pods_to_go(env):
    cluster, op, kueue, bucket = env
    run = sft_run("stuck", bucket, scheduling={"pendingTimeoutSeconds": 4})
    hold(cluster, "stuck-sft-1")   # its pod never starts
    cluster.create("xwin.ai/v1alpha1/alignmentruns", run)
    first = the_child(cluster, "stuck")
    unschedulable = {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes are available"}]}
    pod = write_pod(cluster, first, unschedulable)
    cluster.wait_for(lambda: stage_of(cluster, "stuck").get("reason") == "Unschedulable", timeout=20,
                     what="the stage to name the unschedulable pod")
    assert "Insufficient nvidia.com/gpu" in stage_of(cluster, "stuck")["message"] and pod in stage_of(cluster, "stuck")["message"]
    assert condition(run_status(cluster, NS, "stuck"), "Progressing")["reason"] == "Unschedulable"

    stopped = cluster.wait_for(lambda: (cluster.get("kubeflow.org/v1/pytorchjobs", NS, first["metadata"]["name"])
                                        or {}).get("metadata", {}).get("annotations", {}).get("xwin.ai/failed"),
                               timeout=20, what="attempt 1 to be stopped at the pending timeout")
    assert "PendingTimeout" in stopped and "Insufficient nvidia.com/gpu" in stopped
    job = cluster.get("kubeflow.org/v1/pytorchjobs", NS, first["metadata"]["name"])
    assert job["spec"]["runPolicy"]["suspend"] is True
    time.sleep(2)   # past the 0.5 s backoff: the pod still exists, so no attempt 2 yet
    assert not [j for j in cluster.list("kubeflow.org/v1/pytorchjobs", NS, labels="xwin.ai/run=stuck")
                if j["metadata"]["labels"]["xwin.ai/attempt"] == "2"]
    assert "starts once its pods are gone" in stage_of(cluster, "stuck")["message"]
    cluster.delete("v1/pods", NS, pod)   # what the Training Operator does to a suspended job's pods
    the_child(cluster, "stuck", attempt=2)
    status = wait_phase(cluster, NS, "stuck", timeout=60, operator=op)
    assert status["phase"] == "Succeeded" and stage_of(cluster, "stuck")["attempts"] == 2
    events = events_of(cluster, NS, "stuck")
    assert [e["reason"] for e in events].count("Unschedulable") == 1
    assert any(e["reason"] == "StageAttemptFailed" and "PendingTimeout" in e["message"] for e in events)


def test_a_secret_without_the_key_is_named_in_the_stage(env):
    cluster, op, kueue, bucket = env
    hold(cluster, "nokey-sft-1")
    cluster.create("xwin.ai/v1alpha1/alignmentruns", sft_run("nokey", bucket))
    child = the_child(cluster, "nokey")
    write_pod(cluster, child, {"phase": "Pending", "containerStatuses": [{
        "name": "pytorch", "image": "ghcr.io/xwin-align/xwin-trainer:0.1.0", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "CreateContainerConfigError",
                              "message": "couldn't find key AWS_SECRET_ACCESS_KEY in Secret demo/s3-creds"}}}]})
    cluster.wait_for(lambda: stage_of(cluster, "nokey").get("reason") == "CreateContainerConfigError", timeout=20,
                     what="the stage to name the Secret and key")
    assert "AWS_SECRET_ACCESS_KEY in Secret demo/s3-creds" in stage_of(cluster, "nokey")["message"]
    cluster.wait_for(lambda: "CreateContainerConfigError" in reasons(cluster, "nokey"), timeout=10, what="its Event")
    time.sleep(1)   # more reconciles: still one Event for the one cause
    assert reasons(cluster, "nokey").count("CreateContainerConfigError") == 1
    release(cluster, child["metadata"]["name"])
