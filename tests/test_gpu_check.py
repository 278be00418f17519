"""A pod that requested GPUs but cannot see them stops before training (issue 23, item 2),
naming what it saw, with exit 1: not restarted under the PyTorchJob's `restartPolicy:
ExitCode` (1-127 are permanent) and failing a Job at once (its podFailurePolicy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xwin_jobs.gpu_check import GPU_ENV, gpu_problem
from xwin_jobs.task import StageTask
from xwin_operator.api.spec_io import load_run
from xwin_operator.kube.plan_print import planned_manifests

ROOT = Path(__file__).resolve().parents[1]


def test_the_message_names_what_was_seen():
    facts = {"devices": 4, "torch": "2.11.0+cu130", "cuda": "13.0", "driver": "535.104.05",
             "cuda_visible": "unset", "nvidia_visible": "all"}
    message = gpu_problem(8, 8, facts)
    for part in ("requested 8 GPU(s)", "for 8 local rank(s)", "torch sees 4 CUDA device(s)",
                 "torch 2.11.0+cu130 built for CUDA 13.0", "NVIDIA driver 535.104.05",
                 "NVIDIA_VISIBLE_DEVICES=all"):
        assert part in message
    assert gpu_problem(8, 8, {**facts, "devices": 8}) is None
    assert gpu_problem(0, 1, {"devices": 0}) is None  # a CPU pod asks nothing


def test_training_pods_that_request_gpus_are_told_how_many():
    def train_envs(path):
        run = load_run(ROOT / path)
        out = {}
        for _, _, m in planned_manifests(run, "uid"):
            if m["kind"] == "PyTorchJob":
                (c,) = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
                out[m["metadata"]["name"]] = {e["name"]: e.get("value") for e in c["env"]}
        return out

    big = train_envs("manifests/samples/xwin-7b.yaml")
    assert big and all(env[GPU_ENV] == "8" for env in big.values())
    tiny = train_envs("manifests/samples/tiny.yaml")  # gpusPerNode: 0
    assert tiny and all(GPU_ENV not in env for env in tiny.values())


@pytest.mark.parametrize("launcher", [[], pytest.param(["-m", "xwin_jobs.launch", "--standalone", "--nproc-per-node", "2"],
                                                       marks=pytest.mark.slow)],
                         ids=["one-process", "torchrun-2-ranks"])
def test_a_task_that_requests_gpus_stops_before_training_on_this_cpu_machine(tmp_path, launcher):
    out = tmp_path / "runs" / "sft"
    task = StageTask(stage="sft", output=f"file://{out}/",
                     inputs={"model": f"file://{tmp_path}/no-model/", "data": f"file://{tmp_path}/d.jsonl"},
                     params={"training": {"zeroStage": 0}, "resources": {"nodes": 1, "gpusPerNode": 2}},
                     run={"namespace": "t", "name": "gpu"})
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    cmd = [sys.executable, *launcher, "-m", "xwin_jobs", "sft", "--task", str(task_file)]
    env = {**os.environ, GPU_ENV: "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "requested 2 GPU(s)" in done.stderr and "torch sees 0 CUDA device(s)" in done.stderr
    assert f"for {2 if launcher else 1} local rank(s)" in done.stderr
    assert "Stopping before training" in done.stderr and "Traceback" not in done.stderr.split("error:")[-1]
    assert not out.exists()  # nothing written: it stopped before the store
