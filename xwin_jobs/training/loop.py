"""The optimizer-step loop, nanoGPT style, as `Trainer(engine, objective, config)`: epochs of
seeded shuffles, gradient accumulation from microBatchSize up to globalBatchSize, a log line
every few steps, a checkpoint every `checkpointEvery` steps, stop at `maxSteps`; resume after
the step of a checkpoint, and on a stop request (SIGTERM) checkpoint after the current step
and raise `Preempted`.

The trainer settles the layout first (`packed`: training.packing where the model's attention
keeps packed sequences apart), then builds the objective's workload with it
(objectives.Objective): the examples' lengths and loss units. Each step's examples (the
seeded plan of `data.batch_plan`) are regrouped into micro-batches by length
(under `config.token_budget` fed positions, or of `microBatchSize` examples when
`microBatchTokens` is 0; packed or padded) and a
micro-batch's weight is its share of the step's units (batching.LOSS_NORMALISATION); the
metrics report real tokens, fed positions and padding efficiency. `fit` runs the objective's
`prepare` (before any checkpoint is loaded), resumes, trains, and adds the objective's
`held_out_metrics`. Everything about devices stays in the engine.

Data parallel (engine.world_size > 1): every rank walks the same seeded plan; each takes
its share of every step's micro-batches (`rank_share`). A micro-batch's loss is weighted by
units/step_units * world_size because DDP (and DeepSpeed) average the ranks' gradients, so the
applied gradient is the single-process one: the mean over the global batch. Every rank runs
the same number of passes per step (ceil(micro-batches / ranks)): a rank whose share is
shorter adds zero-weighted passes, so that it joins every collective of the step (DDP's
all-reduce, ZeRO's reduce-scatters and ZeRO-3's parameter gathers).
Statistics are summed over ranks (each already weighted by units/step_units), so every rank
logs and returns the single-process numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .batching import Workload, step_plan
from .config import TrainingConfig, derive_geometry
from .data import batch_plan, rank_share
from .packing import packing_supported
from .preempt import Preempted
from .varlen import use_varlen

log = logging.getLogger("xwin_jobs.train")

MicroStep = Callable[[list[int]], "tuple[Any, dict[str, float]]"]


@dataclass
class LoopResult:
    steps: int
    epochs: float  # epochs seen, fractional when maxSteps stopped early
    history: list[dict[str, float]] = field(default_factory=list)
    steps_per_epoch: int = 1
    tokens: int = 0  # real tokens of the training forward passes (all ranks, resumed steps too)
    fed_positions: int = 0

    def mean(self, key: str) -> float | None:
        """Mean of `key` over the last epoch's worth of steps."""
        window = [h[key] for h in self.history[-self.steps_per_epoch :] if key in h]
        return sum(window) / len(window) if window else None

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"steps": self.steps, "epochs": round(self.epochs, 4)}
        if self.history:
            out["trainLoss"] = self.mean("loss")
            out["initialTrainLoss"] = self.history[0]["loss"]
            for key in self.history[-1]:
                if key not in ("step", "loss", "lr", "gradNorm"):
                    out["train" + key[0].upper() + key[1:]] = self.mean(key)
        if self.fed_positions:
            out["trainTokens"] = self.tokens
            out["paddingEfficiency"] = round(self.tokens / self.fed_positions, 4)
        return out


