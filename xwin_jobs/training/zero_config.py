"""The DeepSpeed configuration of a ZeRO run, built from the stage's training settings. Pure.

`deepspeed_config(config, world_size, bf16)` is the ONE place the DeepSpeed JSON is made:

* batch: `train_micro_batch_size_per_gpu` = microBatchSize, `gradient_accumulation_steps` =
  globalBatchSize / (microBatchSize x world size), `train_batch_size` = globalBatchSize. The
  loop marks the accumulation boundary itself (ranks may get uneven shares of a short last
  step), but DeepSpeed checks these three agree, so a globalBatchSize that is not a multiple
  of microBatchSize x ranks is refused, naming the field.
* optimizer: AdamW (betas 0.9/0.95, eps 1e-8, weightDecay on >= 2-D weights only), torch's
  implementation (`torch_adam`) so nothing is compiled; with `offloadOptimizer` the optimizer
  state lives in host memory and DeepSpeedCPUAdam updates it there.
* clipping: `gradient_clipping` = maxGradNorm (0 = none).
* precision: bf16 where the GPU has it (fp32 master weights in the optimizer), fp32 on CPU.
* zero_optimization: the stage, optimizer offload, communication buckets sized from the model's
  hidden size when it is known (`hidden_size`, transformers' Trainer recipe: hidden^2 elements
  per reduce/all-gather bucket and prefetch, 10 x hidden for parameters kept gathered, capped at
  `BUCKET`; floors `MIN_BUCKET` and `PERSISTENCE` so a small model is not cut into hundreds of
  collectives: issue 9's step time, benchmarks/RESULTS.md "ZeRO memory"), optimizer sub-groups
  of `SUB_GROUP` elements, and for ZeRO-3 no 16-bit gather on save (the engine gathers the
  weights a group at a time when it saves).

Where ZeRO-3's memory goes (benchmarks/bench_zero_memory.py, RESULTS.md "ZeRO memory"): per
rank the partitioned weights, an fp32 master copy, the flat gradient partition and two Adam
moments (20 bytes/parameter / ranks in fp32), plus transients sized by this config: every
optimizer sub-group's step copies its gradients into one flat tensor and AdamW makes temporaries
of the same size, and the gather/reduce buckets are live during forward and backward. With
DeepSpeed's sizes (1e9-element sub-groups, 5e8-element buckets) those transients are the whole
partition again, so ZeRO-3 peaked as high as DDP.

The learning-rate schedule is not in the JSON: the engine hands DeepSpeed the same
transformers scheduler the torch path uses, so both follow one schedule.

`offload_host_bytes` / `check_offload_memory`: ZeRO-Offload keeps, per parameter, an fp32
master copy, two Adam moments and an fp32 gradient (16 bytes) in host memory, split over the
ranks; the ranks of one node share that node's memory.
"""

from __future__ import annotations

from typing import Any

from .config import TrainingConfig, TrainingConfigError, batch_geometry

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
OFFLOAD_BYTES_PER_PARAM = 16  # fp32 master weights + 2 fp32 Adam moments + fp32 gradients
# Elements per communication bucket (the most; hidden^2 below it) and per optimizer sub-group.
# DeepSpeed's defaults (5e8 and 1e9) allocate buffers of several GB per rank, more than a
# partitioned 7B model's share. A sub-group's step makes transients of its size (a flat copy of
# its gradients, AdamW's temporaries): 1e7 elements keeps them at ~40 MB each in fp32.
BUCKET = 50_000_000
SUB_GROUP = 10_000_000
# The fewest elements per bucket: DDP's 25 MB gradient bucket in fp32. A model's hidden^2
# alone is tiny for small models (16k elements at hidden 128): ZeRO then runs one collective
# per few parameters, and on CPU (gloo) each one's latency, not its bytes, is the step time.
MIN_BUCKET = 6_250_000
# Parameters with fewer elements stay whole on every rank under ZeRO-3 (not partitioned, so
# never gathered): DeepSpeed's own default. Weight matrices of real models (hidden^2 and up)
# are far above it; a tiny test model's all fall below it and run like ZeRO-2.
PERSISTENCE = 100_000


