"""DeepSpeed ZeRO (zeroStage 1-3) behind the engine: two CPU ranks over gloo reach the
single-process result, the consolidated model loads with from_pretrained, and settings the
engine cannot run are refused before anything is written.

Tolerance: 1e-4 max abs weight difference after the whole run (measured: ZeRO-2 ~3e-7,
ZeRO-3 ~4e-6 on sft; fp32 reductions in another order, and ZeRO-3's partitioned flat
buffers, move the last bits), metrics rel 1e-4.
The plan (globalBatchSize 8 = 2 per micro-batch x 2 ranks x 2 accumulation steps) gives a
short last step (3 micro-batches for 2 ranks; for pairs one), so a rank runs zero-weighted
passes to join ZeRO's collectives.
"""

import json
import sys
from pathlib import Path

import pytest
from training_runs import TRAINING, assert_same_training, job_env, make_world, run_command, \
    run_stage_both_ways, stage_task

from xwin_jobs.store import MARKER
from xwin_jobs.training.config import TrainingConfig, TrainingConfigError
from xwin_jobs.training.zero_config import check_offload_memory, deepspeed_config

ZERO = {**TRAINING, "globalBatchSize": 8}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


def _inputs(world, stage: str) -> tuple[dict, dict]:
    model = {"model": world["base"]}
    return {"sft": ({**model, "data": world["conversations"]}, {}),
            "rewardModel": ({**model, "pairs": world["pairs"]}, {"heldOutFraction": 0.3}),
            "rejectionSampling": ({**model, "scored": world["scored"]}, {"topK": 1}),
            "dpo": ({**model, "pairs": world["pairs"]}, {"pairsFrom": "pairs", "beta": 0.5})}[stage]


def _check_loads(folder: Path, stage: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if stage == "rewardModel" else AutoModelForCausalLM
    model = cls.from_pretrained(folder / "model")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("stage,zero", [
    ("sft", 3),
    pytest.param("sft", 2, marks=pytest.mark.slow),
    pytest.param("rewardModel", 2, marks=pytest.mark.slow),
    pytest.param("rewardModel", 3, marks=pytest.mark.slow),
    pytest.param("rejectionSampling", 2, marks=pytest.mark.slow),
    pytest.param("rejectionSampling", 3, marks=pytest.mark.slow),
    pytest.param("dpo", 2, marks=pytest.mark.slow),
    pytest.param("dpo", 3, marks=pytest.mark.slow),
])
def test_zero_two_ranks_match_one_process(world, tmp_path, stage, zero):
    inputs, params = _inputs(world, stage)
    single, ranks = run_stage_both_ways(world, tmp_path, stage, inputs,
                                        training={**ZERO, "zeroStage": zero}, **params)
    metrics = assert_same_training(single, ranks, tolerance=TOLERANCE)
    _check_loads(ranks, stage)
    if stage == "dpo":  # the reference log-probabilities are stored, keyed, in the store's cache
        assert len(list(ranks.glob("_cache/reference-logprobs/*/logprobs.pt"))) == 1
    if stage == "rewardModel":
        assert metrics["heldOutPairs"] == 3


@pytest.mark.slow
def test_zero_on_one_process(world, tmp_path):
    """zeroStage with a world size of 1: DeepSpeed on one rank, same result as plain torch."""
    outs = []
    for zero in (0, 2):
        task = stage_task(world, "sft", f"one-{zero}", _inputs(world, "sft")[0],
                          {**ZERO, "zeroStage": zero, "maxSteps": 2})
        task_file = tmp_path / f"{zero}.json"
        task_file.write_text(task.to_json())
        done = run_command([sys.executable, "-m", "xwin_jobs", "sft", "--task", str(task_file)],
                           job_env("cpu"))
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(Path(task.output[len("file://"):]))
    assert "DeepSpeed ZeRO-2 on 1 rank(s)" in done.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "model" / "model.safetensors")) for o in outs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_offload_optimizer_trains_like_one_process(world, tmp_path, zero):
    """offloadOptimizer (ZeRO-Offload: the AdamW state in host memory, updated by
    DeepSpeedCPUAdam, which DeepSpeed compiles once with the system C++ compiler into the
    environment's extension cache; `make setup` prebuilds it) on 2 CPU ranks: the same
    losses and weights as the single process, the loss goes down, the model loads."""
    inputs, _ = _inputs(world, "sft")
    logs: list[str] = []
    single, ranks = run_stage_both_ways(world, tmp_path, "sft", inputs, logs=logs, training={
        **ZERO, "zeroStage": zero, "offloadOptimizer": True, "epochs": 3})
    assert "optimizer state offloaded to CPU" in logs[1] and "optimizer DeepSpeedCPUAdam" in logs[1]
    metrics = assert_same_training(single, ranks, tolerance=TOLERANCE)
    assert metrics["trainLoss"] < metrics["initialTrainLoss"]
    _check_loads(ranks, "sft")


