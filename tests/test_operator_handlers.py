"""The operator's handlers through the fake API server: one real operator process for the module,
one AlignmentRun per test, children completed by the test kubelet as each test says.

Retries with backoff, giving up with a message naming the stage, the child and its reason; a
run waiting on its child is not reconciled again every interval, only by the slow safety resync;
suspend and resume; a missing Secret that heals; a spec the schema lets through but the spec
model rejects; an input URI that does not exist; a finished stage whose spec changes; deleting
a run removes its children (owner references) and keeps its artifacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import base64
import json
from collections import defaultdict
from typing import Callable

import pytest

from kube import Cluster, Kubelet, Outcome
from kube.fixtures import NS, tiny_run
from kube.harness import (RUNS, OperatorProcess, created_names, events_of, run_status, versions_of, wait_phase,
                          write_marker_for)

BASE = tiny_run(storage={"uri": "file:///unused"})["spec"]["baseModel"]
SFT_DATA = tiny_run(storage={"uri": "file:///unused"})["spec"]["stages"]["sft"]["data"]

# run name -> (child -> Outcome) for the kubelet; default: succeed and write the marker
behaviours: dict[str, Callable] = {}
attempts_seen: dict[str, int] = defaultdict(int)
ENDPOINT: list[str] = []


async def outcome(child: dict) -> Outcome:
    run = child["metadata"]["labels"]["xwin.ai/run"]
    attempts_seen[child["metadata"]["name"]] += 1
    behaviour = behaviours.get(run)
    result = await behaviour(child) if behaviour else None
    if result is not None:
        return result
    await asyncio.to_thread(write_marker_for, child)
    return Outcome()


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    from xwin_operator.api.crd import crd

    work = tmp_path_factory.mktemp("operator-handlers")
    with Cluster(namespaces=(NS,), crds=(crd(),)) as cluster:
        kubelet = Kubelet(cluster, work=work / "node", namespace=NS, instant=outcome).start()
        op = OperatorProcess(cluster, work / "operator", namespace=NS, interval=0.3,
                             env={**s3_server.env, "XWIN_BACKOFF_SECONDS": "0.5"}).start()
        bucket = s3_server.make_bucket("handlers")
        ENDPOINT[:] = [s3_server.endpoint_url]
        try:
            yield cluster, op, bucket
        finally:
            op.stop()
            kubelet.stop()


def sft_run(name: str, bucket: str, **spec) -> dict:
    """A one-stage run (sft only) storing on S3."""
    run = {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": NS},
           "spec": {"baseModel": BASE, "storage": {"uri": f"{bucket}/runs", "endpoint": ENDPOINT[0]},
                    "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}},
                    "stages": {"sft": {"data": SFT_DATA}}}}
    run["spec"].update(spec)
    return run


@contextlib.contextmanager
def crd_without_cel_rules(cluster):
    """The API server validating AlignmentRuns with a CRD whose CEL rules are removed."""
    crds = cluster.api.crds
    original = crds[RUNS]
    stripped = json.loads(json.dumps(original))
    stripped["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].pop(
        "x-kubernetes-validations", None)
    crds[RUNS] = stripped
    try:
        yield
    finally:
        crds[RUNS] = original


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def held_until_released(run: str) -> asyncio.Event:
    """The test kubelet keeps `run`'s children running until the returned event is set."""
    release = asyncio.Event()

    async def hold(child):
        await release.wait()
        return None
    behaviours[run] = hold
    return release


def children_of(cluster, run: str) -> list[dict]:
    return cluster.list("kubeflow.org/v1/pytorchjobs", NS, labels=f"xwin.ai/run={run}")


def test_a_run_waiting_on_its_child_is_left_to_the_childs_events_and_a_slow_safety_resync(env):
    """Its stage's marker written while the child still runs is something only a reconcile sees:
    not within several intervals (0.3 s; the child's event is what wakes the run), but by the
    safety resync (10 intervals), which heals a missed event."""
    cluster, op, bucket = env
    release = held_until_released("waiting")
    cluster.create(RUNS, sft_run("waiting", bucket))
    job = cluster.wait_for(lambda: children_of(cluster, "waiting"), timeout=20, what="the sft child")[0]
    cluster.wait_for(lambda: run_status(cluster, NS, "waiting").get("phase") == "Running", timeout=10,
                     what="the run Running")
    write_marker_for(job)
    written = time.monotonic()
    time.sleep(1.5)  # five intervals: no reconcile came back to it
    assert run_status(cluster, NS, "waiting")["phase"] == "Running"
    wait_phase(cluster, NS, "waiting", timeout=20, operator=op)  # the safety resync (3 s) saw the marker
    assert 1.5 <= time.monotonic() - written < 15
    cluster.call(lambda: _set(release))


