"""`rewardModel`: a Bradley-Terry reward model on preference pairs (Xwin-RM).

Task: inputs {model: init model URI, pairs: pair records (JSON Lines, Parquet or a dataset
repo: xwin_jobs.datasets_in)}; params {training, heldOutFraction (default 0.1)}. The model is
the init model with a scalar head (AutoModelForSequenceClassification, num_labels=1,
pad_token_id set: what TRL's RewardTrainer produces), so the best-of-N scorer loads it with
the same class. The pairs are tokenized once (common.tokenized_examples; a dpo stage reading
the same pairs with the same tokenizer reuses them). A seeded `heldOutFraction` of the pairs
is never trained on; metrics.json reports heldOutAccuracy (chosen reward > rejected reward).
"""

from __future__ import annotations

from ..datasets_in import iter_input_records
from . import StageContext, StageResult, param
from .common import (check_model_input, pad_id_of, require_examples, tokenized_examples,
                     tokenizer_of, train_and_publish)


def run(ctx: StageContext) -> StageResult:
    from ..modeling import load_reward_model
    from ..training.data import split_held_out
    from ..training.objectives import RewardObjective

    fraction = param(ctx.task, "heldOutFraction")
    config = ctx.training()
    check_model_input(ctx)
    uri = ctx.input("pairs")
    folder, tokenizer = tokenizer_of(ctx)
    tokenized = tokenized_examples(ctx, "pairs", folder, tokenizer, config, ("pairs",), lambda: (
        list(iter_input_records(ctx.store, uri, "pair", ctx.workdir)), {}))
    pairs, stats = tokenized.rows, tokenized.stats()
    require_examples(pairs, stats, "pairs")
    train_idx, held_idx = split_held_out(len(pairs), float(fraction), config.seed)
    train_pairs, held_pairs = pairs.select(train_idx), pairs.select(held_idx)
    pad_id = pad_id_of(tokenizer)
    objective = RewardObjective(train_pairs, pad_id, held_pairs, config)
    metrics, uri = train_and_publish(ctx, objective, lambda source: load_reward_model(source, pad_id),
                                     tokenizer)
    metrics["truncated"] = stats.truncated
    metrics.update(tokenized.metrics())
    return StageResult(counts={**stats.as_counts(), "trainPairs": len(train_pairs),
                               "heldOutPairs": len(held_pairs)},
                       metrics=metrics, outputs={"model": uri})
