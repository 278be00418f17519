"""The test kubelet behaves like the controllers it stands for (so operator tests mean something).

Hand-written children on the fake API server: a PyTorchJob's replicas get the Training
Operator's variables and its conditions; `restartPolicy: ExitCode` restarts a killed replica
and fails on a bug; a Job honours podFailurePolicy; a Deployment serves on a loopback port that
a Job reaches through the Service name; suspension kills and resumes; the API server stamps
metadata and collects garbage by owner reference.
"""

from __future__ import annotations

import base64
import json
import sys
import textwrap

import pytest

from kube import Cluster, Kubelet
from kube.apiserver import merge_patch, parse_selector, selector_matches

NS = "demo"
PY = sys.executable


def pod(command: list[str], env: list[dict] | None = None) -> dict:
    return {"spec": {"containers": [{"name": "main", "image": "trainer", "command": command, "env": env or [],
                                     "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                     "volumes": [{"name": "scratch", "emptyDir": {}}]}}


def pytorchjob(name: str, script: str, nodes: int = 1, backoff: int = 0, suspend: bool = False) -> dict:
    template = pod(["python", "-c", script], [{"name": "OUT", "value": "/scratch/out"}])
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "ExitCode", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "namespace": NS},
            "spec": {"nprocPerNode": "1", "runPolicy": {"backoffLimit": backoff, "suspend": suspend},
                     "pytorchReplicaSpecs": replicas}}


def job(name: str, command: list[str], env: list[dict] | None = None, **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"backoffLimit": 0, **spec, "template": pod(command, env)}}


def conditions(obj: dict | None) -> dict[str, str]:
    return {c["type"]: c["status"] for c in ((obj or {}).get("status") or {}).get("conditions") or []}


@pytest.fixture
def cluster():
    with Cluster(namespaces=(NS,)) as c:
        yield c


@pytest.fixture
def kubelet(cluster, tmp_path):
    k = Kubelet(cluster, work=tmp_path / "node", namespace=NS).start()
    yield k
    k.stop()


def finished(cluster, resource, name, kinds=("Succeeded", "Failed", "Complete")):
    return cluster.wait_for(lambda: (lambda o: o if any(conditions(o).get(k) == "True" for k in kinds) else None)(
        cluster.get(resource, NS, name)), timeout=60, what=f"{name} to finish")


def test_pytorchjob_replicas_get_training_operator_env(cluster, kubelet, tmp_path):
    script = textwrap.dedent("""
        import json, os
        keys = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NODE_RANK"]
        os.makedirs(os.environ["OUT"], exist_ok=True)
        open(os.path.join(os.environ["OUT"], "env.json"), "w").write(json.dumps({k: os.environ[k] for k in keys}))
        """)
    cluster.create("kubeflow.org/v1/pytorchjobs", pytorchjob("tj", script, nodes=2))
    done = finished(cluster, "kubeflow.org/v1/pytorchjobs", "tj")
    assert conditions(done) == {"Created": "True", "Running": "False", "Succeeded": "True"}
    envs = sorted((json.loads(p.read_text()) for p in (tmp_path / "node" / "pods").glob("*/scratch/out/env.json")),
                  key=lambda e: e["RANK"])
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_exit_code_policy_restarts_a_killed_replica_and_fails_a_bug(cluster, kubelet, tmp_path):
    # First run is "preempted" (SIGKILL -> 137): restarted; the second run exits 0.
    flag = tmp_path / "preempted"
    killed_once = f"import os, pathlib, signal\np = pathlib.Path({str(flag)!r})\nif not p.exists():\n    p.touch(); os.kill(os.getpid(), signal.SIGKILL)"
    cluster.create("kubeflow.org/v1/pytorchjobs", pytorchjob("preempted", killed_once, backoff=2))
    cluster.create("kubeflow.org/v1/pytorchjobs", pytorchjob("buggy", "raise SystemExit(1)", backoff=2))
    ok = finished(cluster, "kubeflow.org/v1/pytorchjobs", "preempted")
    assert conditions(ok)["Succeeded"] == "True" and kubelet.starts[("PyTorchJob", "preempted")] == 2
    bad = finished(cluster, "kubeflow.org/v1/pytorchjobs", "buggy")
    failed = next(c for c in bad["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PyTorchJobFailed" and kubelet.starts[("PyTorchJob", "buggy")] == 1


def test_job_secret_env_and_pod_failure_policy(cluster, kubelet):
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NS},
                                  "data": {"KEY": base64.b64encode(b"sesame").decode()}})
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "KEY"}}}]
    cluster.create("batch/v1/jobs", job("ok", ["python", "-c", "import os; assert os.environ['KEY'] == 'sesame'"], env))
    rule = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [1, 2]}}]}
    cluster.create("batch/v1/jobs", job("bad", ["python", "-c", "raise SystemExit(2)"], backoffLimit=3, podFailurePolicy=rule))
    ok = finished(cluster, "batch/v1/jobs", "ok")
    assert ok["status"]["succeeded"] == 1 and conditions(ok)["Complete"] == "True"
    bad = finished(cluster, "batch/v1/jobs", "bad")
    assert next(c for c in bad["status"]["conditions"] if c["type"] == "Failed")["reason"] == "PodFailurePolicy"
    assert kubelet.starts[("Job", "bad")] == 1


