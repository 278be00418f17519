"""Training stages under torchrun (data parallel, zeroStage 0) give the single-process result.

Each stage runs as a pod runs it, `torchrun -m xwin_jobs <stage> --task FILE` with two
ranks (gloo on CPU, nccl on GPU), and as one plain process on the same task; the saved
weights must agree, only one marker may be written, and the metrics must be equal.
The plans below make ranks' shares uneven (3 micro-batches per step over 2 ranks) and give a
rank an empty share in some steps (a final step of one micro-batch).
"""

import pytest
from training_runs import MARKER, TORCHRUN, assert_same_training, job_env, make_world, run_command, \
    run_stage_both_ways


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


def test_sft_two_ranks_match_one_process(world, tmp_path):
    single, ddp = run_stage_both_ways(world, tmp_path, "sft",
                                      {"model": world["base"], "data": world["conversations"]})
    metrics = assert_same_training(single, ddp, tolerance=1e-4)
    assert metrics["steps"] == 6  # 14 examples / 6 per step -> 3 steps, 2 epochs

    # a rerun under torchrun is a no-op on every rank: the marker is left as it is
    marker = (ddp / MARKER).read_text()
    task_file = tmp_path / "ddp.json"
    again = run_command([*TORCHRUN, "sft", "--task", str(task_file)], job_env("cpu"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("stage sft: already done") == 2
    assert (ddp / MARKER).read_text() == marker


@pytest.mark.slow
def test_dpo_two_ranks_match_one_process(world, tmp_path):
    single, ddp = run_stage_both_ways(world, tmp_path, "dpo",
                                      {"model": world["base"], "pairs": world["pairs"]},
                                      pairsFrom="pairs", beta=0.5)
    metrics = assert_same_training(single, ddp, tolerance=1e-4)
    assert metrics["steps"] == 4 and "trainRewardAccuracy" in metrics


@pytest.mark.slow
def test_reward_model_two_ranks_match_one_process(world, tmp_path):
    single, ddp = run_stage_both_ways(world, tmp_path, "rewardModel",
                                      {"model": world["base"], "pairs": world["pairs"]},
                                      heldOutFraction=0.3)
    metrics = assert_same_training(single, ddp, tolerance=1e-4)
    assert metrics["heldOutPairs"] == 3 and "heldOutAccuracy" in metrics


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_sft_two_ranks_on_gpu(world, tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("nccl data parallelism needs two GPUs (one rank per GPU)")
    single, ddp = run_stage_both_ways(world, tmp_path, "sft",
                                      {"model": world["base"], "data": world["conversations"]},
                                      device="cuda", grad_rel=2e-2)
    # bf16 autocast: reductions in another order move weights by more than fp32 rounding
    assert_same_training(single, ddp, tolerance=5e-3)
