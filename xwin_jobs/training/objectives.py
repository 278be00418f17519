"""The per-micro-batch objective of each training stage, as closures for `train_loop`.

Each `*_step(engine, examples, ...)` returns `micro_step(indices) -> (loss, stats)`; the
`*_workload(examples, ...)` functions tell the loop the examples' lengths and loss weights
(so it can group micro-batches by length and weight them, see
batching.LOSS_NORMALISATION). The math lives in xwin_jobs.losses; the tensors of a
micro-batch (padded or packed, targets already shifted within each sequence) and the reads
of hidden states at the used positions only come from `packing`.

Outside the training step (held-out evaluation, reference log-probabilities) the forward
passes use `engine.unwrap()` (no DDP synchronisation) over every example sorted by length;
under data parallelism each rank computes every world_size-th batch and the results are
all-gathered, so every rank ends with the same full table, batched exactly as a single
process batches it. Every rank runs the same number of forward passes (a short share repeats
a batch and drops the result): under ZeRO-3 each forward gathers the parameters collectively.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..losses import bradley_terry_loss, dpo_sigmoid_loss, length_normalised_nll, segment_sums, token_nll_mean
from .batching import Workload, sorted_batches
from .data import PairExample, SftExample
from ..chat import IGNORE_INDEX
from .packing import collate_rows, label_logprobs, last_token_rewards

HEAD_CHUNK = 1024  # labelled positions per LM-head chunk


def _targets(example: SftExample) -> int:
    """Positions whose next token is learned (the per-token loss weight)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def sft_workload(examples: Sequence[SftExample], packed: bool) -> Workload:
    return Workload([(len(e.input_ids),) for e in examples], [_targets(e) for e in examples], packed)


