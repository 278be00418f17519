"""The per-micro-batch objective of each training stage, as closures for `train_loop`.

Each `*_step(engine, examples, ...)` returns `micro_step(indices) -> (loss, stats)`.
The math lives in xwin_jobs.losses; this module only batches, runs the model and reads out.

Outside the training step (held-out evaluation, reference log-probabilities) the forward
passes use `engine.unwrap()` (no DDP synchronisation); under data parallelism each rank
computes every world_size-th batch and the results are all-gathered, so every rank ends
with the same full table, batched exactly as a single process batches it. Every rank runs
the same number of forward passes (a short share repeats a batch and drops the result):
under ZeRO-3 each forward gathers the parameters collectively.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..losses import bradley_terry_loss, dpo_sigmoid_loss, sequence_logprobs, sft_loss
from .data import PairExample, SftExample, collate_pairs, collate_sft


def _logits(model, batch: dict[str, Any]):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits


def sft_step(engine, examples: Sequence[SftExample], pad_id: int):
    """Next-token loss on the labelled (assistant) tokens."""

    def micro_step(indices: list[int]):
        batch = engine.to_device(collate_sft([examples[i] for i in indices], pad_id))
        return sft_loss(_logits(engine.model, batch), batch["labels"]), {}

    return micro_step


def _rewards(model, batch: dict[str, Any]):
    """One scalar per row, read by the model at the last non-pad token."""
    return _logits(model, batch).squeeze(-1).float()


def reward_step(engine, pairs: Sequence[PairExample], pad_id: int):
    """Bradley-Terry loss on (chosen, rejected) rewards; accuracy as a statistic."""

    def micro_step(indices: list[int]):
        batch = engine.to_device(collate_pairs([pairs[i] for i in indices], pad_id))
        rewards = _rewards(engine.model, batch)
        n = len(indices)
        loss, accuracy = bradley_terry_loss(rewards[:n], rewards[n:])
        return loss, {"accuracy": float(accuracy)}

    return micro_step


def _gathered_batches(engine, count: int, batch_size: int, compute) -> list:
    """`compute(indices)` of every batch of `batch_size` consecutive indices, in order, in
    eval mode; under data parallelism each rank computes its share and all ranks gather."""
    starts = list(range(0, count, batch_size))
    rank, world = engine.rank, engine.world_size
    done: dict[int, Any] = {}
    mine = starts[rank::world]
    with engine.eval_mode():
        for i in range(-(-len(starts) // world)):
            start = mine[i] if i < len(mine) else starts[0]
            value = compute(list(range(start, min(start + batch_size, count))))
            if i < len(mine):
                done[start] = value
    if world > 1:  # CPU results, pickled
        for share in engine.dist.all_gather_object(done):
            done.update(share)
    return [done[start] for start in starts]


def _chunk_rewards(engine, chunk: Sequence[PairExample], pad_id: int):
    rewards = _rewards(engine.unwrap(), engine.to_device(collate_pairs(chunk, pad_id))).cpu()
    return rewards[: len(chunk)], rewards[len(chunk) :]


def evaluate_rewards(engine, pairs: Sequence[PairExample], pad_id: int,
                     batch_size: int) -> dict[str, float]:
    """Held-out pair accuracy (chosen reward > rejected), loss and mean margin."""
    import torch

    if not pairs:
        return {}
    rows = _gathered_batches(engine, len(pairs), batch_size, lambda chunk: _chunk_rewards(
        engine, [pairs[i] for i in chunk], pad_id))
    chosen, rejected = [row[0] for row in rows], [row[1] for row in rows]
    c, r = torch.cat(chosen), torch.cat(rejected)
    loss, accuracy = bradley_terry_loss(c, r)
    return {"heldOutAccuracy": float(accuracy), "heldOutLoss": float(loss),
            "heldOutMargin": float((c - r).mean()), "heldOutPairs": len(pairs)}


def _pair_logprobs(model, batch: dict[str, Any], n: int):
    logps = sequence_logprobs(_logits(model, batch), batch["labels"])
    return logps[:n], logps[n:]


def reference_logprobs(engine, pairs: Sequence[PairExample], pad_id: int, batch_size: int):
    """log p_ref(chosen), log p_ref(rejected) for every pair, [N, 2], computed once with the
    model as it is now: before the first DPO step the policy IS the reference, so one model
    in memory suffices."""
    import torch

    def chunk_logprobs(chunk: list[int]):
        batch = engine.to_device(collate_pairs([pairs[i] for i in chunk], pad_id))
        c, r = _pair_logprobs(engine.unwrap(), batch, len(chunk))
        return torch.stack([c, r], dim=-1).float().cpu()

    rows = _gathered_batches(engine, len(pairs), batch_size, chunk_logprobs)
    return torch.cat(rows)


def dpo_step(engine, pairs: Sequence[PairExample], reference, pad_id: int, beta: float):
    """DPO sigmoid loss against precomputed reference log-probabilities ([N, 2])."""

    def micro_step(indices: list[int]):
        batch = engine.to_device(collate_pairs([pairs[i] for i in indices], pad_id))
        pol_c, pol_r = _pair_logprobs(engine.model, batch, len(indices))
        ref = reference[indices].to(pol_c.device)
        loss, chosen_r, rejected_r = dpo_sigmoid_loss(pol_c, pol_r, ref[:, 0], ref[:, 1], beta)
        return loss, {"rewardAccuracy": float((chosen_r > rejected_r).float().mean()),
                      "rewardMargin": float((chosen_r - rejected_r).mean()),
                      "chosenReward": float(chosen_r.mean()),
                      "rejectedReward": float(rejected_r.mean())}

    return micro_step
