"""`sft`: finetune a causal LM on conversations, loss on assistant tokens only (Xwin-LM-SFT).

Task: inputs {model: base model URI, data: conversation records (JSON Lines, Parquet or a
dataset repo: xwin_jobs.datasets_in)}; params {training}.
Writes model/, checkpoints/step-N/, tokenized/<key>/ (the examples, xwin_jobs.tokenized),
metrics.json (trainLoss, tokenizedReused, ...).
"""

from __future__ import annotations

from typing import Any, Callable

from ..datasets_in import iter_input_records
from . import StageContext, StageResult
from .common import (check_model_input, pad_id_of, require_examples, tokenized_examples,
                     tokenizer_of, train_and_publish)


def finetune(ctx: StageContext, inputs: tuple[str, ...], make_records: Callable[[], tuple[list, dict]],
             derive: dict[str, Any] | None = None) -> StageResult:
    """Supervised finetuning of ctx's `model` input on the conversation records
    `make_records()` returns (with counts), made from `inputs` with the `derive` settings
    (shared with rejectionSampling); tokenized once (common.tokenized_examples)."""
    from ..modeling import load_causal_lm
    from ..training.objectives import SftObjective

    config = ctx.training()
    folder, tokenizer = tokenizer_of(ctx)
    tokenized = tokenized_examples(ctx, "sft", folder, tokenizer, config, inputs, make_records, derive)
    examples, stats = tokenized.rows, tokenized.stats()
    require_examples(examples, stats, "conversations")
    objective = SftObjective(examples, pad_id_of(tokenizer))
    metrics, uri = train_and_publish(ctx, objective, load_causal_lm, tokenizer)
    metrics["labelledTokens"] = stats.labelled_tokens
    metrics["truncated"] = stats.truncated
    metrics.update(tokenized.metrics())
    return StageResult(counts={**tokenized.counts, **stats.as_counts()}, metrics=metrics,
                       outputs={"model": uri})


def run(ctx: StageContext) -> StageResult:
    check_model_input(ctx)
    data = ctx.input("data")
    return finetune(ctx, ("data",), lambda: (
        list(iter_input_records(ctx.store, data, "conversation", ctx.workdir)), {}))
