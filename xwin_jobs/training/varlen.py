"""Attention over packed rows without the row-wide mask, on CPU: one causal SDPA call per
sequence (what flash-attention's varlen kernel does on a GPU).

With `sdpa` or `eager`, transformers keeps the sequences of a packed row apart by building a
block-causal [rows, 1, width, width] mask from the position ids; the kernel then computes
attention over the whole row (width^2 per row and head) and masks most of it away. A row
of width 512 holding one long answer and a dozen short ones pays 512^2 where its sequences
need the sum of their squares. `VARLEN` is an attention implementation registered with
transformers (`AttentionInterface`, `AttentionMaskInterface`): no mask is built, and each
sequence, found from the position ids (a sequence starts where its position id is 0: the
layout `packing.collate_rows` writes, the pad run included), gets its own causal
`scaled_dot_product_attention` call. Real positions attend to exactly what they attend to
under the block-causal mask (right padding: a real token never sees a later pad), so the
results are the same up to float rounding (tests/test_packed_training.py).

`use_varlen(model)` switches a model to it (CPU only: on a GPU flash-attention varlen is the
fast path and a Python loop over sequences would add a launch per sequence). The attention
implementation is not saved with the model's config, so a saved model loads with its default.
"""

from __future__ import annotations

from typing import Any

VARLEN = "xwin_varlen_sdpa"


def _segment_lengths(position_ids, rows: int, width: int) -> list[int]:
    """Lengths of the sequences of all rows, row after row (a sequence starts where its
    position id is 0; every row's first position starts one)."""
    starts = (position_ids.expand(rows, width) == 0)
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().reshape(-1).tolist() + [rows * width]
    return [b - a for a, b in zip(flat, flat[1:])]


def varlen_sdpa_forward(module: Any, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """Attention of [rows, heads, width, dim] q/k/v, causal within each sequence of a row;
    returns ([rows, width, heads, dim], None) as transformers' sdpa_attention_forward.
    The rows are laid end to end and split once per tensor (one split in the graph, so
    backward concatenates the pieces' gradients instead of scattering each into zeros)."""
    import torch
    import torch.nn.functional as F

    rows, heads, width, dim = query.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        lengths = [width] * rows
    else:
        lengths = _segment_lengths(position_ids, rows, width)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dropout = dropout if module.training else 0.0

    def end_to_end(t):  # [rows, h, width, d] -> pieces [1, h, L, d]
        return t.transpose(0, 1).reshape(1, t.shape[1], rows * width, t.shape[-1]).split(lengths, dim=2)

    pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                             is_causal=True, enable_gqa=gqa)
              for q, k, v in zip(end_to_end(query), end_to_end(key), end_to_end(value))]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]  # [1, h, rows*width, d]
    return out.reshape(heads, rows, width, dim).permute(1, 2, 0, 3).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Register VARLEN with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN, _no_mask)


def use_varlen(model: Any, device_type: str) -> bool:
    """Switch `model` (a transformers model, unwrapped) to VARLEN when it runs on CPU with
    sdpa or eager attention and no sliding window; whether it did."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if device_type != "cpu" or impl not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) and any(
            t != "full_attention" for t in config.layer_types):
        return False
    try:
        register()
    except ImportError:
        return False
    config._attn_implementation = VARLEN
    return True
