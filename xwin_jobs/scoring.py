"""Reward-model scoring of (prompt, response) pairs, batched by length.

Every response is rendered after its prompt with the run's chat template, exactly as the
reward model saw pairs in training (`chat.render_with_spans` + the tokenizer's own special
tokens, i.e. the ids of `chat.encode_conversation`), truncated to the first `max_length`
tokens like in training. Sequences are then sorted by length and cut into batches under a
token budget (`rows * longest row <= token_budget`), right-padded, scored
(`model(input_ids, attention_mask).logits[:, 0]`: the score head read at the last real token)
and put back in input order. With right padding and an attention mask a score does not
depend on which batch a sequence landed in (up to float rounding; the tests check it).

Counted skips, never errors: an empty (whitespace-only) response is not scored (score None,
`empty`); a non-finite score becomes None (`nan`); a sequence longer than max_length is
scored on its first max_length tokens (`truncated`).

`length_grouped_batches` and `fixed_batches` are pure; torch and transformers are imported
inside the functions that need them. At the end: what the bestOfN score step shares with
other scoring shells (torchrun ranks, the scored set's summary).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .chat import adds_special_tokens, render_with_spans

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 16384


@dataclass
class ScoringStats:
    responses: int = 0
    scored: int = 0
    empty: int = 0
    nan: int = 0
    truncated: int = 0
    batches: int = 0
    tokens: int = 0          # real tokens scored
    padded_tokens: int = 0   # rows * width summed over batches

    def add(self, other: "ScoringStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_counts(self) -> dict[str, int]:
        return asdict(self)


# ----------------------------------------------------------------------------- pure


def length_grouped_batches(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET,
                           max_rows: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into batches with rows * longest <= budget
    (a single row longer than the budget is a batch of its own). Ties keep input order, so
    the batching is deterministic."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        L = max(int(lengths[i]), 1)
        if current and ((len(current) + 1) * max(width, L) > token_budget
                        or (max_rows is not None and len(current) >= max_rows)):
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, L)
    if current:
        batches.append(current)
    return batches


def fixed_batches(count: int, batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` in input order (the naive baseline)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, count))) for s in range(0, count, batch_size)]


def conversation_texts(items: Sequence[tuple[Sequence[dict], str]], template: str,
                       tokenizer: Any) -> list[str]:
    """prompt + [assistant response] rendered with the chat template, one text per item."""
    return [render_with_spans([*prompt, {"role": "assistant", "content": response}],
                              template, tokenizer)[0] for prompt, response in items]


def encode_items(items: Sequence[tuple[Sequence[dict], str]], template: str, tokenizer: Any,
                 max_length: int | None) -> tuple[list[list[int]], int]:
    """Token ids of every (prompt, response) as `encode_conversation` makes them, first
    max_length tokens kept; also how many were truncated."""
    if not items:
        return [], 0
    texts = conversation_texts(items, template, tokenizer)
    ids = tokenizer(texts, add_special_tokens=adds_special_tokens(template))["input_ids"]
    truncated = 0
    out = []
    for row in ids:
        row = list(row)
        if max_length is not None and len(row) > max_length:
            row = row[:max_length]
            truncated += 1
        out.append(row)
    return out, truncated


# ----------------------------------------------------------------------------- model


def score_token_ids(model: Any, sequences: Sequence[Sequence[int]], pad_id: int,
                    batches: Sequence[Sequence[int]], device: str = "cpu",
                    stats: ScoringStats | None = None) -> np.ndarray:
    """Scores (float64, input order) of `sequences` computed batch by batch as given."""
    import torch

    out = np.full(len(sequences), np.nan, dtype=np.float64)
    with torch.inference_mode():
        for batch in batches:
            if not batch:
                continue
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                row = sequences[i]
                ids[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
                mask[r, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits
            values = logits[:, 0].float().cpu().numpy().astype(np.float64)
            out[np.asarray(batch)] = values
            if stats is not None:
                stats.batches += 1
                stats.tokens += sum(len(sequences[i]) for i in batch)
                stats.padded_tokens += len(batch) * width
    return out


class RewardScorer:
    """A reward model folder (AutoModelForSequenceClassification, num_labels=1, with its
    tokenizer) ready to score (prompt, response) pairs."""

    def __init__(self, source: str, template: str, *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 max_length: int | None = None, device: str | None = None):
        import torch

        from .modeling import load_reward_model, load_tokenizer

        self.template, self.token_budget = template, int(token_budget)
        self.tokenizer = load_tokenizer(source)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(source, self.pad_id).to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or positions

    def score(self, items: Sequence[tuple[Sequence[dict], str]], *, grouped: bool = True,
              batch_size: int = 32, max_rows: int | None = None
              ) -> tuple[list[float | None], ScoringStats]:
        """Score of every (prompt messages, response text), None for skipped ones.

        Length-grouped batches under the token budget (and at most `max_rows` rows);
        grouped=False scores `batch_size` batches in input order (the benchmark's baseline)."""
        stats = ScoringStats(responses=len(items))
        keep = [i for i, (_, response) in enumerate(items) if response.strip()]
        stats.empty = len(items) - len(keep)
        sequences, stats.truncated = encode_items([items[i] for i in keep], self.template,
                                                  self.tokenizer, self.max_length)
        if grouped:
            batches = length_grouped_batches([len(s) for s in sequences], self.token_budget,
                                             max_rows)
        else:
            batches = fixed_batches(len(sequences), batch_size)
        values = score_token_ids(self.model, sequences, self.pad_id, batches, self.device, stats)
        scores: list[float | None] = [None] * len(items)
        for i, v in zip(keep, values):
            if math.isfinite(v):
                scores[i] = float(v)
                stats.scored += 1
            else:
                stats.nan += 1
        return scores, stats


# ----------------------------------------------------------------------------- the stage's shell


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class RankGroup:
    """A barrier across torchrun's ranks (gloo, CPU), a no-op for one process."""

    def __init__(self, world: int):
        self.world = world
        if world > 1:
            import datetime

            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def scored_set_summary(store: Any, data: str, n: int) -> tuple[dict, dict]:
    """metrics.json of the bestOfN stage from the scored set as written (every attempt's and
    every rank's part)."""
    from .records import iter_records, shard_uris
    from .selection import score_summary

    rows: list[list[float]] = []
    responses = empty = unscored = truncated = 0
    for record in iter_records(store, data, "scored"):
        row = []
        for x in record["responses"]:
            score, blank = x.get("score"), not x["content"].strip()
            responses += 1
            empty += blank
            unscored += score is None
            truncated += x.get("finish_reason") == "length"
            row.append(math.nan if score is None or blank else float(score))
        rows.append(row + [math.nan] * (n - len(row)))
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), n)
    prompts = len(rows)
    summary = score_summary(table)
    metrics = {
        "n": n,
        "prompts": prompts,
        "responses": responses,
        "responsesPerPrompt": responses / prompts if prompts else 0.0,
        "validResponsesPerPromptMean": summary["responsesPerPromptMean"],
        "validResponsesPerPromptMin": summary["responsesPerPromptMin"],
        "promptsWithoutValidResponse": summary["promptsWithoutValidResponse"],
        "meanScore": summary["meanScore"],
        "meanMaxScore": summary["meanMaxScore"],
        "meanMinScore": summary["meanMinScore"],
        "emptyResponses": empty,
        "nanScores": unscored - empty,
        "truncatedResponses": truncated,
    }
    counts = {"prompts": prompts, "responses": responses, "emptyResponses": empty,
              "nanScores": unscored - empty, "shards": len(shard_uris(store, data))}
    return metrics, counts
