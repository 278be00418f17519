"""`training.compile`: the model's forward through torch.compile, eager where it cannot be.

A stage runs the way a pod runs it (`python -m xwin_jobs sft --task FILE`). The failing
platform is real: inductor's C++ compiler named by CXX does not exist, so every compile fails
there, as on a node without a compiler. Each run gets its own inductor cache, so no kernel
compiled earlier hides the compiler.
"""

import json
import logging
import sys
from pathlib import Path

import pytest
from training_runs import job_env, make_world, run_command, stage_task

from xwin_jobs.training.config import TrainingConfig, TrainingConfigError

TRAINING = {"epochs": 1, "learningRate": 1e-3, "globalBatchSize": 4, "microBatchSize": 2,
            "maxLength": 96, "seed": 3, "checkpointEvery": 0, "warmupRatio": 0.0,
            "weightDecay": 0.0, "lrScheduler": "linear", "maxSteps": 2, "zeroStage": 0,
            "gradientCheckpointing": False}
FAILED_LINE = "training.compile: torch.compile failed"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


def run_sft(world, tmp_path, name: str, training: dict, env: dict | None = None):
    """(metrics.json, stderr) of one sft run in its own process and inductor cache."""
    task = stage_task(world, "sft", name, {"model": world["base"], "data": world["conversations"]},
                      training)
    task_file = tmp_path / f"{name}.json"
    task_file.write_text(task.to_json())
    done = run_command([sys.executable, "-m", "xwin_jobs", "sft", "--task", str(task_file)],
                       {**job_env("cpu"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
                        **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    out = Path(task.output[len("file://"):])
    return json.loads((out / "metrics.json").read_text()), done.stderr


def test_a_platform_where_compile_fails_trains_eager_with_one_log_line_and_eager_numbers(world, tmp_path):
    eager, eager_log = run_sft(world, tmp_path, "eager", TRAINING)
    fallback, log = run_sft(world, tmp_path, "no-compiler", {**TRAINING, "compile": True},
                            env={"CXX": str(tmp_path / "no-such-g++")})
    assert log.count(FAILED_LINE) == 1, log[-3000:]
    assert FAILED_LINE not in eager_log and "torch.compile" not in eager_log
    # the failing call was rerun eagerly before anything had happened for it: the same run
    same = ("trainLoss", "initialTrainLoss", "steps", "trainTokens")
    assert {k: fallback[k] for k in same} == {k: eager[k] for k in same}


@pytest.mark.slow
def test_compile_trains_like_eager(world, tmp_path):
    eager, _ = run_sft(world, tmp_path, "eager-ref", TRAINING)
    compiled, log = run_sft(world, tmp_path, "compiled", {**TRAINING, "compile": True})
    assert "training.compile: the model's forward runs through torch.compile" in log
    assert FAILED_LINE not in log, log[-3000:]
    assert compiled["steps"] == eager["steps"] and compiled["trainTokens"] == eager["trainTokens"]
    assert compiled["trainLoss"] == pytest.approx(eager["trainLoss"], rel=1e-3)


def test_zero_stage_3_trains_eager_with_one_log_line_and_the_field_is_a_bool(caplog):
    import torch

    from xwin_jobs.training.compiled import compile_forward

    module = torch.nn.Linear(2, 2)
    forward = module.forward
    with caplog.at_level(logging.INFO, logger="xwin_jobs.train"):
        assert compile_forward(module, zero_stage=3) is False
    assert module.forward == forward
    assert [r.getMessage() for r in caplog.records] == [
        "training.compile: not applied under zeroStage 3 (DeepSpeed's parameter hooks); training eager"]
    assert TrainingConfig.from_params({"compile": True}).compile is True
    assert TrainingConfig.from_params({}).compile is False
    with pytest.raises(TrainingConfigError, match=r"params\.training\.compile: expected bool, got 'yes'"):
        TrainingConfig.from_params({"compile": "yes"})
