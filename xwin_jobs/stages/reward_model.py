"""`rewardModel`: a Bradley-Terry reward model on preference pairs (Xwin-RM).

Task: inputs {model: init model URI, pairs: pair records}; params {training, heldOutFraction
(default 0.1)}. The model is the init model with a scalar head
(AutoModelForSequenceClassification, num_labels=1, pad_token_id set: what TRL's
RewardTrainer produces), so the best-of-N scorer loads it with the same class.
A seeded `heldOutFraction` of the pairs is never trained on; metrics.json reports
heldOutAccuracy (chosen reward > rejected reward) on them.
"""

from __future__ import annotations

from ..records import read_records
from . import StageContext, StageError, StageResult
from .common import check_model_input, model_source, pad_id_of, planned, require_examples, train_and_publish


def run(ctx: StageContext) -> StageResult:
    from ..modeling import load_reward_model, load_tokenizer
    from ..training.data import encode_pairs, split_held_out
    from ..training.engine import seed_everything
    from ..training.objectives import evaluate_rewards, pair_workload, reward_step

    fraction = ctx.param("heldOutFraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise StageError(f"params.heldOutFraction: must be a number in [0, 1), got {fraction!r}")
    config = ctx.training()
    check_model_input(ctx)
    records = read_records(ctx.store, ctx.input("pairs"), "pair")
    source = model_source(ctx)
    tokenizer = load_tokenizer(source)
    pairs, stats = encode_pairs(records, ctx.task.chat_template, tokenizer, config.max_length)
    require_examples(pairs, stats, "pairs")
    train_idx, held_idx = split_held_out(len(pairs), float(fraction), config.seed)
    train_pairs = [pairs[i] for i in train_idx]
    held_pairs = [pairs[i] for i in held_idx]
    pad_id = pad_id_of(tokenizer)
    workload = planned(config, pair_workload(train_pairs, packed=False))

    seed_everything(config.seed)  # the new score head's initialisation
    metrics, uri = train_and_publish(
        ctx, lambda: load_reward_model(source, pad_id), tokenizer, config, len(train_pairs),
        lambda engine: reward_step(engine, train_pairs, pad_id, workload.packed),
        after_training=lambda engine: evaluate_rewards(
            engine, held_pairs, pad_id, config.micro_batch_size, config.micro_batch_tokens,
            workload.packed),
        workload=workload)
    metrics["truncated"] = stats.truncated
    return StageResult(counts={**stats.as_counts(), "trainPairs": len(train_pairs),
                               "heldOutPairs": len(held_pairs)},
                       metrics=metrics, outputs={"model": uri})
