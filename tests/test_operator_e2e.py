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
import re
import subprocess
import sys
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


def expected_phases(run: dict) -> dict[str, str]:
    """Every stage of the run: Skipped when given with `from:`, else Succeeded."""
    return {k: "Skipped" if "from" in (v or {}) else "Succeeded" for k, v in run["spec"]["stages"].items()}


def planned_children(run: dict) -> list[str]:
    """The names of every child the operator should create once (first attempts), from the
    operator's own manifests (what `xwin plan` prints)."""
    from xwin_operator.kube.plan_print import planned_manifests
    from xwin_operator.api.spec import AlignmentRun

    return sorted(m["metadata"]["name"] for _, _, m in planned_manifests(AlignmentRun.model_validate(run)))


def assert_succeeded(status: dict, run: dict) -> None:
    assert status["phase"] == "Succeeded", status
    assert {s["name"]: s["phase"] for s in status["stages"]} == expected_phases(run)
    assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["status"] == "True"


def test_tiny_run_succeeds_through_the_operator(cluster, kubelet_factory, operator_factory, s3_server, s3_bucket):
    s3_secret(cluster, s3_server.env)
    kubelet_factory(instant=complete_with_marker())
    op = operator_factory(env=s3_server.env)
    run = tiny_run(storage=storage(s3_server, s3_bucket))
    create_run(cluster, run)

    status = wait_phase(cluster, NS, "tiny", timeout=60, operator=op)
    assert_succeeded(status, run)
    assert status["observedGeneration"] == 1
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["artifact"] == f"{s3_bucket}/runs/{NS}/tiny/sft/" and sft["attempts"] == 1
    assert sft["metrics"] == {"instant": 1}
    assert sft["children"] == ["PyTorchJob/tiny-sft-1"]
    # every planned child created exactly once
    assert sorted(n for _, n in created_names(cluster, NS)) == planned_children(run)
    # Events follow the status patch they tell about: wait for the last one
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "tiny")),
                     timeout=10, what="the RunSucceeded Event")
    reasons = [e["reason"] for e in events_of(cluster, NS, "tiny")]
    assert reasons.count("StageSucceeded") == list(expected_phases(run).values()).count("Succeeded")
    assert reasons[-1] == "RunSucceeded"
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
    run = tiny_run(storage=storage(s3_server, s3_bucket))
    create_run(cluster, run)
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
    assert_succeeded(status, run)
    names = [n for _, n in created_names(cluster, NS)]
    assert sorted(names) == sorted(set(names)), f"a child was created twice: {names}"
    assert sorted(names) == planned_children(run)
    assert op.starts == 5
    assert all(s["attempts"] == 1 for s in status["stages"] if s["phase"] == "Succeeded")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-task")
    subprocess.run([sys.executable, str(Path(REPO_ROOT) / "examples" / "tiny" / "make_task.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


def inputs_on_s3(run: dict, store, prefix: str, task_dir: Path) -> dict:
    """Every examples/tiny/work input of the run uploaded (from `task_dir`) under `prefix`, and
    the run pointing there: pods read their inputs from the store, as on a cluster."""
    local = f"file://{REPO_ROOT}/examples/tiny/work/"

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and value.startswith(local):
            rel = value[len(local):].strip("/")
            if (task_dir / rel).is_dir():
                store.upload_dir(task_dir / rel, f"{prefix}/{rel}/")
                return f"{prefix}/{rel}/"
            store.upload_file(task_dir / rel, f"{prefix}/{rel}")
            return f"{prefix}/{rel}"
        return value
    return {**run, "spec": move(run["spec"])}


def local_python(image: str) -> str:
    """The interpreter standing in for an image: the sampler image's vLLM virtualenv when there
    is one (.venv-vllm), else this one."""
    vllm = Path(REPO_ROOT) / ".venv-vllm" / "bin" / "python"
    return str(vllm) if "sampler" in image and vllm.exists() else sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["PyTorchJob", "TrainJob"])
def test_tiny_run_trains_every_stage_through_the_operator(cluster, kubelet_factory, operator_factory,
                                                         s3_server, s3_bucket, tiny_task, launcher):
    """The demo, on 'Kubernetes': torchrun processes per PyTorchJob replica (or TrainJob node),
    S3 artifacts."""
    from xwin_jobs.store import Store, read_marker

    store = Store(endpoint_url=s3_server.endpoint_url)
    run = inputs_on_s3(tiny_run(storage=storage(s3_server, s3_bucket), scheduling={"launcher": launcher}),
                       store, f"{s3_bucket}/inputs", tiny_task)
    s3_secret(cluster, s3_server.env, secret=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    kubelet = kubelet_factory(python_for_image=local_python)
    op = operator_factory(env=s3_server.env)
    create_run(cluster, run)

    status = wait_phase(cluster, NS, "tiny", phases=("Succeeded", "Failed"), timeout=600, operator=op)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((kubelet.work / "logs").glob("*.log")))
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs}"
    assert_succeeded(status, run)
    for stage, phase in expected_phases(run).items():
        if phase == "Succeeded":
            marker = read_marker(store, f"{s3_bucket}/runs/{NS}/tiny/{stage}/")
            assert marker and marker["stage"] == stage
        if phase == "Succeeded" and stage in ("sft", "rewardModel", "rejectionSampling", "dpo"):
            assert store.exists(f"{s3_bucket}/runs/{NS}/tiny/{stage}/model/config.json")
    assert all(kubelet.starts[k] == 1 for k in kubelet.starts), kubelet.starts
    rm = next(s for s in status["stages"] if s["name"] == "rewardModel")
    assert rm["metrics"], rm


@pytest.mark.slow
def test_a_killed_trainer_replica_is_restarted_and_resumes_from_its_checkpoint(
        cluster, kubelet_factory, operator_factory, s3_server, s3_bucket, tiny_task, monkeypatch):
    """Preemption on 'Kubernetes': once sft has uploaded a checkpoint, its PyTorchJob replica is
    killed (every process at once: exit code 137); the Training Operator stand-in restarts it
    (`restartPolicy: ExitCode`) and the stage resumes from the checkpoint instead of step 0.
    While it trains, the run's status shows its step n/32 (the pod's progress record, written
    every step here, read on every pass: a pass every 0.5 s while a step reports)."""
    import time

    from kube.harness import run_status

    monkeypatch.setenv("XWIN_PROGRESS_INTERVAL", "0")

    import psutil

    from xwin_jobs.store import Store

    store = Store(endpoint_url=s3_server.endpoint_url)
    sft = {"data": f"file://{REPO_ROOT}/examples/tiny/work/sft.jsonl",
           "training": {"epochs": 2, "checkpointEvery": 8, "maxSteps": 32}}  # 32 steps of 16
    run = inputs_on_s3(tiny_run(storage=storage(s3_server, s3_bucket), stages={"sft": sft}),
                       store, f"{s3_bucket}/inputs", tiny_task)
    s3_secret(cluster, s3_server.env, secret=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    kubelet = kubelet_factory(python_for_image=local_python)
    op = operator_factory(env={**s3_server.env, "XWIN_PROGRESS_SECONDS": "0.5"})
    create_run(cluster, run)

    checkpoints = f"{s3_bucket}/runs/{NS}/tiny/sft/checkpoints/"
    deadline = time.monotonic() + 300
    while not any(f.endswith("/_CHECKPOINT.json") for f in store.list_files(checkpoints)):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    for pid in list(kubelet.pids):  # the replica's launcher and its workers
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                p.kill()
        except psutil.NoSuchProcess:
            pass

    seen = []   # (done, total) of sft's progress in the run's status, while the run goes
    deadline = time.monotonic() + 600
    while (status := run_status(cluster, NS, "tiny")).get("phase") not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline and op.alive, json.dumps(status)
        live = next(s for s in status.get("stages", []) if s["name"] == "sft").get("progress")
        if live:
            assert (live["unit"], live["step"]) == ("steps", "train") and status["progress"]["summary"]
            seen.append((live["done"], live["total"]))
        time.sleep(0.2)
    assert any(0 < done < 32 and total == 32 for done, total in seen), seen
    log = (kubelet.work / "logs" / "tiny-sft-1-master-0.log").read_text()
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{log[-3000:]}"
    assert kubelet.starts[("PyTorchJob", "tiny-sft-1")] == 2  # restarted once, same attempt
    assert next(s for s in status["stages"] if s["name"] == "sft")["attempts"] == 1
    resumed = int(re.search(r"resuming after step (\d+)", log).group(1))
    assert resumed >= 8 and resumed % 8 == 0
    assert status["stages"][0]["metrics"]["steps"] == 32