def plan_total_steps(num_examples: int, config: TrainingConfig) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps with maxSteps applied)."""
    per_epoch = max(1, math.ceil(num_examples / config.global_batch_size))
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    return per_epoch, total


def _accumulate(engine, micro_step: MicroStep, micro_batches: list[list[int]],
                weight_of: Callable[[list[int]], float]) -> dict[str, float]:
    """Forward/backward this rank's micro-batches of one step; the step's statistics
    (weighted means over the whole step, summed over ranks)."""
    world = engine.world_size
    mine = rank_share(micro_batches, engine.rank, world)
    n_step = sum(weight_of(mb) for mb in micro_batches) or 1.0
    passes = [(mb, weight_of(mb) / n_step) for mb in mine]
    # a short share still joins every collective, with zero-weighted passes
    passes += [(micro_batches[0], 0.0)] * (-(-len(micro_batches) // world) - len(passes))
    sums: dict[str, float] = {}
    for i, (mb, weight) in enumerate(passes):
        last = i == len(passes) - 1
        with (contextlib.nullcontext() if last else engine.no_sync()):
            with engine.autocast():
                loss, stats = micro_step(mb)
            engine.backward(loss * (weight * world))
        for key, value in {"loss": loss.detach(), **stats}.items():
            sums[key] = sums.get(key, 0.0) + value * weight
    sums = _to_floats(sums)   # read on the host once a step, not once per micro-batch
    if world > 1:
        sums = engine.dist.all_reduce_sum(sums)
    return sums


def _to_floats(values: dict[str, Any]) -> dict[str, float]:
    """{key: float} of 0-d tensors and numbers (read once a step, not once per micro-batch)."""
    return {k: v.item() if hasattr(v, "item") else float(v) for k, v in values.items()}


def _count_tokens(result: LoopResult, workload: Workload, micro_batches) -> None:
    """Real tokens and fed positions of a whole step (all ranks), into `result`."""
    for mb in micro_batches:
        real, fed = workload.real_and_fed(mb)
        result.tokens, result.fed_positions = result.tokens + real, result.fed_positions + fed


def use_packing(config: TrainingConfig, engine) -> bool:
    """Pack sequences padding-free when `training.packing` allows it and the model's
    attention keeps packed sequences apart (packing.packing_supported); on CPU, packed rows
    then get attention per sequence (varlen) instead of a row-wide mask."""
    model = engine.unwrap()
    packed = bool(config.packing) and packing_supported(model)
    varlen = packed and use_varlen(model, getattr(engine.device, "type", "cpu"))
    log.info("micro-batches: %s, grouped by length%s", "packed" if packed else "padded",
             ", attention per sequence" if varlen else "")
    return packed


class Trainer:
    """Trains `objective` on `engine` (built for `config` and the steps `plan_total_steps`
    gives for len(objective)). `packed` and `workload` are settled here, once."""

    def __init__(self, engine, objective, config: TrainingConfig):
        self.engine, self.objective, self.config = engine, objective, config
        self.packed = use_packing(config, engine)
        self.workload = objective.workload(self.packed)
        if len(self.workload) < 1:
            raise ValueError("no training examples")
        self.budget = config.token_budget(self.workload.sequences)
        self.per_epoch, self.total = plan_total_steps(len(self.workload), config)

    def fit(self, checkpoints=None, stop_requested=None, progress=None,
            log_every: int | None = None) -> dict[str, Any]:
        """The objective's `prepare`, resume from `checkpoints` (checkpoints.Checkpoints: its
        newest usable one; saved every checkpointEvery steps and on a stop request), train,
        and the metrics: the loop's, the batch geometry's, `held_out_metrics`'s and `prepare`'s.
        `stop_requested()` (preempt.StopRequest): checkpoint after the step in which it became
        true on any rank, then raise `Preempted`. `progress` (xwin_jobs.progress.ProgressWriter,
        rank 0's): the step, loss, rate and tokens/s after every step."""
        prepared = self.objective.prepare(self.engine, self.packed)
        start = checkpoints.resume() if checkpoints is not None else None
        result = self.train(start, checkpoints.save if checkpoints is not None else None,
                            stop_requested, progress, log_every)
        return {**result.metrics(), **derive_geometry(self.config, self.engine.world_size).metrics(),
                **self.objective.held_out_metrics(self.engine, self.packed), **prepared}

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """The micro-batches of each optimizer step of `epoch`."""
        config, workload = self.config, self.workload
        plan = batch_plan(len(workload), config.global_batch_size, config.micro_batch_size,
                          config.seed, epoch)
        return step_plan(plan, workload.lengths, config.micro_batch_size, self.budget,
                         workload.packed)

    def describe(self, done: int) -> str:
        """The training log's first line: the steps, and the micro-batches the first epoch's
        steps really get (how many a step, examples each, padding efficiency)."""
        config, steps = self.config, self.epoch_plan(0)
        batches = [mb for step in steps for mb in step]
        counts = [len(step) for step in steps]
        real, fed = (sum(x) for x in zip(*map(self.workload.real_and_fed, batches)))
        size = (f"up to {self.budget} positions" if self.budget
                else f"{min(config.micro_batch_size, config.global_batch_size)} examples")
        return (f"training: {len(self.workload)} examples, {self.total} steps ({self.per_epoch} "
                f"per epoch); micro-batches of {size}: {len(batches) / len(steps):.1f} a step "
                f"({min(counts)}-{max(counts)}), {sum(map(len, batches)) / len(batches):.1f} "
                f"examples each, padding efficiency {real / max(fed, 1):.2f}"
                + (f"; resuming after step {done}" if done else ""))

    def micro_step(self, indices: list[int]):
        return self.objective.micro_step(self.engine, indices, self.packed)

    def train(self, start=None, on_checkpoint: Callable[[int, list], None] | None = None,
              stop_requested: Callable[[], bool] | None = None, progress=None,
              log_every: int | None = None) -> LoopResult:
        """The loop. `start` (checkpoints.Resumed): continue after its step with its history;
        `on_checkpoint(step, history)`: every checkpointEvery steps and on a stop request."""
        engine, config, workload = self.engine, self.config, self.workload
        per_epoch, total = self.per_epoch, self.total
        log_every = log_every or max(1, total // 10)
        done = start.step if start else 0
        result = LoopResult(steps=done, epochs=done / per_epoch, steps_per_epoch=per_epoch,
                            history=list(start.history) if start else [])
        log.info("%s", self.describe(done))
        if engine.world_size > 1:
            log.info("data parallel: rank %d of %d takes every %d-th micro-batch of each step",
                     engine.rank, engine.world_size, engine.world_size)
        started = time.monotonic()
        if progress is not None:
            progress.update(done, total)
        for epoch in range(done // per_epoch):
            for micro_batches in self.epoch_plan(epoch):  # steps a checkpoint holds count too
                _count_tokens(result, workload, micro_batches)
        trained_tokens = 0  # real tokens of the steps trained here (for tokens/s)
        for epoch in range(done // per_epoch, config.epochs):
            plan = self.epoch_plan(epoch)
            skip = done - epoch * per_epoch if epoch == done // per_epoch else 0
            for micro_batches in plan[:skip]:
                _count_tokens(result, workload, micro_batches)
            for micro_batches in plan[skip:]:
                if result.steps >= total:
                    return result
                sums = _accumulate(engine, self.micro_step, micro_batches, workload.weight)
                counted = result.tokens
                _count_tokens(result, workload, micro_batches)
                trained_tokens += result.tokens - counted
                lr = engine.lr  # the rate this step uses (the scheduler moves on in step())
                grad_norm = engine.step()
                result.steps += 1
                result.epochs = result.steps / per_epoch
                result.history.append({"step": result.steps, **sums, "lr": lr, "gradNorm": grad_norm})
                if progress is not None:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    progress.update(result.steps, loss=sums.get("loss"), learningRate=lr,
                                    tokensPerSecond=trained_tokens / elapsed)
                if result.steps == 1 or result.steps % log_every == 0 or result.steps == total:
                    rate = (result.steps - done) / max(time.monotonic() - started, 1e-9)
                    values = " ".join(f"{k} {v:.4f}" for k, v in sums.items())
                    log.info("step %d/%d epoch %.2f %s lr %.2e grad %.3f (%.2f steps/s)",
                             result.steps, total, result.epochs, values, lr, grad_norm, rate)
                stop = stop_requested is not None and engine.dist.any_true(stop_requested())
                if result.steps >= total and not stop:
                    return result
                # The final step needs no checkpoint: the stage saves the final model.
                due = bool(config.checkpoint_every) and result.steps % config.checkpoint_every == 0
                if on_checkpoint and (stop or due):
                    on_checkpoint(result.steps, result.history)
                if stop:
                    raise Preempted(getattr(stop_requested, "signum", None) or 15, result.steps)
        return result
