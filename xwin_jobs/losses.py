"""The training objectives as small pure tensor functions (style of OpenRLHF models/loss.py).

The training stages do not build full logits: `chunked_target_logprobs` takes the hidden
states of the labelled positions only (already paired with their next-token targets by
xwin_jobs.training.packing) and applies the LM head chunk by chunk; `token_nll_mean` and
`segment_sums` turn those per-token log-probs into the SFT loss and per-sequence sums.
The full-logits versions the tests compare these against are in tests/reference.py.
How losses are normalised (per token, per pair) is defined once, in
xwin_jobs.training.batching.LOSS_NORMALISATION.

torch is imported lazily so that `import xwin_jobs.losses` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



def chunked_target_logprobs(hidden: "torch.Tensor", head, targets: "torch.Tensor",
                            chunk_size: int = 1024, recompute: bool = False) -> "torch.Tensor":
    """log p(target) for each row of `hidden` [T, H] under `head` (the LM head module,
    [*, H] -> [*, V]), `chunk_size` rows at a time with the log-softmax in fp32, so no
    [T, V] tensor is built at once. With `recompute` (and grad enabled) each chunk's logits
    are recomputed in the backward pass instead of kept (torch.utils.checkpoint): at most
    one chunk's [chunk, V] logits exist at any time. Returns [T] float32."""
    import torch

    def one(h, t):
        logits = head(h).float()
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    if hidden.shape[0] == 0:  # keeps the graph (zero gradients), as a full-logits pass would
        return hidden[:, 0].float() * 0
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute and torch.is_grad_enabled() and h.requires_grad:
            from torch.utils.checkpoint import checkpoint

            out.append(checkpoint(one, h, t, use_reentrant=False))
        else:
            out.append(one(h, t))
    return torch.cat(out)


def segment_sums(values: "torch.Tensor", segments: "torch.Tensor", count: int) -> "torch.Tensor":
    """Per-segment sums of `values` [T] by `segments` [T] (ints in [0, count)), [count]."""
    import torch

    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, segments, values)


def token_nll_mean(token_logprobs: "torch.Tensor") -> "torch.Tensor":
    """SFT loss from per-token log-probs of the labelled tokens: their mean NLL (0, not
    NaN, when there are none)."""
    return -token_logprobs.sum() / max(int(token_logprobs.numel()), 1)


def bradley_terry_loss(chosen_rewards: "torch.Tensor", rejected_rewards: "torch.Tensor"):
    """Pairwise reward-model loss -log sigmoid(r_c - r_r), mean over pairs.

    Returns (loss, accuracy) where accuracy is the fraction of pairs with r_c > r_r."""
    import torch.nn.functional as F

    diff = chosen_rewards.float() - rejected_rewards.float()
    loss = -F.logsigmoid(diff).mean()
    accuracy = (diff > 0).float().mean()
    return loss, accuracy


def length_normalised_nll(sequence_logprobs: "torch.Tensor", tokens: "torch.Tensor") -> "torch.Tensor":
    """Per sequence: -log p(y) / |y|, the mean negative log-likelihood of its labelled tokens."""
    return -sequence_logprobs.float() / tokens.to(sequence_logprobs.device).float().clamp(min=1)


def dpo_sigmoid_loss(policy_chosen: "torch.Tensor", policy_rejected: "torch.Tensor",
                     reference_chosen: "torch.Tensor", reference_rejected: "torch.Tensor",
                     beta: float, rpo_alpha: float = 0.0, chosen_tokens: "torch.Tensor | None" = None):
    """DPO (Rafailov et al. 2023), sigmoid form, from sequence log-probabilities.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs,
    plus, when rpo_alpha > 0 (RPO, Pang et al. 2024; TRL's rpo_alpha), rpo_alpha times the
    chosen answers' length-normalised NLL (-pi_c / chosen_tokens), mean over pairs: a pull
    towards the chosen answer that DPO's difference alone does not give.
    Returns (loss, chosen_rewards, rejected_rewards); the implicit rewards
    beta * (pi - ref) are detached (for logging)."""
    import torch.nn.functional as F

    chosen_logratio = policy_chosen.float() - reference_chosen.float()
    rejected_logratio = policy_rejected.float() - reference_rejected.float()
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha > 0 needs chosen_tokens (labelled tokens per chosen answer)")
        loss = loss + rpo_alpha * length_normalised_nll(policy_chosen, chosen_tokens).mean()
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()