def pair_workload(pairs: Sequence[PairExample], packed: bool) -> Workload:
    return Workload([(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs],
                    None, packed)


def _pair_sequences(pairs: Sequence[PairExample]) -> list[SftExample]:
    """chosen and rejected of each pair, interleaved: sequence 2k is pair k's chosen."""
    return [s for p in pairs for s in (p.chosen, p.rejected)]


def _recompute(engine) -> bool:
    """Recompute LM-head chunks in backward (memory) on accelerators; keep them on CPU (time)."""
    return getattr(engine.device, "type", "cpu") != "cpu"


def _sequence_logprobs(engine, model, sequences: list[SftExample], pad_id: int, packed: bool):
    batch = engine.to_device(collate_rows(sequences, pad_id, packed))
    return label_logprobs(model, batch, HEAD_CHUNK, _recompute(engine))


def sft_step(engine, examples: Sequence[SftExample], pad_id: int, packed: bool = False):
    """Next-token loss on the labelled (assistant) tokens: their mean in this micro-batch
    (the loop weights micro-batches by their labelled tokens)."""

    def micro_step(indices: list[int]):
        logps, _ = _sequence_logprobs(engine, engine.model, [examples[i] for i in indices],
                                      pad_id, packed)
        return token_nll_mean(logps), {}

    return micro_step


def _pair_rewards(engine, model, pairs: Sequence[PairExample], pad_id: int, packed: bool):
    batch = engine.to_device(collate_rows(_pair_sequences(pairs), pad_id, packed))
    rewards = last_token_rewards(model, batch)
    return rewards[0::2], rewards[1::2]


def reward_step(engine, pairs: Sequence[PairExample], pad_id: int, packed: bool = False):
    """Bradley-Terry loss on (chosen, rejected) rewards; accuracy as a statistic."""

    def micro_step(indices: list[int]):
        chosen, rejected = _pair_rewards(engine, engine.model, [pairs[i] for i in indices],
                                         pad_id, packed)
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        return loss, {"accuracy": float(accuracy)}

    return micro_step


def _gathered_batches(engine, batches: list[list[int]], compute) -> list:
    """`compute(indices)` of every batch, in order, in eval mode; under data parallelism
    each rank computes its share and all ranks gather."""
    rank, world = engine.rank, engine.world_size
    done: dict[int, Any] = {}
    mine = list(range(rank, len(batches), world))
    with engine.eval_mode():
        for i in range(-(-len(batches) // world)):
            b = mine[i] if i < len(mine) else 0
            value = compute(batches[b])
            if i < len(mine):
                done[b] = value
    if world > 1:  # CPU results, pickled
        for share in engine.dist.all_gather_object(done):
            done.update(share)
    return [done[b] for b in range(len(batches))]


def _by_index(engine, workload: Workload, batch_size: int, batch_tokens: int, compute):
    """[N, ...] rows of `compute(batch) -> [len(batch), ...]` over length-sorted batches,
    put back in example order."""
    import torch

    batches = sorted_batches(workload.lengths, batch_size, batch_tokens, workload.packed)
    rows = _gathered_batches(engine, batches, compute)
    out = torch.empty((len(workload),) + tuple(rows[0].shape[1:]), dtype=rows[0].dtype)
    for batch, values in zip(batches, rows):
        out[torch.tensor(batch)] = values
    return out


def evaluate_rewards(engine, pairs: Sequence[PairExample], pad_id: int, batch_size: int,
                     batch_tokens: int = 0, packed: bool = False) -> dict[str, float]:
    """Held-out pair accuracy (chosen reward > rejected), loss and mean margin."""
    import torch

    if not pairs:
        return {}

    def compute(chunk: list[int]):
        c, r = _pair_rewards(engine, engine.unwrap(), [pairs[i] for i in chunk], pad_id, packed)
        return torch.stack([c, r], dim=-1).float().cpu()

    table = _by_index(engine, pair_workload(pairs, packed), batch_size, batch_tokens, compute)
    c, r = table[:, 0], table[:, 1]
    loss, accuracy = bradley_terry_loss(c, r)
    return {"heldOutAccuracy": float(accuracy), "heldOutLoss": float(loss),
            "heldOutMargin": float((c - r).mean()), "heldOutPairs": len(pairs)}


def _pair_logprobs(engine, model, pairs: Sequence[PairExample], pad_id: int, packed: bool):
    """log p(chosen), log p(rejected) of each pair: sums over labelled tokens."""
    logps, seq = _sequence_logprobs(engine, model, _pair_sequences(pairs), pad_id, packed)
    sums = segment_sums(logps, seq, 2 * len(pairs))
    return sums[0::2], sums[1::2]


def reference_logprobs(engine, pairs: Sequence[PairExample], pad_id: int, batch_size: int,
                       batch_tokens: int = 0, packed: bool = False):
    """log p_ref(chosen), log p_ref(rejected) for every pair, [N, 2], computed once with the
    model as it is now: before the first DPO step the policy IS the reference, so one model
    in memory suffices. Pairs are batched longest first (order does not matter here)."""
    import torch

    def compute(chunk: list[int]):
        c, r = _pair_logprobs(engine, engine.unwrap(), [pairs[i] for i in chunk], pad_id, packed)
        return torch.stack([c, r], dim=-1).float().cpu()

    return _by_index(engine, pair_workload(pairs, packed), batch_size, batch_tokens, compute)


def dpo_step(engine, pairs: Sequence[PairExample], reference, pad_id: int, beta: float,
             packed: bool = False, rpo_alpha: float = 0.0):
    """DPO sigmoid loss against precomputed reference log-probabilities ([N, 2]), plus
    rpo_alpha times the chosen answers' per-token NLL (RPO) when rpo_alpha > 0."""
    import torch

    def micro_step(indices: list[int]):
        pol_c, pol_r = _pair_logprobs(engine, engine.model, [pairs[i] for i in indices],
                                      pad_id, packed)
        ref = reference[indices].to(pol_c.device)
        tokens = torch.tensor([_targets(pairs[i].chosen) for i in indices], device=pol_c.device)
        loss, chosen_r, rejected_r = dpo_sigmoid_loss(pol_c, pol_r, ref[:, 0], ref[:, 1], beta,
                                                      rpo_alpha, tokens)
        return loss, {"rewardAccuracy": float((chosen_r > rejected_r).float().mean()),
                      "rewardMargin": float((chosen_r - rejected_r).mean()),
                      "chosenReward": float(chosen_r.mean()),
                      "rejectedReward": float(rejected_r.mean()),
                      "chosenNll": float(length_normalised_nll(pol_c.detach(), tokens).mean())}

    return micro_step
