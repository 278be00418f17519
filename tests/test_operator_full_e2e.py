"""The whole tiny demo (examples/tiny/run.yaml: all seven stages) through the operator: a real
`python -m xwin_operator` process against the fake API server, every child run by the test
kubelet as local processes (torchrun trainers; vLLM Deployments served by .venv-vllm's python
with their sampler Jobs; judge Jobs talking to the loopback judge server), artifacts on moto S3.

Slow (a few minutes on 2 CPU cores); skipped where there is no .venv-vllm (`make vllm`).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from judge_fixtures import FAKE_KEY, judge_server  # noqa: F401
from kube.fixtures import NS, cluster, create_run, example_run, kubelet_factory, operator_factory  # noqa: F401
from kube.harness import created_names, events_of, versions_of, wait_phase
from kube.kubelet import REPO_ROOT
from test_operator_e2e import inputs_on_s3, s3_secret, storage, tiny_task  # noqa: F401

VLLM_PYTHON = Path(REPO_ROOT) / ".venv-vllm" / "bin" / "python"
FULL = Path(REPO_ROOT) / "examples" / "tiny" / "run.yaml"
JUDGE_SECRET = "judge-api-key"
SAMPLED_STAGES = ("pairs", "bestOfN", "evaluate")
# the operator's plumbing, not the recipe's gains (tests/test_demo.py runs the whole task):
# the first lines of each prompt file, enough for every stage to have work
PROMPT_LINES = {"pair-prompts.jsonl": 64, "rs-prompts.jsonl": 64, "alpaca.jsonl": 48,
                "alpaca-ref.jsonl": 48, "mt-bench.jsonl": 32}


def full_run(name: str, *, storage: dict, judge_url: str) -> dict:
    """examples/tiny/run.yaml via `example_run`, the judge pointed at `judge_url` with its key
    in the Secret JUDGE_SECRET."""
    run = example_run(FULL, name, storage=storage)
    run["spec"]["judge"] = {**run["spec"]["judge"], "baseURL": judge_url, "apiKeySecret": JUDGE_SECRET}
    # the operator's plumbing, not the recipe's gains (tests/test_demo.py): short training
    for stage in ("sft", "rewardModel", "rejectionSampling", "dpo"):
        run["spec"]["stages"][stage].setdefault("training", {})["maxSteps"] = 16
    # two evaluated models still take two servers, the second's cold start overlapping the
    # first's sampling; a third would only add one more (a minute on 2 cores)
    run["spec"]["stages"]["evaluate"]["models"] = ["sft", "dpo"]
    return run


@pytest.fixture
def small_task(tiny_task, tmp_path) -> Path:
    """examples/tiny's task (`tiny_task`) with its prompt files cut to PROMPT_LINES."""
    out = tmp_path / "small-task"
    shutil.copytree(tiny_task, out)
    for name, lines in PROMPT_LINES.items():
        path = out / name
        if path.exists():
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:lines]))
    return out


def full_run_on_s3(cluster, name: str, s3_server, bucket: str, task_dir: Path, judge_url: str):
    """(run, store): `full_run` with its inputs uploaded under `<bucket>/inputs`, artifacts
    under `<bucket>/runs`, and its S3 and judge Secrets created in `cluster`."""
    from xwin_jobs.store import Store

    store = Store(endpoint_url=s3_server.endpoint_url)
    run = full_run(name, storage=storage(s3_server, bucket), judge_url=judge_url)
    run = inputs_on_s3(run, store, f"{bucket}/inputs", task_dir)
    s3_secret(cluster, s3_server.env, secret=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    judge_secret(cluster)
    return run, store


def judge_secret(cluster) -> None:
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": JUDGE_SECRET, "namespace": NS},
                                  "data": {"OPENAI_API_KEY": base64.b64encode(FAKE_KEY.encode()).decode()}})


def deployment_lifetime(cluster, name: str) -> tuple[bool, bool]:
    """(was created, is deleted now) for a Deployment, from the API server's history."""
    history = versions_of(cluster, "apps/v1/deployments", NS, name)
    return bool(history) and history[0] is not None, bool(history) and history[-1] is None


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="needs vLLM in .venv-vllm (`make vllm`)")
def test_full_tiny_demo_succeeds_through_the_operator(cluster, kubelet_factory, operator_factory,
                                                     s3_server, s3_bucket, small_task, judge_server):
    from xwin_jobs.store import read_marker

    name = "tiny-xwin"
    run, store = full_run_on_s3(cluster, name, s3_server, s3_bucket, small_task, judge_server.base_url)
    kubelet = kubelet_factory(server_python=str(VLLM_PYTHON))  # samplers, judges, trainers: this python
    op = operator_factory(env=s3_server.env)
    create_run(cluster, run)

    status = wait_phase(cluster, NS, name, phases=("Succeeded", "Failed"), timeout=1740, operator=op)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((kubelet.work / "logs").glob("*.log")))
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs}"
    stages = {s["name"]: s for s in status["stages"]}
    assert set(stages) == set(run["spec"]["stages"]) == {"sft", "pairs", "rewardModel", "bestOfN",
                                                         "rejectionSampling", "dpo", "evaluate"}
    assert {n: s["phase"] for n, s in stages.items()} == {n: "Succeeded" for n in stages}
    assert {n: s["attempts"] for n, s in stages.items()} == {n: 1 for n in stages}
    for stage in stages:
        marker = read_marker(store, f"{s3_bucket}/runs/{NS}/{name}/{stage}/")
        assert marker and marker["stage"] == stage

    # every vLLM Deployment existed, and is gone now that its sampler finished
    deployments = sorted(n for res, n in created_names(cluster, NS) if res == "deployments")
    assert len(deployments) >= len(SAMPLED_STAGES), deployments
    for stage in SAMPLED_STAGES:
        assert any(f"-{stage.lower()}-" in d for d in deployments), (stage, deployments)
    assert all(deployment_lifetime(cluster, d) == (True, True) for d in deployments), deployments
    assert cluster.list("apps/v1/deployments", NS) == []

    assert store.exists(f"{s3_bucket}/runs/{NS}/{name}/evaluate/data/report.json")

    # the judge key never leaves the pods
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, name)),
                     timeout=10, what="the RunSucceeded Event")
    obj = cluster.get("xwin.ai/v1alpha1/alignmentruns", NS, name)
    everything = json.dumps(obj) + json.dumps(events_of(cluster, NS, name)) + op.output()
    assert FAKE_KEY not in everything
    assert base64.b64encode(FAKE_KEY.encode()).decode() not in everything
