"""`sft`: finetune a causal LM on conversations, loss on assistant tokens only (Xwin-LM-SFT).

Task: inputs {model: base model URI, data: conversation records}; params {training}.
Writes model/, checkpoints/step-N/, metrics.json (trainLoss, ...).
"""

from __future__ import annotations

from typing import Any

from ..records import read_records
from . import StageContext, StageResult
from .common import check_model_input, model_source, pad_id_of, planned, require_examples, train_and_publish


def finetune(ctx: StageContext, conversations: list[dict[str, Any]],
             counts: dict[str, Any] | None = None) -> StageResult:
    """Supervised finetuning of ctx's `model` input on conversation records (shared with
    rejectionSampling)."""
    from ..modeling import load_causal_lm, load_tokenizer
    from ..training.data import encode_conversations
    from ..training.engine import seed_everything
    from ..training.objectives import sft_step, sft_workload

    config = ctx.training()
    source = model_source(ctx)
    tokenizer = load_tokenizer(source)
    examples, stats = encode_conversations(conversations, ctx.task.chat_template, tokenizer,
                                           config.max_length)
    require_examples(examples, stats, "conversations")
    workload = planned(config, sft_workload(examples, packed=False))
    seed_everything(config.seed)
    pad_id = pad_id_of(tokenizer)
    metrics, uri = train_and_publish(ctx, lambda: load_causal_lm(source), tokenizer, config, len(examples),
                                     lambda engine: sft_step(engine, examples, pad_id, workload.packed),
                                     workload=workload)
    metrics["labelledTokens"] = stats.labelled_tokens
    metrics["truncated"] = stats.truncated
    return StageResult(counts={**(counts or {}), **stats.as_counts()}, metrics=metrics,
                       outputs={"model": uri})


def run(ctx: StageContext) -> StageResult:
    check_model_input(ctx)
    conversations = read_records(ctx.store, ctx.input("data"), "conversation")
    return finetune(ctx, conversations)
