"""The operator's I/O layer (kube.KubeApi) against the fake API server, and the pure mapping of
child objects and run bodies to what the planner sees (observe.child_state, run_body.parse_run)."""

from __future__ import annotations

import asyncio

import pytest

from kube import Cluster
from xwin_operator.kube.client import ApiError, KubeApi
from xwin_operator.kube.kubeconfig import MemFiles, login_from_dict
from xwin_operator.kube.observe import child_state
from xwin_operator.kube.run_body import parse_run
from xwin_operator.core.types import EmitEvent, PatchStatus

NS = "demo"
LABELS = {"xwin.ai/run": "r", "xwin.ai/stage": "sft", "xwin.ai/step": "train", "xwin.ai/attempt": "2",
          "app.kubernetes.io/managed-by": "xwin-operator"}


def cond(type_: str, status: str = "True", **kw) -> dict:
    return {"type": type_, "status": status, **kw}


def pytorchjob(name: str = "r-sft-2", labels: dict | None = None, **status) -> dict:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": NS, "labels": labels or LABELS,
                         "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"runPolicy": {"suspend": False}}, "status": status}


@pytest.mark.parametrize("body, phase, reason", [
    (pytorchjob(), "Pending", ""),
    (pytorchjob(conditions=[cond("Created"), cond("Running")]), "Running", ""),
    (pytorchjob(conditions=[cond("Created"), cond("Running", "False"), cond("Succeeded", reason="PyTorchJobSucceeded")]),
     "Succeeded", "PyTorchJobSucceeded"),
    (pytorchjob(conditions=[cond("Failed", reason="PyTorchJobFailed", message="1 Master replica(s) failed")]),
     "Failed", "PyTorchJobFailed"),
    ({**pytorchjob(), "kind": "Job", "status": {"active": 1}}, "Running", ""),
    ({**pytorchjob(), "kind": "Job", "status": {"succeeded": 1, "completionTime": "2024-01-01T00:01:00Z"}}, "Succeeded", ""),
    ({**pytorchjob(), "kind": "Job", "status": {"conditions": [cond(
        "Failed", reason="PodFailurePolicy", message="Container main for pod demo/x failed with exit code 2 matching FailJob rule at index 0")]}},
     "Failed", "PodFailurePolicy"),
    ({**pytorchjob(), "kind": "Deployment", "status": {"availableReplicas": 1}}, "Running", ""),
    ({**pytorchjob(), "kind": "Deployment", "status": {"conditions": [cond("Progressing", "False", reason="ProgressDeadlineExceeded")]}},
     "Failed", "ProgressDeadlineExceeded"),
    ({**pytorchjob(), "kind": "Service", "status": {}}, "Running", ""),
])
def test_child_state_reads_what_each_controller_writes(body, phase, reason):
    state = child_state(body)
    assert (state.phase, state.reason) == (phase, reason)
    assert (state.stage, state.step, state.attempt, state.created) == ("sft", "train", 2, "2024-01-01T00:00:00Z")
    if reason == "PodFailurePolicy":
        assert state.exit_code == 2


def test_objects_without_stage_labels_are_not_children():
    assert child_state(pytorchjob(labels={"app": "x"})) is None


def test_a_spec_the_model_rejects_becomes_one_failed_status_and_one_event():
    body = {"apiVersion": "xwin.ai/v1alpha1", "metadata": {"name": "r", "namespace": NS},
            "spec": {"baseModel": "s3://b/m", "storage": {"uri": "s3://b/runs"}, "stages": {"sft": {}}}}
    run, actions = parse_run(body, None, 3, "2024-01-01T00:00:00Z")
    assert run is None and isinstance(actions[0], PatchStatus) and isinstance(actions[1], EmitEvent)
    status = actions[0].status
    assert status["phase"] == "Failed" and status["observedGeneration"] == 3
    assert "spec.stages.sft.data" in status["message"]
    # reported once: the same problem again changes nothing
    assert parse_run(body, status, 3, "2024-01-01T00:05:00Z") == (None, [])