def test_deployment_serves_on_the_port_its_service_name_resolves_to(cluster, kubelet):
    server = textwrap.dedent("""
        import argparse, http.server
        a = argparse.ArgumentParser(); a.add_argument("--host"); a.add_argument("--port", type=int)
        args = a.parse_args()
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"pong")
        http.server.HTTPServer((args.host, args.port), H).serve_forever()
        """)
    labels = {"app": "srv"}
    template = pod(["python", "-c", server, "--host", "0.0.0.0", "--port", "8000"])
    template["metadata"] = {"labels": labels}
    template["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}}
    cluster.create("apps/v1/deployments", {"apiVersion": "apps/v1", "kind": "Deployment",
                                           "metadata": {"name": "srv", "namespace": NS},
                                           "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template}})
    cluster.create("v1/services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "srv", "namespace": NS},
                                   "spec": {"selector": labels, "ports": [{"port": 8000}]}})
    cluster.wait_for(lambda: ((cluster.get("apps/v1/deployments", NS, "srv") or {}).get("status") or {}).get("availableReplicas"),
                     timeout=30, what="the server to be available")
    client = "import os, urllib.request; assert urllib.request.urlopen(os.environ['URL'] + '/x').read() == b'pong'"
    cluster.create("batch/v1/jobs", job("client", ["python", "-c", client], [{"name": "URL", "value": "http://srv:8000/v1"}]))
    assert conditions(finished(cluster, "batch/v1/jobs", "client"))["Complete"] == "True"
    cluster.delete("apps/v1/deployments", NS, "srv")
    cluster.wait_for(lambda: not kubelet.ports, timeout=10, what="the server to stop")


def test_suspend_kills_and_resume_restarts(cluster, kubelet, tmp_path):
    marker = tmp_path / "runs"
    script = f"import time; open({str(marker)!r}, 'a').write('x'); time.sleep(120)"
    cluster.create("batch/v1/jobs", job("long", ["python", "-c", script]))
    cluster.wait_for(lambda: marker.exists(), timeout=30, what="the pod to start")
    cluster.patch("batch/v1/jobs", NS, "long", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: conditions(cluster.get("batch/v1/jobs", NS, "long")).get("Suspended") == "True", timeout=10)
    assert not kubelet.pids or all(not _alive(p) for p in kubelet.pids)
    cluster.patch("batch/v1/jobs", NS, "long", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: marker.read_text() == "xx", timeout=30, what="the pod to restart")


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_api_server_stamps_metadata_and_collects_garbage(cluster):
    owner = cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "owner", "namespace": NS}})
    meta = owner["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1
    ref = {"apiVersion": "v1", "kind": "Secret", "name": "owner", "uid": meta["uid"], "controller": True}
    cluster.create("batch/v1/jobs", {**job("child", ["true"]), "metadata": {"name": "child", "namespace": NS,
                                                                             "labels": {"a": "b"}, "ownerReferences": [ref]}})
    cluster.create("batch/v1/jobs", job("other", ["true"]))
    assert [j["metadata"]["name"] for j in cluster.list("batch/v1/jobs", NS, labels="a=b")] == ["child"]
    patched = cluster.patch("batch/v1/jobs", NS, "child", {"spec": {"parallelism": 2}, "status": {"active": 9}})
    assert patched["metadata"]["generation"] == 2 and "active" not in (patched.get("status") or {})
    cluster.delete("v1/secrets", NS, "owner")
    assert cluster.get("batch/v1/jobs", NS, "child") is None and cluster.get("batch/v1/jobs", NS, "other")


def test_selector_and_merge_patch_helpers():
    terms = parse_selector("a=b,c!=d,e,!f")
    assert selector_matches(terms, {"a": "b", "e": "1"}) and not selector_matches(terms, {"a": "b", "e": "", "f": "x"})
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
