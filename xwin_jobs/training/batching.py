"""Which sequences share a forward pass: length-grouped micro-batches, a token budget, packing.

Pure functions of token counts; no torch.

An *example* is a unit of the loss: one conversation (sft, rejectionSampling) or one pair of
sequences (rewardModel, dpo; chosen and rejected). Its `lengths` are the token counts of its
sequences.

Training (`step_plan`): the optimizer steps hold exactly the examples they hold without any
grouping (`data.batch_plan`'s seeded shuffle cut into `globalBatchSize` steps), so the
optimization is the same; only the split of each step into micro-batches changes. Within a
step the examples are sorted longest first and cut into micro-batches either of
`microBatchSize` examples or, with `microBatchTokens`, of as many examples as fit the budget
of fed positions. Because the loss of a step is normalised over the whole step
(see `LOSS_NORMALISATION`), the split changes no gradient (up to float rounding).

Forward passes outside training (DPO reference log-probabilities, held-out rewards):
`sorted_batches` sorts every example by length, since order does not matter there.

Layout of a micro-batch (`layout_rows`): with `packed=False`, one sequence per row, right
padded to the longest (as TRL does); with `packed=True`, padding-free packing: sequences are
put first-fit-decreasing into rows as wide as the micro-batch's longest sequence, each
sequence with its own position ids 0..L-1, so attention never crosses sequences (see
`packing.py`). Fed positions = rows x width; padding efficiency = real / fed.
"""

from __future__ import annotations

from typing import Sequence

LOSS_NORMALISATION = """\
Loss normalisation, the one definition (every training stage):
- sft, rejectionSampling: per token. The loss of an optimizer step is the negative
  log-likelihood summed over every labelled (assistant) token of the step's examples,
  divided by the number of those tokens: a long answer counts by its tokens, not as one
  example. Micro-batch i contributes its own token mean weighted by its share of the step's
  labelled tokens, so the step's loss does not depend on how the step is split or packed.
- dpo, rewardModel: per pair. A sequence's log-probability is the SUM over its labelled
  tokens (DPO); a reward is read at a sequence's last token (RM). The step's loss is the
  mean over its pairs; micro-batch i is weighted by its share of the step's pairs. DPO's
  RPO term (rpoAlpha) is per pair too: each chosen answer's NLL divided by its own labelled
  tokens, then the mean over pairs like the rest of the loss.
- Under data parallelism the same weights are used on every rank, times the world size
  (DDP and DeepSpeed average gradients over ranks), so the applied gradient is the
  single-process one.
"""

Lengths = Sequence[Sequence[int]]  # per example, the token counts of its sequences


class BudgetError(ValueError):
    """microBatchTokens cannot hold an example; the message names the field."""


def pack_rows(lengths: Sequence[int], width: int | None = None) -> list[list[int]]:
    """First fit, in the given order: sequence indices into rows of at most `width` tokens
    (default: the longest sequence). Callers pass sequences longest first, which makes it
    first-fit-decreasing."""
    if not lengths:
        return []
    width = width or max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        _place(rows, free, i, n, width)
    return rows


def _place(rows: list[list[int]], free: list[int], i: int, n: int, width: int) -> None:
    for r, room in enumerate(free):
        if n <= room:
            rows[r].append(i)
            free[r] -= n
            return
    rows.append([i])
    free.append(width - n)


def layout_rows(seq_lengths: Sequence[int], packed: bool) -> tuple[list[list[int]], int]:
    """(rows of sequence indices, row width) of one micro-batch's sequences (in micro-batch
    order: examples longest first, each example's sequences in order)."""
    width = max(seq_lengths)
    if packed:
        return pack_rows(seq_lengths, width), width
    return [[i] for i in range(len(seq_lengths))], width


def fed_positions(seq_lengths: Sequence[int], packed: bool) -> int:
    """Positions a forward pass over these sequences computes: rows x width."""
    if not seq_lengths:
        return 0
    rows, width = layout_rows(seq_lengths, packed)
    return len(rows) * width


def _flat(lengths: Lengths, indices: Sequence[int]) -> list[int]:
    return [n for i in indices for n in lengths[i]]


def longest_first(lengths: Lengths, indices: Sequence[int]) -> list[int]:
    """`indices` sorted by their longest sequence, longest first (ties: input order)."""
    return sorted(indices, key=lambda i: (-max(lengths[i]), -sum(lengths[i])))


def _with(free: list[int], seqs: Sequence[int], width: int, packed: bool) -> list[int]:
    """The rows' free room after adding `seqs` (first fit when packed, else a row each)."""
    if not packed:
        return [*free, *(width - n for n in seqs)]
    free, rows = list(free), [[] for _ in free]
    for n in seqs:
        _place(rows, free, -1, n, width)
    return free