def bucket_sizes(hidden_size: int | None) -> dict[str, int]:
    """Communication sizes (elements) for a model of `hidden_size`: transformers' Trainer
    recipe (hidden^2 per bucket, 0.9 x that prefetched, 10 x hidden kept whole), with
    MIN_BUCKET and PERSISTENCE as floors and `BUCKET` as the ceiling; `BUCKET` for an
    unknown size."""
    if not hidden_size:
        return {"bucket": BUCKET, "prefetch": BUCKET, "persistence": PERSISTENCE}
    square = min(BUCKET, max(MIN_BUCKET, hidden_size * hidden_size))
    return {"bucket": square, "prefetch": int(0.9 * square),
            "persistence": max(PERSISTENCE, 10 * hidden_size)}


def deepspeed_config(config: TrainingConfig, world_size: int, bf16: bool,
                     where: str = "params.training", hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for `config` on `world_size` ranks, buckets sized for a model of
    `hidden_size` when given (see the module docstring)."""
    if config.zero_stage not in (1, 2, 3):
        raise TrainingConfigError(f"{where}.zeroStage: DeepSpeed runs stages 1-3, got {config.zero_stage}")
    micro, accumulation = batch_geometry(config, world_size, where)
    sizes = bucket_sizes(hidden_size)
    zero: dict[str, Any] = {"stage": config.zero_stage, "overlap_comm": False,
                            "contiguous_gradients": True, "reduce_bucket_size": sizes["bucket"],
                            "allgather_bucket_size": sizes["bucket"], "sub_group_size": SUB_GROUP}
    if config.zero_stage == 3:
        # release gathered parameters after use (DeepSpeed's 1e9 keeps a whole <1B model
        # gathered on every rank between uses), and no 16-bit gather on save
        zero.update({"stage3_max_live_parameters": sizes["bucket"],
                     "stage3_max_reuse_distance": sizes["bucket"],
                     "stage3_prefetch_bucket_size": sizes["prefetch"],
                     "stage3_param_persistence_threshold": sizes["persistence"],
                     "stage3_gather_16bit_weights_on_model_save": False})
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": config.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(config.max_grad_norm),
        "optimizer": {"type": "AdamW", "params": {
            "lr": config.learning_rate, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
            "weight_decay": config.weight_decay,
            # torch's AdamW (no compiled op) unless the state is offloaded (DeepSpeedCPUAdam)
            "torch_adam": not config.offload_optimizer, "adam_w_mode": True}},
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def offload_host_bytes(num_params: int, world_size: int, ranks_on_node: int) -> int:
    """Host memory ZeRO-Offload needs on one node: this node's ranks' shares of the state."""
    per_rank = -(-num_params * OFFLOAD_BYTES_PER_PARAM // max(1, world_size))
    return per_rank * max(1, ranks_on_node)


def check_offload_memory(num_params: int, world_size: int, ranks_on_node: int,
                         available_bytes: int, where: str = "params.training") -> None:
    """A clear error naming offloadOptimizer when the node's free memory cannot hold it."""
    need = offload_host_bytes(num_params, world_size, ranks_on_node)
    if need > available_bytes:
        gib = 2**30
        raise TrainingConfigError(
            f"{where}.offloadOptimizer: ZeRO-Offload of {num_params / 1e9:.2f}B parameters over "
            f"{world_size} rank(s) needs {need / gib:.1f} GiB of host memory on this node "
            f"({ranks_on_node} rank(s) x {OFFLOAD_BYTES_PER_PARAM} bytes/parameter / {world_size}), "
            f"only {available_bytes / gib:.1f} GiB is available; set offloadOptimizer: false "
            f"or use more nodes")
