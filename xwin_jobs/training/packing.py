"""Micro-batch tensors without wasted positions, and the model outputs read at the positions
that are used.

`collate_rows(sequences, pad_id, packed)` lays one micro-batch's sequences out as
`batching.layout_rows` says: padded (one sequence a row, right padded, an attention mask) or
packed (several sequences a row, each with position ids 0..L-1 and no attention mask).
transformers (>= 4.53, `masking_utils.find_packed_sequence_indices`) reads a packed row from
its position ids and builds a block-causal mask for the sdpa, eager and flex kernels
(flash-attention uses varlen), so attention never crosses sequences; `packing_supported`
says whether the installed transformers and the model's attention implementation do, and
the tests check that packed results equal padded ones. On CPU the stages switch the model to
`varlen.VARLEN` (one causal attention call per sequence, no row-wide mask): a masked row
still costs width^2 attention, however short its sequences.

Every position carries its *target*, the next token of its own sequence (-100 where nothing
is learned: prompt, padding, a sequence's last token), so the shift never crosses
sequences, and `seq_index` (which sequence of the micro-batch it belongs to; -1 for pads).

`hidden_states(model, batch)` runs the model through whatever wraps it (DDP, DeepSpeed) and
returns the last hidden states; the LM head is applied afterwards, only at labelled positions
(`label_logprobs`), and the reward head only at each sequence's last token (`last_token_rewards`).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..chat import IGNORE_INDEX
from .batching import layout_rows


def packing_supported(model: Any) -> bool:
    """Whether transformers keeps packed sequences apart for this model's attention kernel."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl in ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def collate_rows(sequences: Sequence[Any], pad_id: int, packed: bool) -> dict[str, Any]:
    """Tensors of one micro-batch of sequences (objects with input_ids and labels, labels
    aligned with input_ids, -100 where not learned)."""
    import torch

    rows, width = layout_rows([len(s.input_ids) for s in sequences], packed)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    last = torch.zeros(len(sequences), dtype=torch.long)  # flat index of each last token
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            seq = sequences[j]
            n = len(seq.input_ids)
            end = start + n
            ids[r, start:end] = torch.tensor(seq.input_ids, dtype=torch.long)
            positions[r, start:end] = torch.arange(n)
            targets[r, start : end - 1] = torch.tensor(seq.labels[1:], dtype=torch.long)
            seq_index[r, start:end] = j
            last[j] = r * width + end - 1
            start = end
        positions[r, start:] = torch.arange(width - start)  # the pad run: a sequence of its own
    batch = {"input_ids": ids, "position_ids": positions, "targets": targets,
             "seq_index": seq_index, "last_index": last, "fed": len(rows) * width,
             "real": sum(len(s.input_ids) for s in sequences)}
    if not packed:
        batch["attention_mask"] = (seq_index >= 0).long()
    return batch


def hidden_states(model, batch: dict[str, Any]):
    """Last hidden states [rows, width, hidden] (after the final norm), computed through the
    wrapper that `model` may be (DDP, DeepSpeed), with the model's own head run at one
    position only."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": batch.get("attention_mask"), "use_cache": False,
              "output_hidden_states": True, "return_dict": True}
    inner = getattr(model, "module", model)
    if _accepts_logits_to_keep(inner):
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).hidden_states[-1]


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def label_logprobs(model, batch: dict[str, Any], chunk_size: int = 1024, recompute: bool = False):
    """log p(target) at every labelled position, through the LM head in chunks (fp32
    log-softmax per chunk; `recompute`: see losses.chunked_target_logprobs). Returns
    (per-token log-probs [T], the micro-batch sequence index of each [T])."""
    from ..losses import chunked_target_logprobs

    hidden = hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = batch["targets"].reshape(-1)
    where = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    head = _unwrap(model).get_output_embeddings()
    logps = chunked_target_logprobs(flat.index_select(0, where), head, targets[where], chunk_size,
                                    recompute)
    return logps, batch["seq_index"].reshape(-1)[where]


def last_token_rewards(model, batch: dict[str, Any]):
    """The reward model's scalar at each sequence's last token, [num sequences]: the score
    head applied to those hidden states only."""
    hidden = hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.shape[-1])
    head = _unwrap(model).score
    return head(flat.index_select(0, batch["last_index"])).squeeze(-1).float()


def _unwrap(model):
    """The transformers model inside DDP (`.module`) or a DeepSpeed engine (`.module`)."""
    return getattr(model, "module", model)
