"""The operator reads a run's store with the run's own key (storage.secretRef, in the run's
namespace) on an S3 endpoint that checks credentials, where its own environment's are refused;
a rotated Secret is picked up; a Secret without a needed key blocks the run naming the Secret
and the key; the key never reaches the status, the Events or the operator's log."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from kube import Cluster, Kubelet, Outcome
from kube.fixtures import NS
from kube.harness import OperatorProcess, events_of, run_status, wait_phase, container_env

from test_operator_handlers import BASE, SFT_DATA, condition

KEY: dict[str, str] = {}


async def outcome(child: dict) -> Outcome:
    """The stage's job, writing its marker with the run's key (as its pod gets it from the Secret)."""
    await asyncio.to_thread(_write_marker, child)
    return Outcome()


def _write_marker(child: dict) -> None:
    from xwin_jobs.store import Store, write_marker
    from xwin_jobs.store_s3 import S3Credentials
    from xwin_jobs.task import StageTask, upstream_digests

    env = container_env(child)
    task = StageTask.load(env["XWIN_TASK"])
    store = Store(endpoint_url=env["AWS_ENDPOINT_URL"],
                  credentials=S3Credentials(KEY["AWS_ACCESS_KEY_ID"], KEY["AWS_SECRET_ACCESS_KEY"]))
    upstream = upstream_digests(store, task)
    write_marker(store, task.output, {"stage": task.stage, "digest": task.digest(upstream), "inputDigests": upstream,
                                      "counts": {}, "metrics": {"instant": 1}})


def secret(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server, s3_auth_server):
    from xwin_operator.api.crd import crd

    KEY.update(s3_auth_server.key)
    work = tmp_path_factory.mktemp("operator-store-key")
    with Cluster(namespaces=(NS,), crds=(crd(),)) as cluster:
        kubelet = Kubelet(cluster, work=work / "node", namespace=NS, instant=outcome).start()
        # the operator's own credentials are the session's fake ones, which this endpoint refuses
        op = OperatorProcess(cluster, work / "operator", namespace=NS, interval=0.3,
                             env={**s3_server.env, "XWIN_SECRET_TTL_SECONDS": "1"}).start()
        try:
            yield cluster, op, s3_auth_server
        finally:
            op.stop()
            kubelet.stop()


def a_run(name: str, bucket: str, endpoint: str, secret_ref: str) -> dict:
    return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": BASE, "storage": {"uri": f"{bucket}/runs", "endpoint": endpoint, "secretRef": secret_ref},
                     "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}}, "stages": {"sft": {"data": SFT_DATA}}}}


def no_key_anywhere(cluster: Cluster, op: OperatorProcess, run: str) -> None:
    text = json.dumps(run_status(cluster, NS, run)) + json.dumps(events_of(cluster, NS, run)) + op.output()
    assert KEY["AWS_SECRET_ACCESS_KEY"] not in text and KEY["AWS_ACCESS_KEY_ID"] not in text


def test_the_run_s_own_key_reads_its_store_and_a_rotated_secret_is_picked_up(env):
    cluster, op, s3 = env
    bucket = s3.make_bucket()
    cluster.create("v1/secrets", secret("run-s3", {"AWS_ACCESS_KEY_ID": KEY["AWS_ACCESS_KEY_ID"],
                                                   "AWS_SECRET_ACCESS_KEY": "not-the-key"}))
    cluster.create("xwin.ai/v1alpha1/alignmentruns", a_run("keyed", bucket, s3.endpoint_url, "run-s3"))
    blocked = cluster.wait_for(lambda: condition(run_status(cluster, NS, "keyed"), "Progressing").get("reason") == "StoreError"
                               and run_status(cluster, NS, "keyed"), timeout=30, what="a refused key to block the run")
    assert "with the key in Secret 'run-s3' (spec.storage.secretRef)" in blocked["message"]

    cluster.patch("v1/secrets", NS, "run-s3", {"data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(
        KEY["AWS_SECRET_ACCESS_KEY"].encode()).decode()}})   # rotated: the right key
    status = wait_phase(cluster, NS, "keyed", timeout=60, operator=op)
    assert status["phase"] == "Succeeded" and "Progressing" not in [c["type"] for c in status["conditions"]]
    no_key_anywhere(cluster, op, "keyed")


def test_a_secret_without_a_needed_key_names_the_secret_and_the_key(env):
    cluster, op, s3 = env
    cluster.create("v1/secrets", secret("half-s3", {"AWS_ACCESS_KEY_ID": KEY["AWS_ACCESS_KEY_ID"]}))
    cluster.create("xwin.ai/v1alpha1/alignmentruns", a_run("halfkey", s3.make_bucket(), s3.endpoint_url, "half-s3"))
    status = cluster.wait_for(lambda: condition(run_status(cluster, NS, "halfkey"), "Progressing").get("reason")
                              == "SecretKeyNotFound" and run_status(cluster, NS, "halfkey"), timeout=30,
                              what="the run to name the missing key")
    message = condition(status, "Progressing")["message"]
    assert "Secret 'half-s3'" in message and "AWS_SECRET_ACCESS_KEY" in message and "spec.storage.secretRef" in message
    cluster.wait_for(lambda: [e["reason"] for e in events_of(cluster, NS, "halfkey")].count("SecretKeyNotFound") == 1,
                     timeout=10, what="one Event naming the missing key")
    no_key_anywhere(cluster, op, "halfkey")