def test_batch_that_zero_cannot_make_is_refused_before_anything_is_written(world, tmp_path):
    task = stage_task(world, "sft", "bad-batch", _inputs(world, "sft")[0],
                      {**ZERO, "globalBatchSize": 7, "zeroStage": 3})
    out = Path(task.output[len("file://"):])
    task_file = tmp_path / "bad.json"
    task_file.write_text(task.to_json())
    done = run_command([sys.executable, "-m", "xwin_jobs", "sft", "--task", str(task_file)],
                       job_env("cpu"))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "params.training.globalBatchSize" in last and "not a multiple" in last, last
    assert "Traceback" not in done.stderr
    assert not out.exists()  # the store is untouched


def test_deepspeed_config_is_built_from_the_settings():
    config = TrainingConfig.from_params({"globalBatchSize": 128, "microBatchSize": 4, "zeroStage": 3,
                                         "maxGradNorm": 0.5, "learningRate": 3e-5, "weightDecay": 0.1,
                                         "offloadOptimizer": True})
    ds = deepspeed_config(config, world_size=16, bf16=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (128, 4, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert not ds["optimizer"]["params"]["torch_adam"]  # DeepSpeedCPUAdam for the offloaded state
    assert not deepspeed_config(config, world_size=1, bf16=False)["bf16"]["enabled"]
    with pytest.raises(TrainingConfigError, match=r"globalBatchSize: 128 is not a multiple of "
                                                  r"microBatchSize 4 x 3 rank\(s\)"):
        deepspeed_config(config, world_size=3, bf16=False)


def test_one_optimizer_group_without_weight_decay():
    """No weight decay: every trainable parameter in one AdamW group (ZeRO runs a gradient-norm
    all-reduce and a parameter all-gather per group); with it, only >= 2-D weights decay."""
    import torch

    from xwin_jobs.training.engine import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].requires_grad_(False)
    (only,) = param_groups(model, 0.0)
    assert len(only["params"]) == 4 and only["weight_decay"] == 0.0
    decay, no_decay = param_groups(model, 0.1)
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert [p.dim() for p in no_decay["params"]] == [1, 1, 1] and no_decay["weight_decay"] == 0.0


def test_deepspeed_buffers_are_sized_from_the_hidden_size():
    """Issue 9: buckets of hidden^2 elements (between MIN_BUCKET and BUCKET) and small optimizer
    sub-groups, so ZeRO-3's transients stay far below a rank's share of the model state; a
    small model's parameters stay whole (PERSISTENCE) and its buckets are not cut into
    hundreds of collectives (the CPU step time)."""
    from xwin_jobs.training.zero_config import BUCKET, MIN_BUCKET, PERSISTENCE, SUB_GROUP

    config = TrainingConfig.from_params({"globalBatchSize": 2, "microBatchSize": 1, "zeroStage": 3})
    zero = deepspeed_config(config, world_size=2, bf16=False, hidden_size=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == PERSISTENCE  # > 10 x 4096
    assert zero["sub_group_size"] == SUB_GROUP <= 10_000_000
    small = deepspeed_config(config, world_size=2, bf16=False, hidden_size=128)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["stage3_max_live_parameters"] == MIN_BUCKET
    assert 128 * 128 < small["stage3_param_persistence_threshold"] == PERSISTENCE == 100_000
    big = deepspeed_config(config, world_size=2, bf16=False, hidden_size=16384)["zero_optimization"]
    assert big["reduce_bucket_size"] == big["stage3_max_live_parameters"] == BUCKET
    assert big["stage3_param_persistence_threshold"] == 10 * 16384
    unknown = deepspeed_config(config, world_size=2, bf16=False)["zero_optimization"]
    assert unknown["reduce_bucket_size"] == BUCKET


def test_large_host_allocations_are_mapped_on_their_own():
    from xwin_jobs.training.build import map_large_host_allocations

    assert map_large_host_allocations() is True  # glibc Linux: the test machines


def test_offload_without_enough_host_memory_names_the_field():
    with pytest.raises(TrainingConfigError, match=r"params.training.offloadOptimizer: .* needs "
                                                  r"52.2 GiB .* only 16.0 GiB"):
        # 7B parameters over 16 ranks, 8 of them on this node: 7e9 x 16 B / 16 x 8
        check_offload_memory(7_000_000_000, world_size=16, ranks_on_node=8,
                             available_bytes=16 * 2**30)
    check_offload_memory(7_000_000_000, world_size=16, ranks_on_node=8, available_bytes=64 * 2**30)
    with pytest.raises(TrainingConfigError, match="offloadOptimizer: needs zeroStage"):
        TrainingConfig.from_params({"zeroStage": 0, "offloadOptimizer": True})


def test_training_settings_check_is_pure_and_names_the_field():
    """Issue 9: what the operator can check at spec validation (nodes x gpusPerNode ranks)."""
    from xwin_jobs.training.config import check_training_settings

    ok = check_training_settings({"globalBatchSize": 32, "microBatchSize": 4, "zeroStage": 3}, 8)
    assert ok.zero_stage == 3
    check_training_settings({"globalBatchSize": 30, "microBatchSize": 4, "zeroStage": 0}, 8)  # DDP
    with pytest.raises(TrainingConfigError, match=r"spec.stages.sft.training.globalBatchSize: 32 is "
                                                  r"not a multiple of microBatchSize 4 x 16 rank"):
        check_training_settings({"globalBatchSize": 32, "microBatchSize": 4, "zeroStage": 2}, 16,
                                where="spec.stages.sft.training")
    with pytest.raises(TrainingConfigError, match=r"params.training.microBatchSize: must be >= 1"):
        check_training_settings({"microBatchSize": 0}, 1)


def test_offload_without_host_memory_is_refused_before_the_store_is_touched(world, tmp_path,
                                                                            monkeypatch):
    """offloadOptimizer needing more host memory than the node has: a StageError naming the
    field at the trainer's start (parameters counted from config.json on the meta device),
    before any model is loaded; an earlier run's marker and outputs stay as they were."""
    from xwin_jobs.stages import StageError, run_stage
    from xwin_jobs.store import Store
    from xwin_jobs.training import build, distributed

    task = stage_task(world, "sft", "offload", _inputs(world, "sft")[0],
                      {**ZERO, "zeroStage": 2, "offloadOptimizer": True})
    out = Path(task.output[len("file://"):])
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"stage": "sft", "digest": "other inputs"}))
    before = sorted(p.name for p in out.iterdir())
    counted = []
    real = build.model_parameters
    monkeypatch.setattr(build, "model_parameters", lambda cfg: counted.append(real(cfg)) or counted[-1])
    monkeypatch.setattr(distributed, "available_host_bytes", lambda: 1024)
    with pytest.raises(StageError, match=r"params.training.offloadOptimizer: ZeRO-Offload of .* needs "
                                         r".* GiB of host memory .* only 0.0 GiB"):
        run_stage(task, Store(), workdir=tmp_path / "scratch")
    assert counted and counted[0] > 10_000  # the tiny model's parameters, counted
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / MARKER).read_text())["digest"] == "other inputs"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_zero3_bf16_on_one_gpu(world, tmp_path):
    """ZeRO-3 on one GPU with bf16: the loss goes down and the model saves and loads."""
    task = stage_task(world, "sft", "gpu-zero3", _inputs(world, "sft")[0],
                      {**ZERO, "zeroStage": 3, "epochs": 4, "checkpointEvery": 0})
    task_file = tmp_path / "gpu.json"
    task_file.write_text(task.to_json())
    done = run_command([sys.executable, "-m", "xwin_jobs", "sft", "--task", str(task_file)],
                       job_env("cuda"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DeepSpeed ZeRO-3 on 1 rank(s), bf16" in done.stderr
    out = Path(task.output[len("file://"):])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainLoss"] < metrics["initialTrainLoss"]
    assert (out / MARKER).is_file()
    _check_loads(out, "sft")