def test_a_failed_child_is_retried_as_a_new_attempt(env):
    cluster, op, bucket = env

    async def fail_first(child):
        return Outcome("Failed", 1) if child["metadata"]["labels"]["xwin.ai/attempt"] == "1" else None
    behaviours["retry"] = fail_first
    cluster.create(RUNS, sft_run("retry", bucket))
    status = wait_phase(cluster, NS, "retry", timeout=30, operator=op)
    sft = status["stages"][0]
    assert sft["attempts"] == 2 and sft["phase"] == "Succeeded"
    assert [n for _, n in created_names(cluster, NS) if n.startswith("retry-")] == ["retry-sft-1", "retry-sft-2"]
    # Events follow the status patch they tell about: wait for the last one
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "retry")),
                     timeout=10, what="the RunSucceeded Event")
    reasons = [e["reason"] for e in events_of(cluster, NS, "retry")]
    assert "StageRetrying" in reasons and reasons[-1] == "RunSucceeded"


def test_a_run_is_written_once_per_transition_and_kopfs_finalizer_is_gone_once_it_finished(env):
    """Its status once per transition; kopf's finalizer (which its daemon needs) added once and
    removed once it finished, so deleting a finished run never waits for the operator."""
    cluster, op, bucket = env
    cluster.create(RUNS, sft_run("lean", bucket))
    wait_phase(cluster, NS, "lean", timeout=30, operator=op)
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "lean")),
                     timeout=10, what="the RunSucceeded Event")
    cluster.wait_for(lambda: not versions_of(cluster, RUNS, NS, "lean")[-1]["metadata"].get("finalizers"),
                     timeout=10, what="kopf's finalizer to go")
    time.sleep(1.0)  # several resyncs (0.3 s) and the child's echoes: nothing writes to it again
    versions = versions_of(cluster, RUNS, NS, "lean")
    phases = [(v.get("status") or {}).get("phase") for v in versions]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == [None, "Running", "Succeeded"]
    finalizers = [bool(v["metadata"].get("finalizers")) for v in versions]
    assert finalizers.count(True) >= 1 and len(versions) == 5   # create, finalizer, Running, Succeeded, finalizer gone
    meta = versions[-1]["metadata"]
    assert not meta.get("finalizers") and not [a for a in meta.get("annotations") or {} if a.startswith("xwin.ai/")]
    assert [e["reason"] for e in events_of(cluster, NS, "lean")] == ["StageStarted", "StageSucceeded", "RunSucceeded"]
    assert run_status(cluster, NS, "lean")["stages"][0]["children"] == ["PyTorchJob/lean-sft-1"]


def test_a_stage_failing_every_attempt_fails_the_run_naming_stage_child_and_reason(env):
    cluster, op, bucket = env

    async def always_fail(child):
        return Outcome("Failed", 1)
    behaviours["doomed"] = always_fail
    cluster.create(RUNS, sft_run("doomed", bucket, retries={"maxAttempts": 2}))
    status = wait_phase(cluster, NS, "doomed", phases=("Failed",), timeout=30, operator=op)
    assert status["stage"] == "sft" and status["stages"][0]["attempts"] == 2
    assert "sft" in status["message"] and "PyTorchJob/doomed-sft-2" in status["message"]
    assert "PyTorchJobFailed" in status["message"]
    assert condition(status, "Succeeded")["reason"] == "StageFailed"
    cluster.wait_for(lambda: any(e["reason"] == "RunFailed" for e in events_of(cluster, NS, "doomed")),
                     timeout=10, what="the RunFailed Event")  # Events are posted in the background
    assert [e["reason"] for e in events_of(cluster, NS, "doomed")][-1] == "RunFailed"
    assert attempts_seen["doomed-sft-3"] == 0


