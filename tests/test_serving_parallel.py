"""A vLLM server's parallelism and the GPUs its pod requests (issue 23, item 4): tensorParallel
x pipelineParallel is gpusPerReplica (its default), anything else is refused by `xwin validate`
naming the field and the numbers; maxModelLen and gpuMemoryUtilization reach vLLM's arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xwin_jobs.vllm_server import vllm_server_args
from xwin_operator.api.spec_io import SpecError, load_run, parse_run
from xwin_operator.core.tasks import stage_task
from xwin_operator.kube.plan_print import planned_manifests

ROOT = Path(__file__).resolve().parents[1]
RUN = """\
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {name: r70, namespace: ns}
spec:
  baseModel: s3://models/llama-70b/
  storage: {uri: s3://artifacts/runs}
  judge: {}
  stages:
    pairs:
      prompts: s3://data/p.jsonl
      policy: base
      serving: SERVING
"""


def run_with(serving: str, defaults: str = ""):
    return parse_run(RUN.replace("SERVING", serving) + defaults)


def test_gpus_per_replica_defaults_to_tensor_x_pipeline_parallel():
    run = run_with("{tensorParallel: 4, pipelineParallel: 2, maxModelLen: 8192, gpuMemoryUtilization: 0.85}")
    serving = stage_task(run, "pairs").params["serving"]
    assert serving["gpusPerReplica"] == 8
    (deployment,) = [m for _, _, m in planned_manifests(run, "uid") if m["kind"] == "Deployment"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    args = " ".join(c["command"])
    for expected in ("--tensor-parallel-size 4", "--pipeline-parallel-size 2", "--max-model-len 8192",
                     "--gpu-memory-utilization 0.85"):
        assert expected in args
    # unset: one GPU, the arguments as before
    plain = stage_task(run_with("{}"), "pairs").params["serving"]
    assert plain["gpusPerReplica"] == 1 and "pipelineParallel" not in plain
    assert "--pipeline-parallel-size" not in vllm_server_args("/m", plain)
    assert "--gpu-memory-utilization" not in vllm_server_args("/m", plain)
    # a CPU server (gpusPerReplica 0) gets no GPU memory share
    assert "--gpu-memory-utilization" not in vllm_server_args(
        "/m", {"gpuMemoryUtilization": 0.5, "maxModelLen": 256}, device="cpu")


@pytest.mark.parametrize("serving,defaults,path,numbers", [
    ("{gpusPerReplica: 1, tensorParallel: 8}", "", "spec.stages.pairs.serving.gpusPerReplica",
     "1 GPU(s) per server, but tensorParallel 8 x pipelineParallel 1 = 8"),
    ("{tensorParallel: 2, pipelineParallel: 2}", "  defaults: {serving: {gpusPerReplica: 2}}\n",
     "spec.defaults.serving.gpusPerReplica", "2 GPU(s) per server, but tensorParallel 2 x pipelineParallel 2 = 4"),
])
def test_validate_refuses_a_server_whose_parallelism_does_not_match_its_gpus(tmp_path, serving, defaults,
                                                                             path, numbers):
    f = tmp_path / "run.yaml"
    f.write_text(RUN.replace("SERVING", serving) + defaults)
    with pytest.raises(SpecError):
        load_run(f)
    res = subprocess.run([sys.executable, "-m", "xwin_operator.cli", "validate", str(f)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1
    assert path in res.stderr and numbers in res.stderr, res.stderr
    # a CPU server (0 GPUs) is not a mismatch
    run_with("{gpusPerReplica: 0, tensorParallel: 1}")
