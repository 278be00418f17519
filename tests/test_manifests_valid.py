"""Every manifest `xwin plan` prints for the examples is one the API server would accept.

* built-in kinds (Deployment, Service, Job) with `kubernetes-validate` in strict mode (no
  unknown fields), for the oldest and the newest Kubernetes version we support;
* PyTorchJobs, TrainJobs and the sample ClusterTrainingRuntime against Kubeflow's CRD schemas
  in `tests/schemas/` (sources and versions: its README) with jsonschema, made strict (an
  unknown field is an error instead of being pruned silently), and their pod templates again
  with `kubernetes-validate` as a core PodTemplate; a missing schema fails, never skips;
* AlignmentRuns (the examples and samples) and the status the planner writes against the
  project's generated CRD schema;
* manifests/*.yaml with `kubernetes-validate` (the Helm chart: test_helm_chart.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate   # the dev extra: a missing package fails here, as a missing schema does
import pytest
import yaml

from xwin_operator.api.crd import crd
from xwin_operator.api.spec_io import load_run
from xwin_operator.core.planner import decide
from xwin_operator.core.types import ChildState, Observed, PatchStatus
from xwin_operator.kube.plan_print import planned_manifests

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "schemas"   # Kubeflow's CRDs, with their sources (README.md)
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported (podFailurePolicy beta, on by default) and newest bundled
RUN_FILES = sorted([REPO / "examples/tiny/run-training.yaml", *(REPO / "manifests/samples").glob("*.yaml")])
BUILTIN = ("Deployment", "Service", "Job")


def _strict(schema: dict) -> dict:
    """A CRD schema where an object with `properties` refuses other keys."""
    node = copy.deepcopy(schema)

    def walk(n: object) -> None:
        if isinstance(n, dict):
            if "properties" in n and "additionalProperties" not in n \
                    and not n.get("x-kubernetes-preserve-unknown-fields"):
                n["additionalProperties"] = False
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node)
    return node


def _validate_crd_object(schema: dict, obj: dict) -> None:
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    sub = {k: v for k, v in schema.items() if k != "properties"}
    sub["properties"] = {k: v for k, v in schema["properties"].items()
                         if k not in ("apiVersion", "kind", "metadata")}
    # Draft 4: OpenAPI v3.0 schemas use its boolean exclusiveMinimum
    jsonschema.Draft4Validator(_strict(sub)).validate(body)


def kubeflow_schema(file: str, version: str) -> dict:
    """The openAPIV3Schema of `version` in tests/schemas/`file`; a missing file or version fails."""
    path = SCHEMAS / file
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO)} is missing: the Kubeflow CRD schemas live with the tests "
                    f"(tests/schemas/README.md says where each comes from)")
    doc = yaml.safe_load(path.read_text())
    found = [v for v in doc["spec"]["versions"] if v["name"] == version]
    if not found:
        pytest.fail(f"{path.relative_to(REPO)} has no version {version} "
                    f"(it has {', '.join(v['name'] for v in doc['spec']['versions'])})")
    return found[0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    return kubeflow_schema("kubeflow.org_pytorchjobs.yaml", "v1")


@pytest.fixture(scope="module")
def alignmentrun_schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module", params=[p.relative_to(REPO).as_posix() for p in RUN_FILES])
def planned(request) -> list[dict]:
    run = load_run(REPO / request.param)
    return [m for _, _, m in planned_manifests(run, uid="6d1c8e3a-1111-2222-3333-444455556666")]


def test_every_run_file_plans_children(planned):
    assert planned, "xwin plan printed nothing"
    names = [(m["kind"], m["metadata"]["name"]) for m in planned]
    assert len(names) == len(set(names)), "two children with the same kind and name"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(planned, version):
    checked = 0
    for m in planned:
        if m["kind"] in BUILTIN:
            kubernetes_validate.validate(m, version, strict=True)
            checked += 1
    assert checked or all(m["kind"] == "PyTorchJob" for m in planned)


def test_pytorchjobs_validate_against_the_kubeflow_crd(planned, pytorchjob_schema):
    jobs = [m for m in planned if m["kind"] == "PyTorchJob"]
    for job in jobs:
        _validate_crd_object(pytorchjob_schema, job)
        assert job["metadata"]["name"][0].isalpha() and len(job["metadata"]["name"]) <= 52
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": job["metadata"]["name"]}, "template": replica["template"]}
            kubernetes_validate.validate(template, K8S_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def trainjob_schema() -> dict:
    return kubeflow_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")


@pytest.mark.parametrize("path", [p.relative_to(REPO).as_posix() for p in RUN_FILES])
def test_trainjobs_validate_against_the_trainer_crd(path, trainjob_schema):
    """With `scheduling.launcher: TrainJob`, every training child is a TrainJob that validates
    strictly against Kubeflow Trainer's CRD, carrying what the PyTorchJob carried."""
    run = load_run(REPO / path)
    pytorch = [m for _, _, m in planned_manifests(run) if m["kind"] == "PyTorchJob"]
    run.spec.scheduling.launcher = "TrainJob"
    run.spec.scheduling.queueName = "gpu-queue"
    planned = [m for _, _, m in planned_manifests(run)]
    jobs = [m for m in planned if m["kind"] == "TrainJob"]
    assert len(jobs) == len(pytorch) and not any(m["kind"] == "PyTorchJob" for m in planned)
    for job, twin in zip(jobs, pytorch):
        _validate_crd_object(trainjob_schema, job)
        master = twin["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        trainer = job["spec"]["trainer"]
        assert job["metadata"]["name"] == twin["metadata"]["name"]
        assert trainer["command"] == master["command"] and trainer["env"] == master["env"]
        assert trainer["resourcesPerNode"] == master["resources"]
        assert trainer["numNodes"] == sum(r["replicas"] for r in twin["spec"]["pytorchReplicaSpecs"].values())
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": {"spec": {**pod["template"]["spec"]["template"]["spec"],
                                                            "containers": [{**master, "name": "node"}]}}},
                                     K8S_VERSIONS[-1], strict=True)


