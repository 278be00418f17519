"""Exact resume: a training stage stopped mid-run and started again with the same task ends
with the weights and step count of an uninterrupted run.

* SIGTERM (what Kubernetes sends before preemption) to torchrun, 2 ZeRO-3 ranks: a checkpoint
  after the current optimizer step, exit code 143 (128 + SIGTERM), and the restart redoes
  0 steps.
* SIGKILL (no warning) of the whole group, 2 ranks: the restart resumes from the last
  `checkpointEvery` checkpoint, redoing at most checkpointEvery steps.
* Checkpoint selection (one process): a checkpoint for other inputs or without its marker
  (a half-finished upload) is ignored; a corrupt one is an error naming the file and the
  stage falls back to the previous complete one.

Equality: max abs weight difference <= 1e-6 (fp32 on CPU; measured 0.0: the checkpoint
restores model, optimizer, scheduler and RNG states exactly and the batch plan is a pure
function of the seed).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from training_runs import ROOT, TORCHRUN, TRAINING, job_env, make_world, run_command, stage_task

from xwin_jobs.store import MARKER

RESUME = {**TRAINING, "epochs": 3, "globalBatchSize": 4, "microBatchSize": 2, "checkpointEvery": 0,
          "lrScheduler": "cosine", "weightDecay": 0.01, "keepCheckpoints": 10}
STEP_LINE = re.compile(r"xwin_jobs.train: step (\d+)/(\d+) ")
EXACT = 1e-6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


def _task_file(world, tmp_path, name: str, training: dict) -> tuple[Path, Path]:
    task = stage_task(world, "sft", name, {"model": world["base"], "data": world["conversations"]},
                      training)
    path = tmp_path / f"{name}.json"
    path.write_text(task.to_json())
    return path, Path(task.output[len("file://"):])


def _run_until(cmd: list[str], step: int, sig: int) -> tuple[int, str]:
    """Start `cmd` in its own session; once a rank logs optimizer step `step`, send `sig` to
    the launcher (SIGTERM, as the kubelet does) or, SIGKILL, to every process of the tree at
    once (as a killed container's; torchrun starts its workers in sessions of their own)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=job_env("cpu"))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = STEP_LINE.search(line)
            if match and int(match.group(1)) == step:
                if sig == signal.SIGKILL:
                    _kill_tree(proc.pid)
                else:
                    proc.send_signal(sig)
                break
        lines += proc.stdout.readlines()
        return proc.wait(timeout=120), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _kill_tree(pid: int) -> None:
    import psutil

    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _steps_run(log: str) -> list[int]:
    return sorted({int(m.group(1)) for m in STEP_LINE.finditer(log)})


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "model" / "model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _uninterrupted(world, tmp_path, training: dict, launcher: list[str]) -> Path:
    task_file, out = _task_file(world, tmp_path, "whole", training)
    done = run_command([*launcher, "sft", "--task", str(task_file)], job_env("cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_after_the_step_and_the_restart_redoes_nothing(world, tmp_path):
    training = {**RESUME, "zeroStage": 3}
    whole = _uninterrupted(world, tmp_path, training, TORCHRUN)
    task_file, out = _task_file(world, tmp_path, "preempted", training)
    cmd = [*TORCHRUN, "sft", "--task", str(task_file)]
    code, first = _run_until(cmd, 5, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, first[-3000:]
    assert "preempted: stopped by SIGTERM after optimizer step" in first
    stopped = max(_steps_run(first))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped}"]
    assert not (out / MARKER).exists()

    again = run_command(cmd, job_env("cpu"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming after step {stopped}" in again.stderr
    assert _steps_run(again.stderr)[0] == stopped + 1  # 0 steps redone
    resumed, uninterrupted = (json.loads((f / "metrics.json").read_text()) for f in (out, whole))
    # one rank of the two tokenized the first attempt; the restart read its Arrow files
    assert (uninterrupted.pop("tokenizedRanks"), uninterrupted.pop("tokenizedReused")) == (1, False)
    assert (resumed.pop("tokenizedRanks"), resumed.pop("tokenizedReused")) == (0, True)
    assert resumed == uninterrupted
    assert _max_diff(whole, out) <= EXACT


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(world, tmp_path):
    training = {**RESUME, "zeroStage": 2, "checkpointEvery": 2}
    whole = _uninterrupted(world, tmp_path, training, TORCHRUN)
    task_file, out = _task_file(world, tmp_path, "killed", training)
    cmd = [*TORCHRUN, "sft", "--task", str(task_file)]
    code, first = _run_until(cmd, 7, signal.SIGKILL)  # mid epoch 2 (4 steps per epoch)
    assert code == -signal.SIGKILL
    again = run_command(cmd, job_env("cpu"))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int(re.search(r"resuming after step (\d+)", again.stderr).group(1))
    assert resumed in (6, 4) and max(_steps_run(first)) - resumed <= training["checkpointEvery"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    assert _max_diff(whole, out) <= EXACT


@pytest.mark.slow
def test_checkpoint_selection_other_inputs_half_uploaded_and_corrupt(world, tmp_path):
    single = [sys.executable, "-m", "xwin_jobs"]
    training = {**RESUME, "epochs": 2, "checkpointEvery": 2}  # 8 steps, checkpoints 2, 4, 6
    whole = _uninterrupted(world, tmp_path, training, single)
    saved = whole / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["step-2", "step-4", "step-6"]

    # other inputs: the checkpoints are ignored, training starts at step 1
    other_file, other = _task_file(world, tmp_path, "other", {**training, "learningRate": 5e-4})
    shutil.copytree(saved, other / "checkpoints")
    done = run_command([*single, "sft", "--task", str(other_file)], job_env("cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ignored, it was made for other inputs" in done.stderr
    assert "resuming" not in done.stderr and _steps_run(done.stderr)[0] == 1

    # step-6 half uploaded (no marker), step-4 corrupt: falls back to step-2, same result
    task_file, out = _task_file(world, tmp_path, "fallback", training)
    shutil.copytree(saved, out / "checkpoints")
    (out / "checkpoints" / "step-6" / "_CHECKPOINT.json").unlink()
    corrupt = out / "checkpoints" / "step-4" / "state" / "torch_state.pt"
    corrupt.write_bytes(corrupt.read_bytes()[:100] + b"garbage")
    done = run_command([*single, "sft", "--task", str(task_file)], job_env("cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step-6/: ignored, it is incomplete" in done.stderr
    assert re.search(r"step-4/: cannot be resumed: .*step-4/state/torch_state.pt: corrupt", done.stderr)
    assert "resuming after step 2" in done.stderr
    assert _max_diff(whole, out) <= EXACT
    # on success the checkpoints are pruned to keepCheckpoints (10 here: all complete ones kept)
    assert (out / "checkpoints" / "step-2" / "_CHECKPOINT.json").is_file()


def test_launcher_exit_code_keeps_a_signal_a_signal():
    """A PyTorchJob restarts exit codes >= 128 only: workers killed by a signal (negative
    codes) or preempted (143) make the launcher exit 128 + signal; a bug stays 1."""
    from xwin_jobs.launch import worker_exit_code

    assert worker_exit_code([-9]) == 137 and worker_exit_code([143, 143]) == 143
    assert worker_exit_code([1]) == 1 and worker_exit_code([143, 1]) == 1
