"""Child manifests: what the operator creates for a run, field by field, plus golden files.

The golden files in tests/golden/ are the full `xwin plan` output of the example runs; a change
to any builder shows up there as a diff to review. Regenerate them with
    XWIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_builders.py
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from xwin_jobs.task import StageTask
from xwin_jobs.vllm_server import vllm_server_args
from xwin_operator.core.config import OperatorConfig
from xwin_operator.kube.plan_print import planned_manifests, write_plan
from xwin_operator.api.spec_io import load_run
from xwin_operator.core.tasks import stage_task

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
UID = "6d1c8e3a-1111-2222-3333-444455556666"
GOLDEN_RUNS = {"tiny": REPO / "manifests/samples/tiny.yaml", "xwin-7b": REPO / "manifests/samples/xwin-7b.yaml"}


@pytest.fixture(scope="module")
def run7b():
    return load_run(GOLDEN_RUNS["xwin-7b"])


@pytest.fixture(scope="module")
def children(run7b) -> dict[str, dict]:
    return {f"{m['kind']}/{m['metadata']['name']}": m for _, _, m in planned_manifests(run7b, UID)}


def pod_specs(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    if manifest["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    if manifest["kind"] in ("Job", "Deployment"):
        return [spec["template"]["spec"]]
    return []


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("name", sorted(GOLDEN_RUNS))
def test_plan_matches_the_golden_file(name):
    out = io.StringIO()
    write_plan(load_run(GOLDEN_RUNS[name]), out, UID, OperatorConfig())
    path = GOLDEN / f"{name}.plan.yaml"
    if os.environ.get("XWIN_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(out.getvalue())
    assert path.exists(), f"{path} missing: run with XWIN_UPDATE_GOLDEN=1"
    assert out.getvalue() == path.read_text(), (
        f"the plan of {GOLDEN_RUNS[name].name} changed; review and regenerate with XWIN_UPDATE_GOLDEN=1")


def test_training_stage_is_a_pytorchjob_with_master_and_workers(children):
    job = children["PyTorchJob/xwin-7b-sft-1"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1  # nodes: 2
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3 and job["spec"]["runPolicy"]["suspend"] is False
    assert job["spec"]["nprocPerNode"] == "8"
    (container,) = replicas["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"
    # torchrun, exiting 128 + signal when preempted, so that `ExitCode` restarts the pod
    assert container["command"] == ["python", "-m", "xwin_jobs.launch", "-m", "xwin_jobs", "sft",
                                    "--task", "$(XWIN_TASK)"]
    # time to finish the step and upload a checkpoint after SIGTERM; torchrun waits almost as long
    assert replicas["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "585"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"] == {"cpu": "64", "memory": "800Gi", "nvidia.com/gpu": 8,
                                                  "ephemeral-storage": "120Gi"}  # resources.scratch


def test_the_task_in_the_pod_is_the_stage_task(run7b, children):
    container = children["PyTorchJob/xwin-7b-dpo-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    task = StageTask.load(env_of(container)["XWIN_TASK"]["value"])
    assert task == stage_task(run7b, "dpo")
    assert task.params["training"]["learningRate"] == 5.0e-7


def test_single_node_training_has_no_workers():
    job = next(m for _, _, m in planned_manifests(load_run(GOLDEN_RUNS["tiny"])) if m["kind"] == "PyTorchJob")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert "nvidia.com/gpu" not in json.dumps(job) and job["spec"]["nprocPerNode"] == "1"


def test_scheduling_and_security_apply_to_every_child(children):
    for key, m in children.items():
        assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue", key
        assert m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "xwin-operator"
        assert m["metadata"]["ownerReferences"] == [{
            "apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "name": "xwin-7b", "uid": UID,
            "controller": True, "blockOwnerDeletion": True}]
        for pod in pod_specs(m):
            assert pod["priorityClassName"] == "alignment-high"
            assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_credentials_come_only_through_secret_refs(children):
    for key, m in children.items():
        for pod in pod_specs(m):
            env = env_of(pod["containers"][0])
            assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials",
                                                                             "key": "AWS_ACCESS_KEY_ID"}
            judge = key.endswith("-judge-1")
            assert ("OPENAI_API_KEY" in env) == judge, key
            if judge:
                assert env["OPENAI_API_KEY"] == {"name": "OPENAI_API_KEY", "valueFrom": {
                    "secretKeyRef": {"name": "openai-api-key", "key": "OPENAI_API_KEY"}}}
            assert all("value" not in e for n, e in env.items() if n.startswith(("AWS_ACCESS", "AWS_SECRET", "OPENAI_API")))


def test_vllm_server_uses_the_shared_arguments_and_health_probe(run7b, children):
    deployment = children["Deployment/xwin-7b-bestofn-serve-1"]
    assert deployment["spec"]["replicas"] == 4
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    serving = stage_task(run7b, "bestOfN").params["serving"]
    assert c["command"] == ["python", "-m", "xwin_jobs.serve", *vllm_server_args(
        "/scratch/model", serving, 8000, host="0.0.0.0", served_model_name="policy", device="gpu")]
    # the model is copied from the store into the pod's scratch volume before vLLM starts
    (fetch,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert fetch["command"][-2:] == ["s3://xwin-artifacts/runs/alignment/xwin-7b/sft/model/", "/scratch/model"]
    assert {"name": "scratch", "mountPath": "/scratch"} in fetch["volumeMounts"]
    assert "OPENAI_API_KEY" not in env_of(fetch) and "AWS_ENDPOINT_URL" in env_of(fetch)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = children["Service/xwin-7b-bestofn-serve-1"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000


def test_sampler_job_points_at_its_server_and_fails_fast_on_a_bug(children):
    job = children["Job/xwin-7b-evaluate-sample-dpo-1"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env["OPENAI_BASE_URL"]["value"] == "http://xwin-7b-evaluate-serve-dpo-1:8000/v1"
    assert env["XWIN_MODEL_INPUT"]["value"] == "model:dpo" and env["XWIN_SERVED_MODEL"]["value"] == "policy"
    assert c["command"] == ["python", "-m", "xwin_jobs", "evaluate-sample", "--task", "$(XWIN_TASK)"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                               "values": [1, 2]}}


def test_run_images_override_the_operator_defaults(run7b):
    run = run7b.model_copy(deep=True)
    run.spec.images.trainer = "registry.local/trainer:dev"
    images = {m["kind"]: pod_specs(m)[0]["containers"][0]["image"]
              for _, _, m in planned_manifests(run, UID, OperatorConfig(sampler_image="s:1"))
              if m["kind"] != "Service"}
    assert images == {"PyTorchJob": "registry.local/trainer:dev", "Deployment": "s:1",
                      "Job": "ghcr.io/xwin-align/xwin-annotator:0.1.0"}


def test_operator_config_reads_the_environment():
    cfg = OperatorConfig.from_env({"XWIN_TRAINER_IMAGE": "t:2", "XWIN_BACKOFF_SECONDS": "1.5",
                                   "XWIN_SERVER_PORT": "9000"})
    assert (cfg.trainer_image, cfg.backoff_seconds, cfg.server_port) == ("t:2", 1.5, 9000)
