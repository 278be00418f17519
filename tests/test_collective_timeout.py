"""Bounded waits (issue 23, item 3): `training.collectiveTimeoutMinutes` (default 30) is the
timeout of the process group a training stage joins, torch.distributed's and DeepSpeed's, so a
dead rank stops the job instead of holding every GPU for hours; the final upload runs after
every rank has left the group (no collective waits for it)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xwin_jobs.training.config import TrainingConfig, TrainingConfigError, collective_timeout
from xwin_operator.api.spec_io import SpecError, parse_run
from xwin_operator.core.tasks import stage_task
from test_spec import MINIMAL

ROOT = Path(__file__).resolve().parents[1]
PROBE = [str(ROOT / "tests" / "collective_probe.py")]
RUN = MINIMAL + "      training: TRAINING\n"


def test_the_setting_defaults_to_30_minutes_and_reaches_the_task():
    assert collective_timeout({}) == datetime.timedelta(minutes=30)
    assert TrainingConfig.from_params({}).collective_timeout == datetime.timedelta(minutes=30)
    task = stage_task(parse_run(RUN.replace("TRAINING", "{collectiveTimeoutMinutes: 10}")), "sft")
    assert collective_timeout(task.params["training"]) == datetime.timedelta(minutes=10)
    unset = stage_task(parse_run(RUN.replace("TRAINING", "{}")), "sft")
    assert "collectiveTimeoutMinutes" not in unset.params["training"]  # digests as before
    with pytest.raises(SpecError, match="collectiveTimeoutMinutes"):
        parse_run(RUN.replace("TRAINING", "{collectiveTimeoutMinutes: 0}"))
    with pytest.raises(TrainingConfigError, match=r"params.training.collectiveTimeoutMinutes: must be > 0"):
        TrainingConfig.from_params({"collectiveTimeoutMinutes": -1})


def run(cmd: list[str], timeout: int = 240) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_a_rank_that_stays_out_of_a_collective_fails_the_others_after_the_timeout():
    """2 gloo ranks under torchrun, collectiveTimeoutMinutes 0.1 (6 s): rank 1 never enters the
    barrier; rank 0's barrier fails after about 6 s (not 30 minutes, not 4 hours)."""
    out = run([sys.executable, "-m", "xwin_jobs.launch", "--standalone", "--nproc-per-node", "2",
               *PROBE, "torch", "0.1"])
    ranks = {o["rank"]: o for o in out}
    assert ranks[0]["timeout_s"] == ranks[1]["timeout_s"] == pytest.approx(6.0)
    assert ranks[0]["barrier"] != "passed" and 5.0 <= ranks[0]["waited_s"] < 30.0


def test_deepspeed_gets_the_same_timeout():
    (out,) = run([sys.executable, *PROBE, "deepspeed", "7"])
    assert out["timeout_s"] == pytest.approx(7 * 60) and out["deepspeed"]


@pytest.mark.slow
def test_the_other_ranks_are_done_before_rank_0_uploads_the_model(tmp_path_factory, tmp_path):
    """2 gloo ranks train a tiny SFT: the rank that is not rank 0 finishes ("stage sft done")
    before rank 0 has uploaded model/ (its "model -> ..." line): nobody waits in a collective,
    bounded by collectiveTimeoutMinutes, while a 140 GB model uploads."""
    import re

    from training_runs import TORCHRUN, job_env, make_world, run_command, stage_task as task_of

    world = make_world(tmp_path_factory)
    task = task_of(world, "sft", "upload-order", {"model": f"file://{world['base']}",
                                                   "data": f"file://{world['conversations']}"},
                   {"epochs": 1, "learningRate": 1e-3, "globalBatchSize": 4, "maxLength": 96,
                    "zeroStage": 0, "checkpointEvery": 0, "maxSteps": 1, "gradientCheckpointing": False,
                    "collectiveTimeoutMinutes": 0.5})
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    done = run_command([*TORCHRUN, "sft", "--task", str(task_file)], job_env("cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO "
    finished = re.findall(stamp + r"xwin_jobs: stage sft done", done.stderr, re.M)
    uploaded = re.findall(stamp + r"xwin_jobs.stage: model -> ", done.stderr, re.M)
    assert len(finished) == 2 and len(uploaded) == 1
    assert min(finished) <= uploaded[0] <= max(finished)