def test_the_sample_training_runtime_validates():
    schema = kubeflow_schema("trainer.kubeflow.org_clustertrainingruntimes.yaml", "v1alpha1")
    runtime = yaml.safe_load((REPO / "manifests" / "trainer" / "torch-distributed.yaml").read_text())
    _validate_crd_object(schema, runtime)
    assert runtime["metadata"]["name"] == "torch-distributed"  # the default scheduling.trainingRuntime


def test_the_kubeflow_schemas_live_with_the_tests_and_a_missing_one_fails():
    listed = (SCHEMAS / "README.md").read_text()
    files = sorted(p.name for p in SCHEMAS.glob("*.yaml"))
    assert files == ["kubeflow.org_pytorchjobs.yaml", "monitoring.coreos.com_servicemonitors.yaml",
                     "trainer.kubeflow.org_clustertrainingruntimes.yaml", "trainer.kubeflow.org_trainjobs.yaml"]
    assert all(f"`{name}`" in listed for name in files), "tests/schemas/README.md: a schema without its source"
    with pytest.raises(pytest.fail.Exception, match="tests/schemas/absent.yaml is missing"):
        kubeflow_schema("absent.yaml", "v1")


def test_a_typo_in_a_pytorchjob_is_caught(pytorchjob_schema):
    run = load_run(REPO / "examples/tiny/run-training.yaml")
    job = next(m for _, _, m in planned_manifests(run) if m["kind"] == "PyTorchJob")
    job = copy.deepcopy(job)
    job["spec"]["runPolicy"]["backofLimit"] = 3
    with pytest.raises(jsonschema.ValidationError, match="backofLimit"):
        _validate_crd_object(pytorchjob_schema, job)


@pytest.mark.parametrize("path", [p.relative_to(REPO).as_posix() for p in RUN_FILES])
def test_run_files_validate_against_the_generated_crd(path, alignmentrun_schema):
    doc = yaml.safe_load((REPO / path).read_text())
    _validate_crd_object(alignmentrun_schema, doc)


def test_planner_status_validates_against_the_crd(alignmentrun_schema):
    run = load_run(REPO / "manifests/samples/xwin-7b.yaml")
    children = [ChildState("PyTorchJob", "xwin-7b-sft-1", "sft", "train", 1, "Failed",
                           reason="BackoffLimitExceeded", exit_code=1, created="2024-01-01T00:00:00Z",
                           finished="2024-01-01T00:10:00Z")]
    acts = decide(run, Observed(children=children, markers={}, now="2024-01-01T00:11:00Z"),
                  None, generation=3)
    status = next(a.status for a in acts if isinstance(a, PatchStatus))
    doc = yaml.safe_load((REPO / "manifests/samples/xwin-7b.yaml").read_text())
    _validate_crd_object(alignmentrun_schema, {**doc, "status": json.loads(json.dumps(status))})


def test_xwin_plan_prints_a_yaml_stream_kubectl_reads():
    out = subprocess.run([sys.executable, "-m", "xwin_operator.cli", "plan",
                          str(REPO / "manifests/samples/xwin-7b.yaml")],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} == {"PyTorchJob", "Deployment", "Service", "Job"}
    assert "# stage: sft" in out and "# stage: evaluate" in out


def _static_manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted([*(REPO / "manifests").glob("*.yaml"), *(REPO / "manifests/crd").glob("*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


@pytest.mark.parametrize("name,doc", _static_manifests(),
                         ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_deploy_manifests_validate(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
