"""The loss of each kind of training stage, as an `Objective` that `loop.Trainer` drives.

An objective holds a stage's examples and settings (`len(objective)`: the training examples)
and answers, for the layout the trainer chose (`packed`, settled before anything else):

- `workload(packed)`: the examples' lengths and loss units (batching.Workload), with which
  the trainer groups micro-batches by length and weights them (batching.LOSS_NORMALISATION);
- `prepare(engine, packed) -> metrics`: once, with the model on its device and its initial
  weights, before any checkpoint is loaded (DPO computes or reuses its reference here);
- `micro_step(engine, indices, packed) -> (loss, stats)`: the loss of one micro-batch (the
  mean over its loss units) and statistics to average (0-d tensors: the trainer copies them
  to the host once a step);
- `held_out_metrics(engine, packed) -> metrics`: once training is over (the reward model's
  held-out pairs).

The math lives in xwin_jobs.losses; the tensors of a micro-batch (padded or packed, targets
already shifted within each sequence) and the reads of hidden states at the used positions
only come from `packing`.

Outside the training step (held-out evaluation, reference log-probabilities) the forward
passes use `engine.unwrap()` (no DDP synchronisation) over every example sorted by length;
under data parallelism each rank computes every world_size-th batch and the results are
all-gathered, so every rank ends with the same full table, batched exactly as a single
process batches it. Every rank runs the same number of forward passes (a short share repeats
a batch and drops the result): under ZeRO-3 each forward gathers the parameters collectively.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from ..losses import bradley_terry_loss, dpo_sigmoid_loss, length_normalised_nll, segment_sums, token_nll_mean
from .batching import Workload, sorted_batches
from .config import TrainingConfig
from .data import PairExample, SftExample, TokenRows
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


def _pair_rewards(engine, model, pairs: Sequence[PairExample], pad_id: int, packed: bool):
    batch = engine.to_device(collate_rows(_pair_sequences(pairs), pad_id, packed))
    rewards = last_token_rewards(model, batch)
    return rewards[0::2], rewards[1::2]


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


class ReferenceStore(Protocol):
    """Where DPO's reference log-probabilities are kept between attempts and runs."""

    def fetch(self, engine, packed: bool, compute) -> tuple[Any, bool]:
        """(the stored table for this layout, else `compute()`'s, stored; whether reused)."""


class Objective:
    """What the trainer needs of a stage (module docstring); `examples` are the training
    examples (a list, or training.data.TokenRows read as columns for the workload)."""

    list_workload = staticmethod(pair_workload)  # the workload of a list of examples

    def __init__(self, examples: Sequence[Any], pad_id: int):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def workload(self, packed: bool) -> Workload:
        if isinstance(self.examples, TokenRows):
            return self.examples.workload(packed)
        return self.list_workload(self.examples, packed)

    def prepare(self, engine, packed: bool) -> dict[str, Any]:
        return {}

    def micro_step(self, engine, indices: list[int], packed: bool):
        raise NotImplementedError

    def held_out_metrics(self, engine, packed: bool) -> dict[str, Any]:
        return {}


class SftObjective(Objective):
    """sft, rejectionSampling: next-token loss on the labelled (assistant) tokens, their mean
    in the micro-batch (the trainer weights micro-batches by their labelled tokens)."""

    list_workload = staticmethod(sft_workload)

    def micro_step(self, engine, indices: list[int], packed: bool):
        logps, _ = _sequence_logprobs(engine, engine.model, [self.examples[i] for i in indices],
                                      self.pad_id, packed)
        return token_nll_mean(logps), {}


class RewardObjective(Objective):
    """rewardModel: Bradley-Terry loss on (chosen, rejected) rewards, accuracy as a statistic;
    once trained, the accuracy, loss and margin on the `held_out` pairs, batched as `config`'s
    micro-batches."""

    def __init__(self, pairs: Sequence[PairExample], pad_id: int, held_out: Sequence[PairExample],
                 config: TrainingConfig):
        super().__init__(pairs, pad_id)
        self.held_out, self.config = held_out, config

    def micro_step(self, engine, indices: list[int], packed: bool):
        chosen, rejected = _pair_rewards(engine, engine.model, [self.examples[i] for i in indices],
                                         self.pad_id, packed)
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        return loss, {"accuracy": accuracy.detach()}

    def held_out_metrics(self, engine, packed: bool) -> dict[str, Any]:
        return evaluate_rewards(engine, self.held_out, self.pad_id, self.config.micro_batch_size,
                                self.config.token_budget(2), packed)


class DpoObjective(Objective):
    """dpo: the sigmoid loss against reference log-probabilities, plus rpo_alpha times the
    chosen answers' per-token NLL (RPO) when rpo_alpha > 0. `prepare` takes the reference
    from `store` (or computes it, with the policy as it is before the first step: then the
    policy IS the reference, so one model in memory suffices) and reports `referenceReused`."""

    def __init__(self, pairs: Sequence[PairExample], pad_id: int, config: TrainingConfig,
                 beta: float, rpo_alpha: float = 0.0, store: ReferenceStore | None = None):
        super().__init__(pairs, pad_id)
        self.config, self.beta, self.rpo_alpha, self.store = config, beta, rpo_alpha, store
        self.reference = None  # [N, 2]: log p_ref(chosen), log p_ref(rejected), from `prepare`

    def prepare(self, engine, packed: bool) -> dict[str, Any]:
        def compute():
            return reference_logprobs(engine, self.examples, self.pad_id, self.config.micro_batch_size,
                                      self.config.token_budget(2), packed)

        if self.store is None:
            self.reference = compute()
            return {}
        self.reference, reused = self.store.fetch(engine, packed, compute)
        return {"referenceReused": reused}

    def micro_step(self, engine, indices: list[int], packed: bool):
        import torch

        pairs = [self.examples[i] for i in indices]
        pol_c, pol_r = _pair_logprobs(engine, engine.model, pairs, self.pad_id, packed)
        ref = self.reference[indices].to(pol_c.device)
        tokens = torch.tensor([_targets(p.chosen) for p in pairs], device=pol_c.device)
        loss, chosen_r, rejected_r = dpo_sigmoid_loss(pol_c, pol_r, ref[:, 0], ref[:, 1], self.beta,
                                                      self.rpo_alpha, tokens)
        chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
        return loss, {"rewardAccuracy": (chosen_r > rejected_r).float().mean(),
                      "rewardMargin": (chosen_r - rejected_r).mean(),
                      "chosenReward": chosen_r.mean(), "rejectedReward": rejected_r.mean(),
                      "chosenNll": length_normalised_nll(pol_c.detach(), tokens).mean()}