def test_stages_that_read_each_other_in_a_cycle_fail_the_run_not_the_operator():
    """No CEL rule sees a cycle (pairs.policy: dpo, dpo.pairsFrom: pairs): the operator names it."""
    body = {"apiVersion": "xwin.ai/v1alpha1", "metadata": {"name": "r", "namespace": NS},
            "spec": {"baseModel": "s3://b/m", "storage": {"uri": "s3://b/runs"}, "judge": {},
                     "stages": {"sft": {"data": "s3://b/sft.jsonl"}, "pairs": {"prompts": "s3://b/p", "policy": "dpo"},
                                "rewardModel": {}, "dpo": {"init": "sft", "pairsFrom": "pairs"}}}}
    run, actions = parse_run(body, None, 1, "2024-01-01T00:00:00Z")
    assert run is None and actions[0].status["phase"] == "Failed"
    assert "spec.stages: stages read from each other in a cycle: pairs → dpo → pairs" in actions[0].status["message"]
    assert actions[1].reason == "InvalidSpec"


@pytest.fixture
def api_cluster():
    with Cluster(namespaces=(NS,)) as c:
        yield c


def test_kube_api_calls_against_the_api_server(api_cluster):
    c = api_cluster
    api = KubeApi(lambda: login_from_dict(c.kubeconfig_doc(), MemFiles()))
    c.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NS},
                            "data": {"k": "c2VjcmV0"}})
    other = {**pytorchjob("other"), "metadata": {"name": "other", "namespace": NS, "labels": {**LABELS, "xwin.ai/run": "x"}}}

    async def scenario() -> dict:
        out: dict = {}
        out["created"] = await api.create(pytorchjob())
        out["again"] = await api.create(pytorchjob())       # 409: already there
        await api.create(other)
        await api.set_suspended("PyTorchJob", NS, "r-sft-2", True)
        out["secret"] = (await api.secret_exists(NS, "s"), await api.secret_exists(NS, "nope"))
        out["read"] = (await api.read_secret(NS, "s"))[1], await api.read_secret(NS, "nope")
        await api.post_event({"apiVersion": "v1", "kind": "Secret", "name": "s", "namespace": NS, "uid": "u"},
                             "Tested", "hello", "Normal")
        out["deleted"] = (await api.delete("PyTorchJob", NS, "r-sft-2"), await api.delete("PyTorchJob", NS, "r-sft-2"))
        try:
            await api.patch_status(NS, "missing", {"phase": "Running"})
        except ApiError as e:
            out["missing"] = (e.status, e.transient)
        await api.close()
        return out

    out = c.call(scenario)
    assert out["created"] is True and out["again"] is False
    assert c.history("kubeflow.org/v1/pytorchjobs", NS, "r-sft-2")[-2]["spec"]["runPolicy"]["suspend"] is True
    assert out["secret"] == (True, False) and out["read"] == ({"k": "secret"}, None)
    assert out["deleted"] == (True, False)
    assert out["missing"] == (404, False)
    event = c.list("v1/events", NS)[0]
    assert event["involvedObject"]["name"] == "s" and event["reason"] == "Tested" and event["metadata"]["name"].startswith("s.")


def test_events_are_posted_in_order_and_one_refused_is_logged_not_lost(api_cluster, caplog):
    """KubeApi.post_events posts an object's Events in the order given; one the API server
    refuses is logged, and the ones after it still go."""
    c = api_cluster
    api = KubeApi(lambda: login_from_dict(c.kubeconfig_doc(), MemFiles()))
    run = {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "name": "r0", "namespace": NS, "uid": "u0"}

    async def scenario() -> None:
        await api.post_events(run, [(f"R{i}", f"message {i}", "Normal") for i in range(5)])
        await api.post_events({**run, "namespace": "no/where"}, [("Lost", "refused (404)", "Warning")])
        await api.post_events(run, [("Last", "a", "Normal"), ("Final", "b", "Warning")])
        await api.close()

    c.call(scenario)
    events = sorted(c.list("v1/events", NS), key=lambda e: int(e["metadata"]["resourceVersion"]))
    assert [e["reason"] for e in events] == [f"R{i}" for i in range(5)] + ["Last", "Final"]
    assert any("could not post Event Lost" in r.getMessage() and "[no/where/r0]" in r.getMessage() for r in caplog.records)


def test_unreachable_api_is_a_transient_error():
    from kube.pods import free_port

    doc = {"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
           "clusters": [{"name": "x", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
           "users": [{"name": "x", "user": {}}]}
    api = KubeApi(lambda: login_from_dict(doc, MemFiles()), timeout=2)

    async def call() -> ApiError:
        try:
            await api.secret_exists(NS, "s")
        except ApiError as e:
            return e
        finally:
            await api.close()
    error = asyncio.run(call())
    assert error.status == 0 and error.transient
