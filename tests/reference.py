"""Reference implementations the tests (and the padded baselines of benchmarks/) compare the
production code against: the plain, padded way of computing what xwin_jobs computes packed,
chunked or fused. Not imported by xwin_jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from xwin_jobs.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from xwin_jobs.training.batching import Workload
    from xwin_jobs.training.data import PairExample, SftExample


def _shifted_token_logprobs(logits: "torch.Tensor", labels: "torch.Tensor"):
    """Per-token log p(label) for the shifted sequence, and the mask of counted tokens."""
    import torch

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sft_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """Mean negative log-likelihood over the unmasked tokens of the whole batch.

    A batch without a single unmasked token gives 0 (not NaN)."""
    logp, mask = _shifted_token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def sequence_logprobs(logits: "torch.Tensor", labels: "torch.Tensor",
                      average: bool = False) -> "torch.Tensor":
    """log p(sequence) per row: the sum (or mean, average=True) over unmasked tokens. [batch]"""
    logp, mask = _shifted_token_logprobs(logits, labels)
    total = logp.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def _pad(rows: Sequence[Sequence[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_sft(examples: Sequence[SftExample], pad_id: int) -> dict[str, Any]:
    """Right-padded {input_ids, attention_mask, labels}; padding is never labelled."""
    ids = _pad([e.input_ids for e in examples], pad_id)
    mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
    labels = _pad([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen sequences first, then the B rejected ones."""
    return collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)


def padding_efficiency(workload: "Workload", batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / fed positions over `batches`."""
    real, fed = (sum(x) for x in zip((0, 0), *(workload.real_and_fed(b) for b in batches)))
    return real / fed if fed else 1.0


def half_width(ci: Sequence[float] | None) -> float | None:
    """Half the width of an interval [lo, hi] (None for none)."""
    return None if not ci else (ci[1] - ci[0]) / 2
