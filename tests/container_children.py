"""What the container tests run: the tiny AlignmentRun pointed at moto S3 and the loopback
judge, the children `xwin plan` renders for it, and each child's pod as podman containers.

* `tiny_spec`: examples/tiny/run.yaml with its data in an S3 bucket, the store's endpoint and
  Secret, the judge's URL and key Secret, a short SFT, and the launcher to render with.
* `planned`: (stage, step, manifest) of every child, as `xwin plan` prints them.
* `pod_of`: a child manifest's pod spec and the variables its controller injects (the
  Training Operator's / Trainer's PET_* rendezvous for one node).
* `PROBE`: what runs in each container instead of its command to check that the image has
  the command's interpreter, the modules it names (`-m`, and the imports of `-c` code) and
  writable mounts, as the manifest's user.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from kube.pods import free_port, training_operator_env
from kube.trainjob import pod_template as trainjob_pod

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"
IMAGES = {which: f"localhost/xwin-{which}:{VERSION}" for which in ("trainer", "sampler", "annotator", "operator")}
S3_SECRET, JUDGE_SECRET = "s3-credentials", "openai-api-key"
DATA_FILES = ("sft", "pair-prompts", "rs-prompts", "alpaca", "mt-bench")
SMALL_TASK = {"n_sft": 64, "n_pair_prompts": 6, "n_rs_prompts": 4, "n_alpaca": 4, "n_mt": 2}


def tiny_spec(bucket: str, endpoint: str, judge_url: str, launcher: str = "PyTorchJob",
              name: str = "tiny-xwin") -> dict[str, Any]:
    """examples/tiny/run.yaml, everything in `bucket` (`s3://name`): data under tiny/, the
    base model at tiny/base-model/, artifacts under runs/."""
    run = yaml.safe_load((ROOT / "examples" / "tiny" / "run.yaml").read_text())
    run["metadata"] = {"name": name, "namespace": "demo"}
    spec = run["spec"]
    spec["baseModel"] = f"{bucket}/tiny/base-model/"
    spec["storage"] = {"uri": f"{bucket}/runs", "endpoint": endpoint, "secretRef": S3_SECRET}
    spec["judge"] = {**spec["judge"], "baseURL": judge_url, "apiKeySecret": JUDGE_SECRET}
    spec["scheduling"] = {"launcher": launcher}
    spec["retries"] = {"maxAttempts": 1}
    stages = spec["stages"]
    stages["sft"] = {**stages["sft"], "data": f"{bucket}/tiny/sft.jsonl",
                     "training": {**stages["sft"]["training"], "maxSteps": 2}}
    stages["pairs"]["prompts"] = f"{bucket}/tiny/pair-prompts.parquet"  # the sampler reads Parquet
    stages["bestOfN"]["prompts"] = f"{bucket}/tiny/rs-prompts.jsonl"
    stages["evaluate"]["alpacaEval"]["prompts"] = f"{bucket}/tiny/alpaca.jsonl"
    stages["evaluate"]["mtBench"]["questions"] = f"{bucket}/tiny/mt-bench.jsonl"
    return run


def planned(run: dict[str, Any], server_port: int, config: Any = None) -> list[tuple[str, str, dict[str, Any]]]:
    """Every child manifest `xwin plan` prints for `run` with the operator's `config` (default:
    its defaults), naming the images `make images` builds and serving on `server_port`."""
    import dataclasses

    from xwin_operator.api.spec import AlignmentRun
    from xwin_operator.core.config import OperatorConfig
    from xwin_operator.kube.plan_print import planned_manifests

    config = dataclasses.replace(config or OperatorConfig(), trainer_image=IMAGES["trainer"],
                                 sampler_image=IMAGES["sampler"], annotator_image=IMAGES["annotator"],
                                 image_pull_policy="Never", server_port=server_port)
    return list(planned_manifests(AlignmentRun.model_validate(copy.deepcopy(run)), config=config))


def child(children: list[tuple[str, str, dict]], stage: str, step: str, kind: str) -> dict[str, Any]:
    return next(m for s, st, m in children if s == stage and st == step and m["kind"] == kind)


def pod_of(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]] | None:
    """(pod spec, injected env) of a child; None for a Service."""
    kind = manifest["kind"]
    if kind == "PyTorchJob":
        spec = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        return spec, training_operator_env(manifest["metadata"]["name"], "master", 0, 1, 1, free_port())
    if kind == "TrainJob":
        return trainjob_pod(manifest)["spec"], training_operator_env(manifest["metadata"]["name"], "master", 0, 1, 1, free_port())
    if kind in ("Job", "Deployment"):
        return manifest["spec"]["template"]["spec"], {}
    return None


def containers_of(manifest: dict[str, Any]) -> Iterator[tuple[dict, dict, dict[str, str]]]:
    """(pod spec, container, injected env) of every container of a child, init containers first."""
    found = pod_of(manifest)
    if found is None:
        return
    pod, injected = found
    for c in (pod.get("initContainers") or []) + pod["containers"]:
        yield pod, c, injected


def upload_task(store_client, bucket: str, work: Path) -> None:
    """The small tiny task (examples/tiny/make_task.py) and its base model into `bucket`; the
    pair prompts also as Parquet (tiny_spec's pairs stage reads that copy)."""
    import pyarrow.json
    import pyarrow.parquet

    for extra in (ROOT / "examples", ROOT / "examples" / "tiny"):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    import make_task

    paths = make_task.make_task(work, 0, **SMALL_TASK)
    name = bucket[len("s3://"):]
    for key in DATA_FILES:
        store_client.upload_file(str(paths[key]), name, f"tiny/{key}.jsonl")
    parquet = work / "pair-prompts.parquet"
    pyarrow.parquet.write_table(pyarrow.json.read_json(str(paths["pair-prompts"])), str(parquet))
    store_client.upload_file(str(parquet), name, "tiny/pair-prompts.parquet")
    for f in sorted(Path(paths["base-model"]).iterdir()):
        store_client.upload_file(str(f), name, f"tiny/base-model/{f.name}")


# The probe: argv[0] of the container (its interpreter) runs this with the command's argv.
PROBE = r"""
import ast, importlib.util, json, os, sys, tempfile
argv, mounts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
missing, modules = [], []
for i, a in enumerate(argv[:-1]):
    if a == "-m":
        modules.append(argv[i + 1])
    if a == "-c":
        for node in ast.walk(ast.parse(argv[i + 1])):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.append(node.module)
            elif isinstance(node, ast.Import):
                modules += [n.name for n in node.names]
for m in modules:
    try:
        found = importlib.util.find_spec(m)
    except ImportError:
        found = None
    if found is None:
        missing.append("module " + m)
for path in mounts:
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        missing.append("writable " + path + ": " + str(e))
print(json.dumps({"python": sys.executable, "modules": modules, "missing": missing}))
sys.exit(1 if missing else 0)
"""


def probe_command(argv: list[str], mounts: list[str]) -> list[str]:
    return [argv[0], "-c", PROBE, json.dumps(argv), json.dumps(mounts)]