def test_suspend_stops_the_running_child_and_resume_finishes(env):
    cluster, op, bucket = env
    release = held_until_released("paused")
    cluster.create(RUNS, sft_run("paused", bucket))
    cluster.wait_for(lambda: children_of(cluster, "paused"), timeout=20, what="the sft child")
    cluster.patch(RUNS, NS, "paused", {"spec": {"suspend": True}})
    status = wait_phase(cluster, NS, "paused", phases=("Suspended",), timeout=20, operator=op)
    assert condition(status, "Suspended")["status"] == "True"
    job = cluster.wait_for(lambda: [j for j in children_of(cluster, "paused") if j["spec"]["runPolicy"]["suspend"]],
                           timeout=10, what="the child to be suspended")[0]
    cluster.wait_for(lambda: any(c["type"] == "Suspended" and c["status"] == "True" for c in
                                 (cluster.get("kubeflow.org/v1/pytorchjobs", NS, job["metadata"]["name"])["status"]["conditions"])),
                     timeout=10, what="the kubelet to stop it")
    cluster.call(lambda: _set(release))
    cluster.patch(RUNS, NS, "paused", {"spec": {"suspend": False}})
    status = wait_phase(cluster, NS, "paused", timeout=30, operator=op)
    assert status["stages"][0]["attempts"] == 1
    assert [n for _, n in created_names(cluster, NS) if n.startswith("paused-")] == ["paused-sft-1"]
    assert attempts_seen["paused-sft-1"] == 2  # started, suspended, started again


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_a_missing_secret_waits_with_a_reason_then_heals(env):
    cluster, op, bucket = env
    run = sft_run("nosecret", bucket)
    run["spec"]["storage"]["secretRef"] = "late-credentials"
    cluster.create(RUNS, run)
    status = cluster.wait_for(lambda: (lambda s: s if condition(s, "SecretsReady").get("status") == "False" else None)(
        run_status(cluster, NS, "nosecret")), timeout=20, what="SecretsReady=False")
    assert status["phase"] != "Failed"
    assert "spec.storage.secretRef" in condition(status, "SecretsReady")["message"]
    assert "late-credentials" in condition(status, "SecretsReady")["message"]
    assert not children_of(cluster, "nosecret")
    assert status["phase"] == "Pending"
    time.sleep(1.0)  # several resyncs: still one Warning Event, naming the field and the Secret
    warnings = [e for e in events_of(cluster, NS, "nosecret") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["SecretNotFound"]
    assert "spec.storage.secretRef" in warnings[0]["message"] and "late-credentials" in warnings[0]["message"]
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": "late-credentials", "namespace": NS},
                                  "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"testing").decode(),
                                           "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"testing").decode()}})
    status = wait_phase(cluster, NS, "nosecret", timeout=30, operator=op)
    assert condition(status, "SecretsReady")["status"] == "True"


def test_an_unreachable_store_is_a_visible_wait_that_heals(env, s3_server):
    """With the S3 endpoint down the run is not left blank: Pending, a Progressing=False
    condition naming the endpoint, one Warning Event however many resyncs; fixed, it runs."""
    from kube.pods import free_port

    cluster, op, bucket = env
    dead = f"http://127.0.0.1:{free_port()}"
    run = sft_run("nostore", bucket)
    run["spec"]["storage"]["endpoint"] = dead
    cluster.create(RUNS, run)
    status = cluster.wait_for(lambda: (lambda s: s if condition(s, "Progressing") else None)(
        run_status(cluster, NS, "nostore")), timeout=30, what="a Progressing condition")
    cond = condition(status, "Progressing")
    assert status["phase"] == "Pending"
    assert (cond["status"], cond["reason"]) == ("False", "StoreUnreachable")
    assert dead in cond["message"] and "spec.storage.endpoint" in cond["message"]
    time.sleep(1.5)  # several resyncs (0.3 s apart)
    warnings = [e for e in events_of(cluster, NS, "nostore") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["StoreUnreachable"]
    cluster.patch(RUNS, NS, "nostore", {"spec": {"storage": {"endpoint": ENDPOINT[0]}}})
    status = wait_phase(cluster, NS, "nostore", timeout=30, operator=op)
    assert not condition(status, "Progressing")


def test_a_spec_the_model_rejects_fails_naming_the_field_and_a_fix_resumes(env):
    cluster, op, bucket = env
    run = sft_run("badspec", bucket)
    run["spec"]["stages"]["sft"] = {"training": {"epochs": 1}}  # the CRD's CEL rule would refuse this
    with crd_without_cel_rules(cluster):  # as an older CRD (before the rule) lets it through
        cluster.create(RUNS, run)
    status = wait_phase(cluster, NS, "badspec", phases=("Failed",), timeout=20, operator=op)
    assert "spec.stages.sft.data" in status["message"] and condition(status, "Succeeded")["reason"] == "InvalidSpec"
    cluster.patch(RUNS, NS, "badspec", {"spec": {"stages": {"sft": {"data": SFT_DATA}}}})
    status = wait_phase(cluster, NS, "badspec", timeout=30, operator=op)
    assert status["observedGeneration"] == 2
    assert op.alive


def test_an_input_that_does_not_exist_fails_naming_the_field(env):
    cluster, op, bucket = env
    run = sft_run("noinput", bucket)
    run["spec"]["stages"]["sft"]["data"] = f"{bucket}/nowhere/sft.jsonl"
    cluster.create(RUNS, run)
    status = wait_phase(cluster, NS, "noinput", phases=("Failed",), timeout=20, operator=op)
    assert "spec.stages.sft.data" in status["message"] and "nowhere" in status["message"]
    assert condition(status, "Succeeded")["reason"] == "InputNotFound"
    assert not children_of(cluster, "noinput")


def test_a_finished_stage_is_not_rerun_when_its_spec_changes(env):
    cluster, op, bucket = env
    cluster.create(RUNS, sft_run("changed", bucket))
    wait_phase(cluster, NS, "changed", timeout=30, operator=op)
    cluster.patch(RUNS, NS, "changed", {"spec": {"stages": {"sft": {"training": {"epochs": 7}}}}})
    status = cluster.wait_for(lambda: (lambda s: s if s.get("observedGeneration") == 2 else None)(
        run_status(cluster, NS, "changed")), timeout=20, what="the change to be seen")
    assert condition(status, "SpecChangeNeedsNewRun")["status"] == "True"
    assert [n for _, n in created_names(cluster, NS) if n.startswith("changed-")] == ["changed-sft-1"]


def test_deleting_a_run_removes_its_children_and_keeps_its_artifacts(env, s3_server):
    from xwin_jobs.store import Store, read_marker

    cluster, op, bucket = env

    async def hold_reward_model(child):
        if child["metadata"]["labels"]["xwin.ai/stage"] == "rewardModel":
            await asyncio.sleep(3600)
    behaviours["gone"] = hold_reward_model
    pairs = tiny_run(storage={"uri": "file:///unused"})["spec"]["stages"]["pairs"]
    cluster.create(RUNS, sft_run("gone", bucket, stages={"sft": {"data": SFT_DATA}, "pairs": pairs,
                                                         "rewardModel": {"init": "sft"}}))
    cluster.wait_for(lambda: any(j["metadata"]["name"] == "gone-rewardmodel-1" for j in children_of(cluster, "gone")),
                     timeout=20, what="the rewardModel child")
    cluster.delete(RUNS, NS, "gone")
    cluster.wait_for(lambda: not children_of(cluster, "gone") and cluster.get(RUNS, NS, "gone") is None,
                     timeout=10, what="the run and its children to go")
    assert read_marker(Store(endpoint_url=s3_server.endpoint_url), f"{bucket}/runs/{NS}/gone/sft/") is not None
    assert op.alive


def test_a_sampling_stage_serves_samples_then_frees_the_server_and_keeps_the_judge_key_secret(env):
    cluster, op, bucket = env
    key = "sk-test-0123456789-NEVER-PRINT-ME"
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai", "namespace": NS},
                                  "data": {"OPENAI_API_KEY": base64.b64encode(key.encode()).decode()}})
    order: list[str] = []

    async def record(child):
        order.append(f"{child['kind']}/{child['metadata']['labels']['xwin.ai/step']}")
        return None
    behaviours["sampled"] = record
    prompts = SFT_DATA.replace("sft.jsonl", "pair-prompts.jsonl")
    cluster.create(RUNS, sft_run("sampled", bucket, judge={"model": "judge", "apiKeySecret": "openai"},
                                 stages={"sft": {"from": BASE}, "pairs": {"prompts": prompts, "policy": "sft"}}))
    status = wait_phase(cluster, NS, "sampled", timeout=30, operator=op)
    assert order == ["Deployment/serve", "Job/sample", "Job/judge"]
    created = [(r, n) for r, n in created_names(cluster, NS) if n.startswith("sampled-")]
    assert sorted(created) == [("deployments", "sampled-pairs-serve-1"), ("jobs", "sampled-pairs-judge-1"),
                               ("jobs", "sampled-pairs-sample-1"), ("services", "sampled-pairs-serve-1")]
    # the server is gone once its sampler finished (no GPU held while judging)
    assert cluster.get("apps/v1/deployments", NS, "sampled-pairs-serve-1") is None
    assert cluster.get("v1/services", NS, "sampled-pairs-serve-1") is None
    sampler = cluster.history("batch/v1/jobs", NS, "sampled-pairs-sample-1")[0]
    urls = [e.get("value", "") for e in sampler["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert any(u.startswith("http://sampled-pairs-serve-1:") for u in urls)  # the Service, by name
    judge = cluster.history("batch/v1/jobs", NS, "sampled-pairs-judge-1")[0]
    judge_env = {e["name"]: e for e in judge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert judge_env["OPENAI_API_KEY"] == {"name": "OPENAI_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "openai", "key": "OPENAI_API_KEY"}}}
    seen = json.dumps(cluster.get(RUNS, NS, "sampled")) + json.dumps(events_of(cluster, NS, "sampled")) + op.output()
    assert key not in seen and base64.b64encode(key.encode()).decode() not in seen
    assert status["stages"][1]["phase"] == "Succeeded"
