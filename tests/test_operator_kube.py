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
        out["children"] = [o["metadata"]["name"] for o in await api.list_children(NS, "r")]
        await api.set_suspended("PyTorchJob", NS, "r-sft-2", True)
        out["secret"] = (await api.secret_exists(NS, "s"), await api.secret_exists(NS, "nope"))
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
    assert out["children"] == ["r-sft-2"]
    assert c.history("kubeflow.org/v1/pytorchjobs", NS, "r-sft-2")[-2]["spec"]["runPolicy"]["suspend"] is True
    assert out["secret"] == (True, False)
    assert out["deleted"] == (True, False)
    assert out["missing"] == (404, False)
    event = c.list("v1/events", NS)[0]
    assert event["involvedObject"]["name"] == "s" and event["reason"] == "Tested" and event["metadata"]["name"].startswith("s.")


def test_events_are_posted_in_order_per_object_without_an_event_loop(api_cluster, caplog):
    """KubeApi.post_events returns at once (no event loop needed), posts an object's Events in
    the order given across calls, and logs one that cannot be posted without losing the rest."""
    import time

    c = api_cluster
    api = KubeApi(lambda: login_from_dict(c.kubeconfig_doc(), MemFiles()), event_threads=4)
    runs = [{"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "name": f"r{i}", "namespace": NS,
             "uid": f"u{i}"} for i in range(3)]
    for i in range(15):
        for run in runs:
            api.post_events(run, [(f"R{i}", f"message {i}", "Normal")])
    api.post_events({**runs[0], "namespace": "no/where"}, [("Lost", "refused (404)", "Warning")])
    for run in runs:
        api.post_events(run, [("Last", "a", "Normal"), ("Final", "b", "Warning")])

    deadline = time.monotonic() + 20
    while len(c.list("v1/events", NS)) < 3 * 17 and time.monotonic() < deadline:
        time.sleep(0.05)
    events = sorted(c.list("v1/events", NS), key=lambda e: int(e["metadata"]["resourceVersion"]))
    for run in runs:
        mine = [e["reason"] for e in events if e["involvedObject"]["name"] == run["name"]]
        assert mine == [f"R{i}" for i in range(15)] + ["Last", "Final"]
    assert [e["type"] for e in events if e["reason"] == "Final"] == ["Warning"] * 3
    assert any("could not post Event Lost" in r.getMessage() and "[no/where/r0]" in r.getMessage() for r in caplog.records)
    asyncio.run(api.close())


def test_posting_events_never_waits_for_a_login_in_progress(api_cluster):
    """post_events runs on the event loop: it returns at once even while a worker thread holds
    the client's login lock (an exec plugin can take seconds), and the Event follows."""
    import threading
    import time

    c = api_cluster
    api = KubeApi(lambda: login_from_dict(c.kubeconfig_doc(), MemFiles()), event_threads=2)
    run = {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "name": "r", "namespace": NS, "uid": "u"}
    held, release = threading.Event(), threading.Event()

    def slow_login() -> None:
        with api._lock:  # what KubeApi._api_client holds while the login runs
            held.set()
            release.wait(10)

    threading.Thread(target=slow_login, daemon=True).start()
    held.wait(5)
    started = time.monotonic()
    api.post_events(run, [("Started", "while logging in", "Normal")])
    took = time.monotonic() - started
    release.set()
    deadline = time.monotonic() + 10
    while not c.list("v1/events", NS) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert took < 0.5
    assert [e["reason"] for e in c.list("v1/events", NS)] == ["Started"]
    asyncio.run(api.close())


def test_a_run_deleted_while_its_reconcile_waited_starts_nothing(tmp_path):
    """A reconcile that waited (the completion lane, while new runs arrive) for a run deleted
    meanwhile (its gate dropped by the DELETED event) creates no child and writes nothing."""
    import logging

    from xwin_operator.api.crd import crd
    from xwin_operator.core.config import OperatorConfig
    from xwin_operator.kube.reconciler import OperatorState, RunGate, reconcile
    from xwin_operator.kube.store_reader import StoreReader

    def run(name: str) -> dict:
        return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": NS},
                "spec": {"baseModel": f"file://{tmp_path}/base", "storage": {"uri": f"file://{tmp_path}/runs"},
                         "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}},
                         "stages": {"sft": {"data": f"file://{tmp_path}/sft.jsonl"}}}}

    with Cluster(namespaces=(NS,), crds=(crd(),)) as c:
        login = lambda: login_from_dict(c.kubeconfig_doc(), MemFiles())  # noqa: E731
        state = OperatorState(api=KubeApi(login), store=StoreReader(), config=OperatorConfig.from_env(), login=login)
        kept, gone = (RunGate(body=c.create("xwin.ai/v1alpha1/alignmentruns", run(n))) for n in ("kept", "gone"))
        state.gates[kept.body["metadata"]["uid"]] = kept  # `gone`'s gate was dropped by its DELETED event

        async def scenario() -> None:
            await reconcile(state, kept, logging.getLogger("test"))
            await reconcile(state, gone, logging.getLogger("test"))
            await state.api.close()

        c.call(scenario)
        children = [o["metadata"]["name"] for o in c.list("kubeflow.org/v1/pytorchjobs", NS)]
        statuses = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in c.list("xwin.ai/v1alpha1/alignmentruns", NS)}
    assert children == ["kept-sft-1"]
    assert statuses == {"kept": "Running", "gone": None}


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
