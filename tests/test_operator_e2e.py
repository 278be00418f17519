"""The operator end to end: a real `python -m xwin_operator` process (kopf) against the fake API
server, children run by the test kubelet, artifacts on a real S3 endpoint (moto).

* the tiny example run reaches Succeeded through the operator path (children completing at
  once with their stage markers: seconds; and, marked slow, with every stage really trained
  by torchrun processes: a couple of minutes on CPU);
* the operator is SIGKILLed at several points and restarted: no child is ever created twice
  and the run still finishes;
* the S3 credentials' values never reach the run's status, its Events or the operator's log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kube.fixtures import NS, cluster, create_run, kubelet_factory, operator_factory, tiny_run  # noqa: F401
from kube.harness import complete_with_marker, created_names, events_of, wait_phase, write_marker_for
from kube.kubelet import REPO_ROOT, Outcome

SECRET_VALUE = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzz9-SECRET"


def s3_secret(cluster, env: dict[str, str], secret: str = SECRET_VALUE) -> None:
    """The storage.secretRef Secret. moto accepts any key, so the secret key is a unique string
    whose appearance anywhere outside pods would be a leak."""
    data = {"AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": secret}
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": "s3-credentials", "namespace": NS},
                                  "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def storage(s3_server, bucket: str) -> dict:
    return {"uri": f"{bucket}/runs", "endpoint": s3_server.endpoint_url, "secretRef": "s3-credentials"}


def assert_succeeded(status: dict) -> None:
    assert status["phase"] == "Succeeded", status
    assert {s["name"]: s["phase"] for s in status["stages"]} == {
        "sft": "Succeeded", "pairs": "Skipped", "rewardModel": "Succeeded", "bestOfN": "Skipped",
        "rejectionSampling": "Succeeded", "dpo": "Succeeded"}
    assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["status"] == "True"


def test_tiny_run_succeeds_through_the_operator(cluster, kubelet_factory, operator_factory, s3_server, s3_bucket):
    s3_secret(cluster, s3_server.env)
    kubelet_factory(instant=complete_with_marker())
    op = operator_factory(env=s3_server.env)
    create_run(cluster, tiny_run(storage=storage(s3_server, s3_bucket)))

    status = wait_phase(cluster, NS, "tiny", timeout=60, operator=op)
    assert_succeeded(status)
    assert status["observedGeneration"] == 1
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["artifact"] == f"{s3_bucket}/runs/{NS}/tiny/sft/" and sft["attempts"] == 1
    assert sft["metrics"] == {"instant": 1}
    # (the child may be listed, or already gone: the planner deletes a stage's still-active
    # children once its marker is there, and the job writes its marker just before it exits)
    assert sft["children"] in ([], ["PyTorchJob/tiny-sft-1"])
    # one PyTorchJob per trained stage, each created once, owned by the run
    assert Counter(n for _, n in created_names(cluster, NS)) == Counter(
        ["tiny-sft-1", "tiny-rewardmodel-1", "tiny-rejectionsampling-1", "tiny-dpo-1"])
    reasons = [e["reason"] for e in events_of(cluster, NS, "tiny")]
    assert reasons.count("StageSucceeded") == 4 and reasons[-1] == "RunSucceeded"
    # secrets never leave the pods
    run = cluster.get("xwin.ai/v1alpha1/alignmentruns", NS, "tiny")
    everything = json.dumps(run) + json.dumps(events_of(cluster, NS, "tiny")) + op.output()
    assert SECRET_VALUE not in everything and base64.b64encode(SECRET_VALUE.encode()).decode() not in everything


def test_killing_the_operator_at_any_point_duplicates_nothing(cluster, kubelet_factory, operator_factory,
                                                               s3_server, s3_bucket):
    async def slow_success(child: dict) -> Outcome:  # children take a moment, so kills land mid-stage
        await asyncio.sleep(0.6)
        await asyncio.to_thread(write_marker_for, child)
        return Outcome()

    s3_secret(cluster, s3_server.env)
    kubelet_factory(instant=slow_success)
    create_run(cluster, tiny_run(storage=storage(s3_server, s3_bucket)))
    op = operator_factory(env=s3_server.env)
    created = lambda: len(created_names(cluster, NS))  # noqa: E731
    kill_points = [
        ("as it starts handling the run", lambda: "Initial authentication has finished" in op.output()),
        ("right after the first child", lambda: created() >= 1),
        ("mid-pipeline", lambda: created() >= 2),
        ("while the last stages run", lambda: created() >= 3),
    ]
    for what, point in kill_points:
        cluster.wait_for(point, timeout=30, what=what)
        op.kill()
        assert not op.alive
        op.start()
    status = wait_phase(cluster, NS, "tiny", timeout=90, operator=op)
    assert_succeeded(status)
    names = [n for _, n in created_names(cluster, NS)]
    assert sorted(names) == sorted(set(names)), f"a child was created twice: {names}"
    assert set(names) == {"tiny-sft-1", "tiny-rewardmodel-1", "tiny-rejectionsampling-1", "tiny-dpo-1"}
    assert op.starts == 5
    assert all(s["attempts"] == 1 for s in status["stages"] if s["phase"] == "Succeeded")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-task")
    subprocess.run([sys.executable, str(Path(REPO_ROOT) / "examples" / "tiny" / "make_task.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_tiny_run_trains_every_stage_through_the_operator(cluster, kubelet_factory, operator_factory,
                                                         s3_server, s3_bucket, tiny_task):
    """The demo, on 'Kubernetes': torchrun processes per PyTorchJob replica, S3 artifacts."""
    from xwin_jobs.store import Store, read_marker

    store = Store(endpoint_url=s3_server.endpoint_url)
    store.upload_dir(tiny_task / "base-model", f"{s3_bucket}/inputs/base-model/")
    for name in ("sft", "pairs", "scored"):
        store.upload_file(tiny_task / f"{name}.jsonl", f"{s3_bucket}/inputs/{name}.jsonl")
    inputs = {"baseModel": f"{s3_bucket}/inputs/base-model/", "sft.data": f"{s3_bucket}/inputs/sft.jsonl",
              "pairs.from": f"{s3_bucket}/inputs/pairs.jsonl", "bestOfN.from": f"{s3_bucket}/inputs/scored.jsonl"}
    s3_secret(cluster, s3_server.env, secret=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    kubelet = kubelet_factory()
    op = operator_factory(env=s3_server.env)
    create_run(cluster, tiny_run(storage=storage(s3_server, s3_bucket), inputs=inputs))

    status = wait_phase(cluster, NS, "tiny", phases=("Succeeded", "Failed"), timeout=600, operator=op)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((kubelet.work / "logs").glob("*.log")))
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs}"
    assert_succeeded(status)
    for stage in ("sft", "rewardModel", "rejectionSampling", "dpo"):
        marker = read_marker(store, f"{s3_bucket}/runs/{NS}/tiny/{stage}/")
        assert marker and marker["stage"] == stage
        assert store.exists(f"{s3_bucket}/runs/{NS}/tiny/{stage}/model/config.json")
    assert all(kubelet.starts[k] == 1 for k in kubelet.starts), kubelet.starts
    rm = next(s for s in status["stages"] if s["name"] == "rewardModel")
    assert rm["metrics"], rm
