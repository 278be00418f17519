"""Helpers of the multi-rank training tests (test_training_ddp, test_training_zero): a tiny
world (model, conversations, pairs), stage tasks, running `python -m xwin_jobs` and
torchrun (through `python -m xwin_jobs.launch`, as a PyTorchJob pod does), and comparing
the outputs of two runs.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_files import tiny_model_module, write_jsonl

from xwin_jobs.store import MARKER
from xwin_jobs.task import StageTask

ROOT = Path(__file__).resolve().parents[1]
# DDP plans make ranks' shares uneven (3 micro-batches per step over 2 ranks) and give a rank
# an empty share in some steps (a final step of one micro-batch).
TRAINING = {"epochs": 2, "learningRate": 1e-3, "globalBatchSize": 6, "microBatchSize": 2,
            "maxLength": 96, "seed": 3, "checkpointEvery": 2, "warmupRatio": 0.0,
            "weightDecay": 0.0, "lrScheduler": "linear", "maxSteps": 0, "zeroStage": 0,
            "gradientCheckpointing": False}
TORCHRUN = [sys.executable, "-m", "xwin_jobs.launch", "--standalone", "--nproc-per-node", "2",
            "-m", "xwin_jobs"]
TIMEOUT_S = 300  # a ZeRO run on a busy 2-core machine takes a minute or two
GRAD_LINE = re.compile(r"step (\d+)/\d+ .* grad ([0-9.]+) ")


def make_world(tmp_path_factory):
    """A tiny base model, 14 conversations, 10 pairs (last step: one micro-batch) and a
    scored set of 10 prompts with 4 responses each."""
    root = tmp_path_factory.mktemp("ddp")
    tiny = tiny_model_module()
    rng = random.Random(1)
    conversations, pairs, scored = [], [], []
    for i in range(14):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = [{"role": "user", "content": f"what is {a} plus {b}?"}]
        answer = {"role": "assistant", "content": f"{a} plus {b} is {a + b}"}
        conversations.append({"id": f"c{i}", "messages": question + [answer]})
        if i < 10:
            pairs.append({"id": f"p{i}", "prompt": question, "chosen": [answer],
                          "rejected": [{"role": "assistant", "content": "no idea, sorry"}]})
            scored.append({"id": f"s{i}", "prompt": question,
                           "responses": [{"content": f"{a} plus {b} is {a + b + d}", "score": -abs(d)}
                                         for d in (2, 0, -1, 1)]})
    corpus = [m["content"] for c in conversations for m in c["messages"]] + [
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
        "no idea, sorry"]
    base = tiny.build_tiny_model(root / "base", corpus, seed=0)
    return {"root": root, "base": str(base),
            "conversations": write_jsonl(root / "data" / "sft.jsonl", conversations),
            "pairs": write_jsonl(root / "data" / "pairs.jsonl", pairs),
            "scored": write_jsonl(root / "data" / "scored.jsonl", scored)}


def stage_task(world, stage: str, name: str, inputs: dict, training: dict | None = None,
               **params) -> StageTask:
    return StageTask(stage=stage, output=f"file://{world['root']}/runs/{name}/", inputs=inputs,
                     params={"training": dict(training or TRAINING), **params},
                     run={"namespace": "t", "name": name})


def run_command(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole group (torchrun and its workers)."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} timed out after {TIMEOUT_S}s\n{err[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def job_env(device: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_stage_both_ways(world, tmp_path, stage: str, inputs: dict, device: str = "cpu",
                        grad_rel: float = 1e-3, training: dict | None = None,
                        logs: list | None = None, **params):
    """(single-process output folder, 2-rank output folder) of the same task (the single
    process at zeroStage 0 without offload, the ranks at `training`'s), and the logged (step, grad norm)
    lines of each run (every rank's). `logs`, when given, gets each run's output (stdout and
    stderr)."""
    training = dict(training or TRAINING)
    outs, grads = [], []
    zero = training["zeroStage"]
    for name, launcher, settings in (
            ("single", [sys.executable, "-m", "xwin_jobs"],
             {**training, "zeroStage": 0, "offloadOptimizer": False}),
            (f"zero{zero}" if zero else "ddp", TORCHRUN, training)):
        # the run's name carries the ranks' zeroStage: the single-process run of another
        # zeroStage's test would otherwise be this one's (same task, done, nothing logged)
        task = stage_task(world, stage, f"{stage}-{device}-z{zero}-{name}", inputs, settings, **params)
        task_file = tmp_path / f"{name}.json"
        task_file.write_text(task.to_json())
        done = run_command([*launcher, stage, "--task", str(task_file)], job_env(device))
        assert done.returncode == 0, done.stderr[-4000:]
        if logs is not None:
            logs.append(done.stdout + done.stderr)
        outs.append(Path(task.output[len("file://"):]))
        grads.append(sorted(set(GRAD_LINE.findall(done.stderr))))
    # DDP averages gradients over ranks: the loss weighting must undo it, or the pre-clip
    # gradient norm (and clipping) would differ from one process's (Adam hides the scale)
    single_grads, ddp_grads = ({int(step): float(g) for step, g in run} for run in grads)
    assert len(grads[1]) == len(ddp_grads)  # both ranks logged the same numbers
    assert single_grads and ddp_grads == pytest.approx(single_grads, rel=grad_rel, abs=2e-3), \
        (single_grads, ddp_grads)
    return outs


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_training(single: Path, ddp: Path, tolerance: float) -> dict:
    markers = [p for p in ddp.rglob(MARKER)]
    assert markers == [ddp / MARKER]  # exactly one marker, the stage's own
    a, b = _weights(single / "model"), _weights(ddp / "model")
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff < tolerance, f"max abs weight difference {diff}"
    base = _weights(Path(json.loads((single / MARKER).read_text())["inputs"]["model"]))
    shared = base.keys() & b.keys()
    assert shared and any(float((base[k].float() - b[k].float()).abs().max()) > 1e-3
                          for k in shared)  # it trained
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (single, ddp))
    assert m1.keys() == m2.keys()
    # the batch geometry differs by design: the same micro-batches, split over the ranks
    assert (m1["ranks"], m2["ranks"]) == (1, 2) and m1["microBatchSize"] == m2["microBatchSize"]
    for key in m1.keys() - {"ranks", "gradientAccumulationSteps"}:
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5), key
    assert json.loads((ddp / MARKER).read_text())["metrics"] == m2
    assert _checkpoints(ddp) == _checkpoints(single)
    return m2


def _checkpoints(output: Path) -> list[str]:
    """The checkpoints a stage kept (none when its run was shorter than checkpointEvery)."""
    folder = output / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