def split_sorted(lengths: Lengths, indices: Sequence[int], micro_batch_size: int,
                 micro_batch_tokens: int = 0, packed: bool = False) -> list[list[int]]:
    """Cut `indices` (longest first) into micro-batches: `micro_batch_size` consecutive
    examples each; or, with `micro_batch_tokens` > 0, under that budget of fed positions (the
    layout of `layout_rows`): padded, consecutive examples while rows x longest fits;
    packed, a micro-batch opens with the longest example left (its row width) and takes, in
    order, every remaining example that still fits, so short examples fill the room left
    beside long ones. A budget too small for one example is a BudgetError."""
    if not micro_batch_tokens:
        return [list(indices[k : k + micro_batch_size]) for k in range(0, len(indices), micro_batch_size)]
    for i in indices:
        need = fed_positions(list(lengths[i]), packed)
        if need > micro_batch_tokens:
            raise BudgetError(
                f"training.microBatchTokens: {micro_batch_tokens} cannot hold one example of "
                f"{'+'.join(map(str, lengths[i]))} tokens ({need} positions fed); raise it to at "
                f"least {need} (maxLength bounds every sequence)")
    batches: list[list[int]] = []
    left = list(indices)
    while left:
        width = max(lengths[left[0]])
        current: list[int] = []
        free: list[int] = []  # room left in each row
        rest = []
        for i in left:
            seqs = lengths[i]
            trial = _with(free, seqs, width, packed) if max(seqs) <= width else None
            if trial is not None and (not current or len(trial) * width <= micro_batch_tokens):
                current.append(i)
                free = trial
            elif not packed:  # padded: a micro-batch is a run of consecutive examples
                rest = left[len(current):]
                break
            else:
                rest.append(i)
        batches.append(current)
        left = rest
    return batches


def step_plan(steps: Sequence[Sequence[Sequence[int]]], lengths: Lengths, micro_batch_size: int,
              micro_batch_tokens: int = 0, packed: bool = False) -> list[list[list[int]]]:
    """The micro-batches of each optimizer step of `steps` (as `data.batch_plan` gives
    them), regrouped by length: every step keeps exactly its examples."""
    out = []
    for step in steps:
        members = [i for mb in step for i in mb]
        out.append(split_sorted(lengths, longest_first(lengths, members), micro_batch_size,
                                micro_batch_tokens, packed))
    return out


def sorted_batches(lengths: Lengths, micro_batch_size: int, micro_batch_tokens: int = 0,
                   packed: bool = False, block: int = 1024) -> list[list[int]]:
    """Every example, longest first, in batches: for passes where order does not matter.
    Planned `block` examples at a time (the greedy fill is quadratic in what it scans)."""
    order = longest_first(lengths, range(len(lengths)))
    return [b for k in range(0, len(order), block)
            for b in split_sorted(lengths, order[k : k + block], micro_batch_size,
                                  micro_batch_tokens, packed)]


def check_budget(lengths: Lengths, micro_batch_tokens: int, packed: bool = False) -> None:
    """BudgetError (naming microBatchTokens) unless every example fits the budget."""
    if micro_batch_tokens and lengths:
        longest = max(range(len(lengths)), key=lambda i: fed_positions(list(lengths[i]), packed))
        split_sorted(lengths, [longest], 1, micro_batch_tokens, packed)


class Workload:
    """What planning needs to know about a stage's examples: the token counts of each
    example's sequences, each example's weight in the loss (`units`: labelled tokens for a
    per-token loss, None for one per example) and whether micro-batches are packed."""

    def __init__(self, lengths: Lengths, units: Sequence[int] | None = None, packed: bool = False):
        self.lengths = [tuple(int(n) for n in ex) for ex in lengths]
        self.units = None if units is None else [int(u) for u in units]
        self.packed = packed

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def sequences(self) -> int:
        """Sequences per example: 1 (conversations) or 2 (pairs)."""
        return max((len(ex) for ex in self.lengths), default=1)

    def weight(self, indices: Sequence[int]) -> float:
        """The loss weight of these examples (summed units)."""
        return float(len(indices) if self.units is None else sum(self.units[i] for i in indices))

    def real_and_fed(self, batch: Sequence[int]) -> tuple[int, int]:
        """(real tokens, fed positions) of one micro-batch."""
        seqs = _flat(self.lengths, batch)
        return sum(seqs), fed_positions(seqs, self.packed)
