"""What the four training stages share: model inputs, the engine, checkpoints, publishing.

`train_and_publish` is the whole life of a training stage once its examples exist:
seed, build the engine, run the loop (checkpoints to `checkpoints/step-N/`), upload the
final model to `model/`, and return the loop's metrics. Under torchrun every rank trains
(data parallel) and only rank 0 uploads.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..modeling import HF_SCHEME, publish_model, resolve_model_source
from ..store import check_model_folder
from . import StageContext, StageError

log = logging.getLogger("xwin_jobs.stage")

TRAINING_OUTPUTS = ("model/", "checkpoints/", "metrics.json")


def check_model_input(ctx: StageContext, name: str = "model") -> str:
    """Fail early (before reading data or downloading anything) when the model input is not
    a model folder. Returns the URI."""
    uri = ctx.input(name)
    if not uri.startswith(HF_SCHEME):
        check_model_folder(ctx.store, uri)
    return uri


def model_source(ctx: StageContext, name: str = "model") -> str:
    """A local folder (downloaded into the scratch folder when remote) or a Hub id."""
    return resolve_model_source(ctx.store, ctx.input(name), ctx.workdir)


def require_examples(examples: list, stats, what: str) -> None:
    if examples:
        return
    hint = f" ({stats.skipped} had no assistant tokens within maxLength)" if stats.skipped else ""
    raise StageError(f"no {what} to train on: {stats.records} record(s) read{hint}")


def planned(config, workload):
    """`workload` (training.batching.Workload) after checking that microBatchTokens holds
    every example: a StageError naming the field, before any model is loaded."""
    from ..training.batching import BudgetError, check_budget

    try:
        check_budget(workload.lengths, config.micro_batch_tokens, workload.packed)
    except BudgetError as e:
        raise StageError(str(e)) from None
    return workload


def use_packing(config, model) -> bool:
    """Pack sequences padding-free when `training.packing` allows it and the model's
    attention keeps packed sequences apart (training.packing.packing_supported)."""
    from ..training.packing import packing_supported

    packed = bool(config.packing) and packing_supported(model)
    log.info("micro-batches: %s, grouped by length%s", "packed" if packed else "padded",
             f", {config.micro_batch_tokens} positions each" if config.micro_batch_tokens else "")
    return packed


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise StageError("the tokenizer has no pad, unk or eos token to pad batches with")
    return int(tokenizer.pad_token_id)


def train_and_publish(ctx: StageContext, model: Any, tokenizer: Any, config, num_examples: int,
                      make_step: Callable[[Any], Callable], before_training: Callable[[Any], None] | None = None,
                      after_training: Callable[[Any], dict] | None = None,
                      workload=None) -> tuple[dict, str]:
    """Train `model` with the micro-step `make_step(engine)` and upload the result.

    `before_training(engine)` runs once the model is on its device (DPO computes reference
    log-probabilities there); `after_training(engine)` returns extra metrics (the reward
    model's held-out accuracy); `workload` (training.batching.Workload) groups micro-batches
    by length. Returns (metrics, model URI)."""
    from ..training.engine import Engine
    from ..training.loop import plan_total_steps, train_loop

    _, total = plan_total_steps(num_examples, config)
    engine = Engine(model, config, total_steps=total, dist=ctx.dist)
    if before_training:
        before_training(engine)

    def checkpoint(step: int) -> None:
        if not engine.is_main:
            return
        uri = ctx.output("checkpoints", f"step-{step}/")
        publish_model(ctx.store, engine.unwrap(), tokenizer, ctx.workdir / "checkpoint", uri)
        log.info("checkpoint step %d -> %s", step, uri)

    result = train_loop(engine, num_examples, make_step(engine), config, on_checkpoint=checkpoint,
                        workload=workload)
    metrics = result.metrics()
    if after_training:
        metrics.update(after_training(engine))
    uri = ctx.output("model/")
    if engine.is_main:
        uri = publish_model(ctx.store, engine.unwrap(), tokenizer, ctx.workdir / "model", uri)
        log.info("model -> %s", uri)
    return metrics, uri
